"""Ready-made optimizers, composed like ``optax.adamw``: a scaling, weight
decay, the learning rate.

Structure goes in the config objects
(:class:`~optax_shampoo4.config.ShampooConfig`,
:class:`~optax_shampoo4.config.AdamConfig`); every numeric argument may be
scheduled or logged with plain ``optax.inject_hyperparams(alias)(...)``. Under
the default ``skip_nonfinite=True`` a step whose gradient holds a NaN/Inf
changes neither the params nor any state but the counters
(:mod:`~optax_shampoo4.nonfinite`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Union

import jax
import optax

from optax_shampoo4 import _checks, fused, nonfinite
from optax_shampoo4.adam import ScaleByAdam4bitState, scale_by_adam_4bit
from optax_shampoo4.config import AdamConfig, ShampooConfig
from optax_shampoo4.shampoo import ShampooState, scale_by_shampoo
from optax_shampoo4.soap import SOAP_CONFIG, SoapState, scale_by_soap

ScalarOrSchedule = Union[float, optax.Schedule]
MaskOrFn = Optional[Union[Any, Callable[[optax.Params], Any]]]
FP32_ADAM = AdamConfig(bits=32)


def _adam(b1, b2, eps, config: AdamConfig):
  if config.is_plain_adam:
    # optax.scale_by_adam checks nothing (scale_by_adam_4bit does): a b1 of 1.5
    # would diverge silently
    _checks.check_adam_constants(b1, b2, eps)
    return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  return scale_by_adam_4bit(b1=b1, b2=b2, eps=eps, config=config)


def _check_alias(learning_rate, weight_decay, skip_nonfinite):
  if not callable(learning_rate):
    _checks.check_number("learning_rate", learning_rate, 0.0)
  _checks.check_number("weight_decay", weight_decay, 0.0)
  _checks.check_bool("skip_nonfinite", skip_nonfinite)


def _keep_update_dtypes(tx):
  """``tx`` whose updates keep the gradients' dtypes. Under
  ``inject_hyperparams`` the learning rate and weight decay are float32 arrays,
  which promote bf16 updates to float32."""

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, state = tx.update(updates, state, params, **extra_args)
    return jax.tree.map(lambda u, g: u.astype(g.dtype), new_updates,
                        updates), state

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def _finalize(tx, skip_nonfinite: bool):
  if not skip_nonfinite:
    return tx
  # These states keep themselves on a NaN/Inf gradient: Shampoo's and SOAP's
  # come first in their chains, and 4-bit Adam sees either the gradient or
  # Shampoo's output of it, non-finite with it. A select on them would add
  # kernels to every step (on the GPU, the host then spends longer updating the
  # step's command buffers than the kernels take).
  return nonfinite.skip_nonfinite(
      _keep_update_dtypes(tx),
      keeps_own_state=(ShampooState, SoapState, ScaleByAdam4bitState))


def adamw_4bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    mask: MaskOrFn = None,
    config: AdamConfig = AdamConfig(),
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """AdamW with 4-bit moments [A4]: ``scale_by_adam_4bit`` + decoupled weight
  decay + learning rate.

  Args:
    learning_rate: a float or an Optax schedule.
    b1, b2, eps: Adam's constants.
    weight_decay: decoupled weight decay (``p ← p − lr·wd·p``), default 1e-4.
    mask: which params get weight decay (a pytree of bools or a function of the
      params), as in optax.
    config: the moments' storage: ``AdamConfig(bits=4|8|32,
      second_moment="rank1"|"block"|"factored", ...)``; ``"factored"`` is 4-bit
      Factor [A4]. With ``implementation="pallas"`` (GPU kernels) the result
      also has a fused step that applies the update inside the kernels:
      :func:`~optax_shampoo4.fused_step`,
      :func:`~optax_shampoo4.apply_gradients`.
    skip_nonfinite: skip a step whose gradient holds a NaN/Inf (default;
      :mod:`~optax_shampoo4.nonfinite`).

  Optimizer state: about 1.03–1.06 bytes per parameter (0.53 for ``"factored"``)
  instead of 8.

  Examples:
    >>> import optax, optax_shampoo4 as o4, jax.numpy as jnp
    >>> tx = o4.adamw_4bit(1e-3, config=o4.AdamConfig(second_moment="factored"))
    >>> state = tx.init({"w": jnp.ones((64, 128))})
  """
  _check_alias(learning_rate, weight_decay, skip_nonfinite)
  tx = _finalize(
      optax.chain(
          scale_by_adam_4bit(b1=b1, b2=b2, eps=eps, config=config),
          optax.add_decayed_weights(weight_decay, mask),
          optax.scale_by_learning_rate(learning_rate),
      ), skip_nonfinite)
  if config.implementation != "pallas" or config.second_moment == "factored":
    return tx
  return fused.with_fused_step(
      tx,
      fused.adamw_4bit_step(learning_rate, b1, b2, eps, weight_decay, mask,
                            config))


# scale_by_shampoo's numbers: top-level arguments of the aliases too, so that
# plain optax.inject_hyperparams traces them
SHAMPOO_NUMBERS = ("statistics_every", "inverse_root_every", "beta", "epsilon",
                   "start_step", "error_feedback_beta")


def _scale_by_shampoo(arguments: Dict[str, Any]):
  """:func:`scale_by_shampoo` from an alias's arguments (its ``locals()``)."""
  return scale_by_shampoo(arguments["shampoo"],
                          **{name: arguments[name] for name in SHAMPOO_NUMBERS})


def shampoo_adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.05,
    *,
    mask: MaskOrFn = None,
    shampoo: ShampooConfig = ShampooConfig(),
    adam: AdamConfig = FP32_ADAM,
    statistics_every: int = 100,
    inverse_root_every: int = 500,
    beta: float = 0.95,
    epsilon: float = 1e-6,
    start_step: int = 1,
    error_feedback_beta: float = 0.0,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Shampoo-preconditioned AdamW [S4]: grafted Shampoo direction → Adam →
  decoupled weight decay → lr.

  Args:
    learning_rate: a float or an Optax schedule (Adam's learning rates transfer
      through grafting).
    b1, b2, eps: Adam's constants.
    weight_decay: decoupled weight decay (default 0.05, [S4]).
    mask: weight-decay mask, as in ``optax.adamw``.
    shampoo: the preconditioners' structure, :class:`ShampooConfig` (default:
      4-bit eigenvectors).
    adam: Adam's moments, :class:`AdamConfig` (default fp32, i.e.
      ``optax.scale_by_adam``; ``AdamConfig()`` makes the whole state 4-bit).
    statistics_every, inverse_root_every, beta, epsilon, start_step,
      error_feedback_beta: see :func:`scale_by_shampoo`.
    skip_nonfinite: skip a step whose gradient holds a NaN/Inf (default;
      :mod:`~optax_shampoo4.nonfinite`).

  Examples:
    >>> import optax, optax_shampoo4 as o4
    >>> # everything 4-bit
    >>> tx = o4.shampoo_adamw(1e-3, adam=o4.AdamConfig(bits=4))
    >>> tx = optax.inject_hyperparams(o4.shampoo_adamw)(learning_rate=1e-3)
  """
  _check_alias(learning_rate, weight_decay, skip_nonfinite)
  _checks.check_type("adam", adam, AdamConfig)
  return _finalize(
      optax.chain(
          _scale_by_shampoo(locals()),
          _adam(b1, b2, eps, adam),
          optax.add_decayed_weights(weight_decay, mask),
          optax.scale_by_learning_rate(learning_rate),
      ), skip_nonfinite)


def shampoo_sgdm(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 5e-4,
    *,
    mask: MaskOrFn = None,
    shampoo: ShampooConfig = ShampooConfig(),
    statistics_every: int = 100,
    inverse_root_every: int = 500,
    beta: float = 0.95,
    epsilon: float = 1e-6,
    start_step: int = 1,
    error_feedback_beta: float = 0.0,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Shampoo-preconditioned SGD with momentum [S4]: grafted direction + L2 decay
  → momentum → lr.

  The L2 term ``wd·p`` is added after grafting and before momentum, as in [S4].

  Args:
    learning_rate: a float or an Optax schedule ([S4]: 0.1).
    momentum: heavy-ball momentum (default 0.9).
    nesterov: use Nesterov momentum.
    weight_decay: L2 coefficient (default 5e-4).
    mask: weight-decay mask.
    shampoo: the preconditioners' structure, :class:`ShampooConfig`.
    statistics_every, inverse_root_every, beta, epsilon, start_step,
      error_feedback_beta: see :func:`scale_by_shampoo`.
    skip_nonfinite: skip a step whose gradient holds a NaN/Inf (default;
      :mod:`~optax_shampoo4.nonfinite`).
  """
  _check_alias(learning_rate, weight_decay, skip_nonfinite)
  _checks.check_number("momentum", momentum, 0.0, 1.0, high_open=True)
  return _finalize(
      optax.chain(
          _scale_by_shampoo(locals()),
          optax.add_decayed_weights(weight_decay, mask),
          optax.trace(decay=momentum, nesterov=nesterov),
          optax.scale_by_learning_rate(learning_rate),
      ), skip_nonfinite)


def soap(
    learning_rate: ScalarOrSchedule = 3e-3,
    b1: float = 0.95,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    *,
    mask: MaskOrFn = None,
    config: ShampooConfig = SOAP_CONFIG,
    moments: AdamConfig = AdamConfig(bits=8),
    precondition_every: int = 10,
    shampoo_beta: Optional[float] = None,
    moment_on_refresh: str = "project",
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """SOAP (Adam in Shampoo's eigenbasis) with 4-bit bases and 8-bit moments by
  default, composed like
  ``optax.adamw``: :func:`~optax_shampoo4.soap.scale_by_soap` → decoupled weight
  decay → lr. No grafting: Adam's hyperparameters apply unchanged.

  Args:
    learning_rate: a float or an Optax schedule (default 3e-3, the SOAP
      paper's).
    b1, b2, eps: Adam's constants (defaults 0.95, 0.95, 1e-8, the paper's).
      ``b1=0.9`` did better on the byte-level LM at both batches measured:
      at 32,768 tokens a step it reached AdamW's loss at two thirds of its
      steps and 0.95 did not reach it, and at 8,192 it ended 0.03 lower
      (``docs/benchmarks.md``, "At four times the batch").
    weight_decay: decoupled weight decay (default 0.01).
    mask: weight-decay mask, as in ``optax.adamw``.
    config: the bases, :class:`ShampooConfig` (default
      :data:`~optax_shampoo4.soap.SOAP_CONFIG`: 4-bit eigenvectors and a
      2 GiB working set, twice Shampoo's, within which the byte-level LM's
      rotations run whole; at 32,768 tokens a step its mean step was 1.17–1.18×
      AdamW's against 1.20× at 1 GiB, at the same peak memory;
      ``docs/benchmarks.md``, "SOAP's moments in the block stacks' layout").
      A config you pass keeps its own working set (``ShampooConfig``'s
      default is 1 GiB). ``bits=32`` is fp32 SOAP.
    moments: the moments, :class:`AdamConfig` (default 8-bit;
      ``AdamConfig(bits=4)`` for the smallest state, which on the byte-level LM
      gives back most of SOAP's gain; ``AdamConfig(bits=32)`` for fp32).
    precondition_every, shampoo_beta, moment_on_refresh: see
      :func:`~optax_shampoo4.soap.scale_by_soap`. A loop that schedules the
      refresh (:mod:`~optax_shampoo4.host_schedule`) can refresh every 10
      steps early and every 20 later; on the byte-level LM that reached AdamW's
      loss at the same step as every 10 throughout, with cheaper steps
      (``docs/benchmarks.md``, "At four times the batch").
    skip_nonfinite: skip a step whose gradient holds a NaN/Inf (default;
      :mod:`~optax_shampoo4.nonfinite`).

  Examples:
    >>> import optax, optax_shampoo4 as o4
    >>> tx = o4.soap(1e-3)  # 4-bit bases, 8-bit moments
    >>> # fp32 SOAP
    >>> tx = o4.soap(3e-3, config=o4.ShampooConfig(bits=32),
    ...              moments=o4.AdamConfig(bits=32))
  """
  _check_alias(learning_rate, weight_decay, skip_nonfinite)
  return _finalize(
      optax.chain(
          scale_by_soap(b1, b2, eps, config=config, moments=moments,
                        precondition_every=precondition_every,
                        shampoo_beta=shampoo_beta,
                        moment_on_refresh=moment_on_refresh),
          optax.add_decayed_weights(weight_decay, mask),
          optax.scale_by_learning_rate(learning_rate),
      ), skip_nonfinite)
