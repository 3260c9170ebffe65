"""SOAP: Adam running in Shampoo's eigenbasis, with 4-bit (or 8-/32-bit) bases
and moments.

Per block ``G`` with left/right bases ``U_L``, ``U_R`` (rows = eigenvectors of
Shampoo's statistics):

* the first moment ``M`` is an EMA of ``G`` in the original basis;
* the second moment ``V`` is an EMA of ``(U_L G U_Rᵀ)²`` in the rotated basis;
* the update is ``U_Lᵀ [ M̂' / (√V̂ + eps) ] U_R`` with ``M̂' = U_L M̂ U_Rᵀ``
  (Adam's bias corrections);
* every ``precondition_every`` steps the bases take 4-bit Shampoo's statistics
  step (EMA of the statistic rebuilt from the stored eigenvectors and
  eigenvalues, one warm-started orthonormalization, Rayleigh quotients), the
  same code as :func:`optax_shampoo4.shampoo.update_statistics`.

The bases are the eigenvector storage of 4-bit Shampoo without its inverse
roots, so the state is about ``0.5625 B`` per basis entry plus the two moments
(``AdamConfig``: about 2 B per parameter at 8 bits, the default, 1 B at 4),
stored in the layout of the block groups that the rotations run on
(:mod:`optax_shampoo4.block_moments`).
Tensors without a preconditioner (biases, scales) take plain Adam.
``docs/algorithms.md`` §7 has the details.

References:
  Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson, Kakade. *SOAP:
  Improving and Stabilizing Shampoo using Adam.* ICLR 2025 (arXiv 2409.11321).
  [S4] Wang, Zhou, Li, Huang. *4-bit Shampoo for Memory-Efficient Network
  Training.* NeurIPS 2024.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_shampoo4 import _checks, block_moments, blocking
from optax_shampoo4.moments import MomentLayout
from optax_shampoo4.config import MIB, AdamConfig, ShampooConfig
from optax_shampoo4.host_schedule import due_at, run_when_due, scheduled_due
from optax_shampoo4.nonfinite import where_finite, step_counters
from optax_shampoo4.preconditioners import Hyper, init_basis, make_codec
from optax_shampoo4.shampoo import update_statistics
from optax_shampoo4.soap_rotation import Rotation
from optax_shampoo4.stacks import (NOT_PARAMS, is_params_placeholder, make_plan,
                                   stack_key, update_context)

# What happens to the second moment when the bases move: "project" it through
# the change of basis, V ← (P_L∘P_L) V (P_R∘P_R)ᵀ with P = U_new U_oldᵀ (each
# new direction's variance the mix of the old ones it is made of), or "keep" its
# entries (both bases are sorted by decreasing eigenvalue). On the byte-level
# LM, "keep" ends 0.3 nats worse (docs/algorithms.md §7).
MOMENT_ON_REFRESH = ("keep", "project")
# SOAP's bases: ShampooConfig's defaults but a 2 GiB working set, within which
# the rotations of an 86 M-param LM's largest block groups run whole instead of
# in a loop of two chunks; at batches of 8,192 and 32,768 tokens its mean step
# was shorter at the same peak memory (docs/benchmarks.md, "SOAP's moments in
# the block stacks' layout").
SOAP_CONFIG = ShampooConfig(working_set_bytes=2048 * MIB)
# Initial eigenvalues: an isotropic term leaves every eigenbasis unchanged and
# keeps the first orthonormalization well-posed on a rank-deficient G Gᵀ; it
# decays by the statistics' beta per refresh.
INITIAL_EIGENVALUE = 1e-6


class SoapState(NamedTuple):
  """State of :func:`scale_by_soap`.

  Attributes:
    count: steps taken (int32); steps whose gradient had a NaN/Inf are not
      counted.
    bases: one :class:`~optax_shampoo4.preconditioners.EigenBasis` stack per
      order ``"order_<n>"``.
    mu: first moments in the original basis, a
      :class:`~optax_shampoo4.block_moments.BlockMoment` (stored per
      ``AdamConfig`` in the block groups' layout; :func:`soap_moments` gives
      them shaped like the params).
    nu: second moments, likewise, in the rotated basis of each preconditioned
      tensor.
    nonfinite_count: steps skipped because a gradient leaf held NaN/Inf (int32).
    failure_count: basis updates rejected (non-finite or non-orthogonal) and
      kept as they were (int32).
  """

  count: jax.Array
  bases: Dict[str, Any]
  mu: Any
  nu: Any
  nonfinite_count: jax.Array
  failure_count: jax.Array

  # a refresh projects the second moment, which the same step then advances:
  # it cannot run apart from the step (host_schedule.update_preconditioners)
  preconditioner_fields = ()


def soap_moments(state: SoapState, params: Any,
                 config: ShampooConfig = SOAP_CONFIG):
  """``(mu, nu)`` of ``state`` as fp32 trees like ``params`` (arrays or
  ``jax.ShapeDtypeStruct`` s), with the blocking of ``config`` (the one the
  optimizer was built with)."""
  _checks.check_type("state", state, SoapState)
  plan, treedef, _ = make_plan(config, params)
  if not all(block_moments.fits(plan, m) for m in (state.mu, state.nu)):
    raise ValueError(
        "params and config must block like those the optimizer was built with: "
        "state's moments do not fit their blocking")
  return tuple(
      treedef.unflatten(block_moments.moment_leaves(plan, moment))
      for moment in (state.mu, state.nu))


def _init_bases(config: ShampooConfig, plan: blocking.Plan, hyper: Hyper):
  """Every order's stack of bases for ``plan`` (identity rows)."""
  return {
      stack_key(order):
          init_basis(
              make_codec(config, order), plan.stack_length(order), order, hyper)
      for order in plan.orders
  }


def _init_state(config: ShampooConfig, layout: MomentLayout, hyper: Hyper,
                params) -> SoapState:
  """Identity bases and zero moments for ``params``; :data:`NOT_PARAMS` leaves
  for the placeholder with which ``optax.tree.map_params`` probes a state."""
  counter = lambda: jnp.zeros([], jnp.int32)
  if is_params_placeholder(params):
    return SoapState(counter(), NOT_PARAMS, NOT_PARAMS, NOT_PARAMS, counter(),
                     counter())
  plan, _, _ = make_plan(config, params)
  return SoapState(counter(), _init_bases(config, plan, hyper),
                   block_moments.zeros(layout, plan, second=False),
                   block_moments.zeros(layout, plan, second=True), counter(),
                   counter())


def _refresh_when_due(rotation: Rotation, bases, grad_groups, nu_groups,
                      hyper: Hyper, due, project: bool, scheduled=None):
  """``(bases, V blocks, failures)`` after the basis refresh that ``due``
  asks for: Shampoo's statistics step, with ``V`` projected onto the new bases
  when ``project``. One conditional per step (XLA:GPU waits on each predicate;
  see :func:`optax_shampoo4.shampoo.update_when_due`), none when the host
  schedules the refresh (``scheduled``, a Python bool): a scheduled refresh is
  kept where ``due`` (then the step's finiteness) holds."""

  def refresh(bases, nu_groups):
    new_bases, failures = update_statistics(rotation.stacks, bases, grad_groups,
                                            hyper)
    if project:
      nu_groups = rotation.project(nu_groups, new_bases, bases)
    return new_bases, nu_groups, failures

  unchanged = lambda b, v: (b, v, jnp.zeros([], jnp.int32))
  return run_when_due(due, refresh, unchanged, (bases, nu_groups), scheduled)


def _check_arguments(arguments: Dict[str, Any]) -> None:
  """The checks of :func:`scale_by_soap`'s arguments (its ``locals()``)."""
  config, moments = arguments["config"], arguments["moments"]
  _checks.check_type("config", config, ShampooConfig)
  _checks.check_type("moments", moments, AdamConfig)
  if config.storage != "eigenvectors":
    raise ValueError(
        "config.storage must be 'eigenvectors' for SOAP (its bases), got "
        f"{config.storage!r}")
  if moments.second_moment == "factored" or moments.implementation != "xla":
    raise ValueError(
        "moments: SOAP stores rank-1 or block-wise moments on the XLA path, "
        f"got second_moment={moments.second_moment!r}, "
        f"implementation={moments.implementation!r}")
  _checks.check_adam_constants(arguments["b1"], arguments["b2"],
                               arguments["eps"])
  if arguments["shampoo_beta"] is not None:
    _checks.check_number("shampoo_beta", arguments["shampoo_beta"], 0.0, 1.0,
                         high_open=True)
  _checks.check_interval("precondition_every", arguments["precondition_every"])
  _checks.check_choice("moment_on_refresh", arguments["moment_on_refresh"],
                       MOMENT_ON_REFRESH)


def _load_moments(plan, state, gradients, b1):
  """``(M, V)``, each ``(group stacks, leaves)`` in fp32 (the leaves ``None``
  where the tensor is in the groups): ``M`` already advanced by this step's
  gradient (in the original basis), ``V`` as stored (its update happens per
  block, in the rotated basis). ``gradients`` is ``(leaves, group stacks)``."""
  grads, grad_groups = gradients
  mu_groups, mu_leaves = block_moments.load(plan, state.mu)
  advance = lambda m, g: None if m is None else b1 * m + (1.0 - b1) * g
  mu = ([advance(m, g) for m, g in zip(mu_groups, grad_groups)],
        [advance(m, g) for m, g in zip(mu_leaves, grads)])
  return mu, block_moments.load(plan, state.nu)


def _store_moments(layout, plan, state, moments, finite):
  """The stored ``(mu, nu)`` of the new state: the old ones unless
  ``finite``."""
  mu, nu = moments
  new_mu = block_moments.store(layout, plan, *mu, second=False)
  new_nu = block_moments.store(layout, plan, *nu, second=True)
  return (where_finite(finite, new_mu,
                       state.mu), where_finite(finite, new_nu, state.nu))


def _plain_adam(plan, grads, mu, nu, constants):
  """Adam's second moments and updates of the tensors without a
  preconditioner (None for the others, which come from the block groups)."""
  b2, eps, corrections = constants
  plain = [layout is None for layout in plan.layouts]
  nu = [
      b2 * v + (1.0 - b2) * g * g if p else None
      for v, g, p in zip(nu, grads, plain)
  ]
  updates = [
      (m / corrections[0]) / (jnp.sqrt(v / corrections[1]) + eps) if p else None
      for m, v, p in zip(mu, nu, plain)
  ]
  return nu, updates


def _rotated_adam(rotation: Rotation, bases, gradients, moments, constants):
  """``(update leaves, V)``: Adam in the bases for the blocked tensors (``V``
  in the rotated basis), plain Adam for the others.

  ``gradients`` is ``(leaves, group stacks)``, and ``moments`` ``(M, V)`` as
  :func:`_load_moments` gives them, all fp32; ``V`` comes back in that form.
  """
  plan = rotation.stacks.plan
  (grads, grad_groups), (mu, nu) = gradients, moments
  with jax.named_scope("soap_rotated_adam"):
    group_updates, nu_groups = rotation.apply(
        list(zip(grad_groups, mu[0], nu[0])), bases, constants)
  nu_leaves, plain_updates = _plain_adam(plan, grads, mu[1], nu[1], constants)
  return blocking.to_leaves(plan, group_updates,
                            plain_updates), (nu_groups, nu_leaves)


def scale_by_soap(
    b1: float = 0.95,
    b2: float = 0.95,
    eps: float = 1e-8,
    *,
    config: ShampooConfig = SOAP_CONFIG,
    moments: AdamConfig = AdamConfig(bits=8),
    precondition_every: int = 10,
    shampoo_beta: Optional[float] = None,
    moment_on_refresh: str = "project",
) -> optax.GradientTransformationExtraArgs:
  """Adam in the eigenbasis of Shampoo's statistics (SOAP), with quantized bases
  and moments.

  Args:
    b1: decay of the first moment (default 0.95; see :func:`soap` for 0.9).
    b2: decay of the second moment (default 0.95).
    eps: added to ``√V̂`` in the denominator (default 1e-8).
    config: the bases' structure: ``bits`` (4: linear-2, 8 or 32), Björck
      steps, blocking, ``dimension_numbers``, working set, sharding;
      ``storage`` must be ``"eigenvectors"``. Default :data:`SOAP_CONFIG`.
    moments: how ``M`` and ``V`` are stored (``AdamConfig(bits=4|8|32,
      second_moment="rank1"|"block")``); default 8-bit: at 4 bits the moments
      lose most of what the rotation gains on the byte-level LM
      (``docs/algorithms.md`` §7), at 8 bits they keep it.
    precondition_every: steps between basis updates ``f`` (default 10, the
      paper's); the first is at step ``f``, and until then the update is
      Adam's. On the byte-level LM of ``docs/benchmarks.md`` ("SOAP's refresh
      interval") 20 reached AdamW's loss sooner in wall-clock at a slightly
      higher final loss, and 40 lost SOAP's gain.
    shampoo_beta: EMA factor of the statistics (default: ``b2``).
    moment_on_refresh: ``"project"`` (default) or ``"keep"`` the second moment
      when the bases move (``docs/algorithms.md`` §7 has the measurement behind
      the default).

  The numeric arguments may be traced (``optax.inject_hyperparams``); the
  configs are static. ``update`` takes an optional keyword
  ``preconditioner_due=(refresh, _)``, Python bools from the training loop:
  the first replaces ``precondition_every`` and the conditional that applies
  it (:mod:`optax_shampoo4.host_schedule`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SoapState`.
  """
  _check_arguments(locals())
  layout = MomentLayout.from_config(moments)
  hyper = Hyper(b2 if shampoo_beta is None else shampoo_beta,
                INITIAL_EIGENVALUE, 0.0)
  init_fn = functools.partial(_init_state, config, layout, hyper)

  def update_fn(updates, state, params=None, **extra_args):
    del params
    scheduled = scheduled_due(extra_args)
    plan, treedef, leaves, stacks, step, finite = update_context(
        config, updates, state.count)
    grads = [x.astype(jnp.float32) for x in leaves]
    gradients = (grads, blocking.to_groups(plan, grads))
    mu, (nu_groups, nu_leaves) = _load_moments(plan, state, gradients, b1)
    rotation = Rotation(stacks, config.preconditioning_precision or "high")
    # the host's schedule replaces the interval: then only finiteness gates
    due = finite & due_at(step, precondition_every) if scheduled is None else (
        finite)
    with jax.named_scope("soap_refresh"):
      bases, nu_groups, failures = _refresh_when_due(
          rotation, state.bases, gradients[1], nu_groups, hyper, due,
          moment_on_refresh == "project",
          None if scheduled is None else scheduled[0])
    bases = stacks.constrain_all(bases)

    # an integer power, as optax.scale_by_adam takes it: a float power rounds
    # differently when the betas are traced (optax.inject_hyperparams) than when
    # they are constants
    corrections = (1.0 - b1**step, 1.0 - b2**step)
    outputs, nu = _rotated_adam(rotation, bases, gradients,
                                (mu, (nu_groups, nu_leaves)),
                                (b2, eps, corrections))
    new_mu, new_nu = _store_moments(layout, plan, state, (mu, nu), finite)
    new_state = SoapState(bases=bases, mu=new_mu, nu=new_nu,
                          failure_count=state.failure_count + failures,
                          **step_counters(state, step, finite))
    return treedef.unflatten(
        [u.astype(x.dtype) for u, x in zip(outputs, leaves)]), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
