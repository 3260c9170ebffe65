"""Shampoo with 4-bit (or 8-/32-bit) preconditioner states, as an Optax
transformation.

``scale_by_shampoo`` turns the gradient ``G`` of every matrix-shaped parameter
into the grafted, preconditioned gradient ``G̃ = Ĝ · ‖G‖_F / ‖Ĝ‖_F`` with ``Ĝ =
L^{-1/4} G R^{-1/4}`` per block, to be followed by a base optimizer (see
:mod:`optax_shampoo4.alias`). Other parameters pass through. How the statistics
and roots are stored is the storage's business
(:mod:`optax_shampoo4.preconditioners`); how tensors become blocks is
:mod:`optax_shampoo4.blocking`'s. The algorithm is ``docs/algorithms.md`` §2–3.

References:
  [S4] Wang, Zhou, Li, Huang. *4-bit Shampoo for Memory-Efficient Network
  Training.* NeurIPS 2024. [CQ] Li, Ding, Toh, Zhou. *Memory-Efficient 4-bit
  Preconditioned Stochastic Optimization.* arXiv 2412.10663. Gupta, Koren,
  Singer. *Shampoo: Preconditioned Stochastic Tensor Optimization.* ICML 2018.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_shampoo4 import _checks, blocking, chunks, linalg
from optax_shampoo4.config import ShampooConfig
from optax_shampoo4.host_schedule import due_at, run_when_due, scheduled_due
from optax_shampoo4.nonfinite import step_counters
from optax_shampoo4.preconditioners import Hyper, make_storage
from optax_shampoo4.stacks import (NOT_PARAMS, Stacks, is_params_placeholder,
                                   make_plan, stack_key, update_context)

# fp32 order × order buffers one preconditioner's update holds at once
# (statistic, basis, products, the orthonormalization's passes), and one block's
# product (two roots, the block and its product).
UPDATE_FP32_COPIES = 10
PRODUCT_FP32_COPIES = 4


class ShampooState(NamedTuple):
  """State of :func:`scale_by_shampoo`.

  Attributes:
    count: steps taken (int32); steps whose gradient had a NaN/Inf are not
      counted.
    preconditioners: one entry per preconditioner order ``"order_<n>"``, a stack
      of ``k`` preconditioners (an :class:`EigenPreconditioner`,
      :class:`MatrixPreconditioner` or :class:`CholeskyPreconditioner`).
    nonfinite_count: steps skipped because a gradient leaf held NaN/Inf (int32).
    failure_count: preconditioner updates rejected (non-finite or non-orthogonal
      result) and replaced by the previous preconditioner (int32).
  """

  count: jax.Array
  preconditioners: Dict[str, Any]
  nonfinite_count: jax.Array
  failure_count: jax.Array

  # what a preconditioner update changes (host_schedule.update_preconditioners)
  preconditioner_fields = ("preconditioners", "failure_count")


def update_statistics(stacks: Stacks, preconditioners, group_blocks,
                      hyper: Hyper):
  """Every order's statistics from this step's gradient blocks, chunk by chunk;
  ``(new, failures)``."""
  new, failures = {}, jnp.zeros([], jnp.int32)
  for order in stacks.plan.orders:
    numerics = stacks.numerics(order)
    storage = make_storage(stacks.config, order, numerics)
    eye = jnp.eye(order, dtype=jnp.float32)

    def chunk_update(stack, oriented, padding):
      grams = jnp.where(padding[:, None, None], eye,
                        linalg.gram(oriented, numerics))
      return storage.update_statistics(stack, grams, hyper)

    padding = jnp.asarray(blocking.padding_slots(stacks.plan, order))
    stack = stacks.constrain(preconditioners[stack_key(order)], order)
    updated, ok = chunks.map_chunks(chunk_update,
                                    stacks.chunk(order,
                                                 UPDATE_FP32_COPIES), stack,
                                    stacks.oriented(order, group_blocks),
                                    padding)
    new[stack_key(order)] = stacks.constrain(updated, order)
    failures += jnp.sum(~ok)
  return new, failures


def update_inverse_roots(stacks: Stacks, preconditioners, hyper: Hyper):
  """Every order's inverse roots, chunk by chunk; ``(new, failures)``."""
  new, failures = {}, jnp.zeros([], jnp.int32)
  for order in stacks.plan.orders:
    storage = make_storage(stacks.config, order, stacks.numerics(order))
    stack = stacks.constrain(preconditioners[stack_key(order)], order)
    updated, ok = chunks.map_chunks(
        lambda s: storage.update_inverse_root(s, hyper),
        stacks.chunk(order, UPDATE_FP32_COPIES), stack)
    new[stack_key(order)] = stacks.constrain(updated, order)
    failures += jnp.sum(~ok)
  return new, failures


def precondition(stacks: Stacks, preconditioners,
                 group_blocks) -> Sequence[jax.Array]:
  """``L̂ G R̂`` for every block group. The stored roots are sliced per group
  before they are dequantized (sharded stacks then move codes, not fp32
  matrices), and a group larger than the working set runs in chunks, so that no
  fp32 copy of all roots exists at once."""
  plan, precision = stacks.plan, product_precision(stacks.config)
  stored = {
      order: preconditioners[stack_key(order)].inverse_root
      for order in plan.orders
  }
  out = []
  for g, group, (left, right) in zip(group_blocks, plan.groups,
                                     blocking.group_slices(plan, stored)):
    load_left = make_storage(stacks.config, group.rows).load
    load_right = make_storage(stacks.config, group.cols).load

    def product(g, left, right):
      return linalg.product(
          linalg.product(load_left(left), g, precision), load_right(right),
          precision)

    chunk = stacks.chunk(
        max(group.rows, group.cols), PRODUCT_FP32_COPIES, len(group.blocks))
    out.append(chunks.map_chunks(product, chunk, g, left, right))
  return out


def graft(plan: blocking.Plan, group_blocks: Sequence[jax.Array],
          preconditioned: Sequence[jax.Array]) -> List[jax.Array]:
  """Every group's preconditioned blocks rescaled so that each tensor's
  preconditioned gradient has its gradient's Frobenius norm, ``Ĝ ·
  ‖G‖_F / ‖Ĝ‖_F`` per whole tensor.

  A tensor's squared norm is the sum of its blocks' (the blocks partition it),
  so the norms take one reduction per block group and one segment sum, instead
  of two reductions per tensor.
  """
  if not plan.groups:
    return []
  leaf_ids = [np.array([b.leaf for b in g.blocks]) for g in plan.groups]
  segments = np.concatenate(leaf_ids)
  count = len(plan.layouts)

  def tensor_norms(groups):
    squares = jnp.concatenate(
        [jnp.sum(jnp.square(x), axis=(1, 2)) for x in groups])
    return jnp.sqrt(jax.ops.segment_sum(squares, segments, count))

  scale = tensor_norms(group_blocks) / (tensor_norms(preconditioned) + 1e-12)
  return [
      x * scale[ids][:, None, None] for x, ids in zip(preconditioned, leaf_ids)
  ]


def product_precision(config: ShampooConfig) -> str:
  """The precision name of Shampoo's per-step ``L̂ G R̂`` (see
  ``ShampooConfig.preconditioning_precision``)."""
  if config.preconditioning_precision is not None:
    return config.preconditioning_precision
  return "bf16" if config.bits != 32 and jax.default_backend(
  ) != "cpu" else "high"


def init_preconditioners(config: ShampooConfig, params, hyper: Hyper):
  """Every order's stack of preconditioners for ``params``."""
  plan, _, _ = make_plan(config, params)
  return {
      stack_key(order):
          make_storage(config,
                       order).init(plan.stack_length(order), order, hyper)
      for order in plan.orders
  }


def update_when_due(stacks: Stacks, preconditioners, group_blocks, hyper: Hyper,
                    due, scheduled=None):
  """The statistics and inverse-root updates that ``due = (statistics, roots)``
  asks for; ``(preconditioners, failures)``.

  XLA:GPU copies every conditional's predicate to the host and waits for it,
  which drains the launch queue: a plain step reads one predicate (the outer
  conditional), and each expensive branch is traced once. With the host's
  ``scheduled = (statistics, roots)`` (Python bools;
  :mod:`optax_shampoo4.host_schedule`) there is no conditional: the scheduled
  updates run, and are kept where ``due`` holds (both entries then the step's
  gate: a NaN/Inf gradient, or a step before ``start_step``, keeps the old
  preconditioners).
  """
  unchanged = lambda p: (p, jnp.zeros([], jnp.int32))
  statistics = lambda p: update_statistics(stacks, p, group_blocks, hyper)
  roots = lambda p: update_inverse_roots(stacks, p, hyper)
  if scheduled is None:
    inner, flags, any_flag = due, (None, None), None
  else:  # the outer select alone gates; a statically true select compiles away
    inner, flags, any_flag = (True, True), scheduled, any(scheduled)

  def update_due(preconditioners):
    preconditioners, stat_failures = run_when_due(inner[0], statistics,
                                                  unchanged, (preconditioners,),
                                                  flags[0])
    preconditioners, root_failures = run_when_due(inner[1], roots, unchanged,
                                                  (preconditioners,), flags[1])
    return preconditioners, stat_failures + root_failures

  return run_when_due(due[0] | due[1], update_due, unchanged,
                      (preconditioners,), any_flag)


def precondition_and_graft(stacks: Stacks, preconditioners, group_blocks,
                           leaves: Sequence[jax.Array]) -> List[jax.Array]:
  """Every leaf's Shampoo output in the leaf's dtype: its blocks
  preconditioned, grafted per tensor, and put back together (leaves without a
  preconditioner pass through)."""
  with jax.named_scope("shampoo_precondition"):
    preconditioned = precondition(stacks, preconditioners, group_blocks)
  with jax.named_scope("shampoo_graft"):
    grafted = graft(stacks.plan, group_blocks, preconditioned)
    outputs = blocking.to_leaves(stacks.plan, grafted, leaves)
  return [y.astype(x.dtype) for y, x in zip(outputs, leaves)]


def _check_arguments(arguments: Dict[str, Any]) -> None:
  """The checks of :func:`scale_by_shampoo`'s arguments (its ``locals()``)."""
  _checks.check_type("config", arguments["config"], ShampooConfig)
  for name in ("statistics_every", "inverse_root_every", "start_step"):
    _checks.check_interval(name, arguments[name])
  _checks.check_number("beta", arguments["beta"], 0.0, 1.0, high_open=True)
  _checks.check_number("epsilon", arguments["epsilon"], 0.0, low_open=True)
  _checks.check_number("error_feedback_beta", arguments["error_feedback_beta"],
                       0.0, 1.0, high_open=True)


def scale_by_shampoo(
    config: ShampooConfig = ShampooConfig(),
    *,
    statistics_every: int = 100,
    inverse_root_every: int = 500,
    beta: float = 0.95,
    epsilon: float = 1e-6,
    start_step: int = 1,
    error_feedback_beta: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
  """Shampoo preconditioning with quantized preconditioner states [S4][CQ], to
  chain before a base optimizer.

  Every step, each parameter with at least two non-unit axes is viewed as
  matrices (:mod:`optax_shampoo4.blocking`), cut into blocks of at most
  ``config.max_order``, and each block ``G`` becomes ``L̂ G R̂`` with ``L̂ ≈
  L^{-1/4}``, ``R̂ ≈ R^{-1/4}``; the result is grafted per tensor to ``‖G‖_F``.
  Until the first inverse-root step ``L̂ = R̂ = I``, so the output equals the
  gradient: a run shorter than ``inverse_root_every`` steps is its base
  optimizer alone.

  Args:
    config: the structure (bits, storage, blocking, working set, sharding); see
      :class:`ShampooConfig`.
    statistics_every: steps between statistics updates ``T1`` (the gradient of
      that step only).
    inverse_root_every: steps between inverse-root updates ``T2``. The
      defaults 100/500 reached AdamW's loss soonest on an 86 M-param LM; on a
      small CNN 20/100 did (``docs/benchmarks.md``, "Choosing the default
      intervals").
    beta: EMA factor of the statistics (default 0.95).
    epsilon: relative damping ``ε`` of the inverse roots, ``(λ +
      ε·λmax)^{-1/4}`` (default 1e-6).
    start_step: no preconditioner update before this step.
    error_feedback_beta: ``"cholesky"`` storage only: EMA factor ``β_e`` of the
      error state.

  The numeric arguments may be traced (``optax.inject_hyperparams``); ``config``
  is static. ``update`` takes an optional keyword ``preconditioner_due=
  (statistics, roots)``, Python bools from the training loop, which replaces
  the two intervals and the conditional that applies them
  (:mod:`optax_shampoo4.host_schedule`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ShampooState`.
  """
  _check_arguments(locals())
  hyper = Hyper(beta, epsilon, error_feedback_beta)
  # distinct buffers: the state may be donated
  counter = lambda: jnp.zeros([], jnp.int32)

  def init_fn(params):
    if is_params_placeholder(params):
      return ShampooState(counter(), NOT_PARAMS, counter(), counter())
    return ShampooState(counter(), init_preconditioners(config, params, hyper),
                        counter(), counter())

  def update_fn(updates, state, params=None, **extra_args):
    del params
    scheduled = scheduled_due(extra_args)
    plan, treedef, leaves, stacks, step, finite = update_context(
        config, updates, state.count)
    with jax.named_scope("shampoo_blocks"):
      group_blocks = blocking.to_groups(plan,
                                        [x.astype(jnp.float32) for x in leaves])
    active = finite & (step >= start_step)
    if scheduled is None:
      due = (active & due_at(step, statistics_every),
             active & due_at(step, inverse_root_every))
    else:  # the host's schedule replaces the intervals: only ``active`` gates
      due = (active, active)
    # The named scopes label these steps in profiles (benchmarks/step_trace.py).
    with jax.named_scope("shampoo_update_preconditioners"):
      preconditioners, failures = update_when_due(stacks, state.preconditioners,
                                                  group_blocks, hyper, due,
                                                  scheduled)
    preconditioners = stacks.constrain_all(preconditioners)
    outputs = precondition_and_graft(stacks, preconditioners, group_blocks,
                                     leaves)
    new_state = ShampooState(preconditioners=preconditioners,
                             failure_count=state.failure_count + failures,
                             **step_counters(state, step, finite))
    return jax.tree.unflatten(treedef, outputs), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
