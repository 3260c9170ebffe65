"""Ready-made optimizers, composed like ``optax.adamw``: a scaling, weight decay, the learning rate."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import optax

from optax_shampoo4.adam import ApplyStep, adam_4bit_functions, scale_by_adam_4bit
from optax_shampoo4.shampoo import check_number, scale_by_shampoo

ScalarOrSchedule = Union[float, optax.Schedule]

# Arguments that define shapes, storage layouts or Python control flow. Under ``optax.inject_hyperparams``
# they must be static: ``optax.inject_hyperparams(shampoo_adamw, static_args=STATIC_ARGS)(...)``. Every
# other numeric argument (learning rate, b1, b2, eps, weight decay, beta, epsilon, error_feedback_beta and
# the intervals statistics_every / inverse_root_every) may be a traced hyperparameter.
STATIC_ARGS = ("bits", "adam_bits", "block_size", "max_order", "min_quantized_size", "bjorck_steps", "start_step",
               "shard_blocks", "replicate_roots", "error_feedback", "skip_nonfinite", "quantize", "codebook",
               "second_moment", "inverse_root_method", "preconditioning_precision", "linalg_precision", "nesterov",
               "implementation", "packed")


def inject_hyperparams(factory: Callable[..., optax.GradientTransformation], **kwargs):
  """``optax.inject_hyperparams`` for this library's factories, with their :data:`STATIC_ARGS` kept static.

  Example: ``inject_hyperparams(shampoo_adamw)(learning_rate=1e-3, beta=0.9)``; the state's
  ``hyperparams`` then hold the learning rate, betas, epsilons and intervals as arrays.
  """
  import inspect
  names = inspect.signature(factory).parameters
  static = tuple(name for name in STATIC_ARGS if name in names) + tuple(kwargs.pop("static_args", ()))
  return optax.inject_hyperparams(factory, static_args=static, **kwargs)
MaskOrFn = Optional[Union[Any, Callable[[optax.Params], Any]]]


def _adam(b1, b2, eps, bits, second_moment):
  if bits == 32 and second_moment == "rank1":
    return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  return scale_by_adam_4bit(b1=b1, b2=b2, eps=eps, bits=bits, second_moment=second_moment)


def _check_alias(learning_rate, weight_decay, momentum=None, skip_nonfinite=False):
  if not callable(learning_rate):
    check_number("learning_rate", learning_rate, 0.0)
  check_number("weight_decay", weight_decay, 0.0)
  if momentum is not None:
    check_number("momentum", momentum, 0.0, 1.0, high_open=True)
  if not isinstance(skip_nonfinite, bool):
    raise TypeError(f"skip_nonfinite must be a bool, got {type(skip_nonfinite).__name__}")


def _finalize(tx, skip_nonfinite: bool):
  # apply_if_finite zeroes the whole update and leaves every inner state untouched on a NaN/Inf step.
  return optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1) if skip_nonfinite else tx


def adamw_4bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    mask: MaskOrFn = None,
    bits: int = 4,
    second_moment: str = "rank1",
    skip_nonfinite: bool = False,
    implementation: str = "xla",
    packed: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """AdamW with 4-bit moments [A4]: ``scale_by_adam_4bit`` + decoupled weight decay + learning rate.

  Args:
    learning_rate: a float or an Optax schedule.
    b1, b2, eps: Adam's constants.
    weight_decay: decoupled weight decay (``p ← p − lr·wd·p``), default 1e-4.
    mask: which params get weight decay (a pytree of bools or a function of the params), as in optax.
    bits: 4 (default), 8 or 32 moments.
    second_moment: ``"rank1"``, ``"block"`` or ``"factored"`` (4-bit Factor).
    skip_nonfinite: wrap in ``optax.apply_if_finite``: a step with a NaN/Inf gradient leaves the params and
      every state unchanged.
    implementation: ``"xla"`` (default) or ``"pallas"`` (experimental fused kernels); see
      :func:`scale_by_adam_4bit`.
    packed: both moments of the whole model in a few arrays (``implementation="pallas"``, ``"block"``); see
      :func:`scale_by_adam_4bit`.

  Optimizer state: about 1.03–1.06 bytes per parameter (0.53 for "factored") instead of optax.adamw's 8.
  """
  _check_alias(learning_rate, weight_decay, skip_nonfinite=skip_nonfinite)
  return _finalize(optax.chain(
      scale_by_adam_4bit(b1=b1, b2=b2, eps=eps, bits=bits, second_moment=second_moment,
                         implementation=implementation, packed=packed),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  ), skip_nonfinite)


class FusedOptimizer(NamedTuple):
  """An optimizer whose ``step`` updates the params itself (:func:`adamw_4bit_fused`).

  ``init`` and ``update`` are those of the equivalent ``optax.GradientTransformation`` (same state, so the
  two can be mixed, checkpointed and restored alike; ``optax.GradientTransformationExtraArgs(opt.init,
  opt.update)`` is one; with ``packed=True`` that is ``adamw_4bit(..., implementation="pallas",
  packed=True)``, and ``optax_shampoo4.adam.unpack_moments`` turns its state into the per-tensor one);
  ``step(grads, state, params) -> (new_params, new_state)`` is one training step, ``update`` +
  ``optax.apply_updates`` in one pass per tensor.
  """

  init: Callable[[optax.Params], optax.OptState]
  update: Callable[..., Tuple[optax.Updates, optax.OptState]]
  step: Callable[[optax.Updates, optax.OptState, optax.Params], Tuple[optax.Params, optax.OptState]]


def adamw_4bit_fused(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    mask: MaskOrFn = None,
    second_moment: str = "rank1",
    packed: Optional[bool] = None,
) -> FusedOptimizer:
  """:func:`adamw_4bit` with the Pallas kernels applying the update too: each kernel reads a tensor's
  gradient, params and 4-bit moments and writes the new params and moments — no update tensor, no separate
  ``apply_updates`` pass (about 18 bytes per parameter per step with the finite check, against 28 for
  ``optax.adamw``; docs/benchmarks.md).

  Arguments as :func:`adamw_4bit` (4-bit moments; ``second_moment`` ``"rank1"`` or ``"block"``; ``packed``
  defaults to ``True`` with ``"block"``: the state is a handful of arrays, see
  :class:`~optax_shampoo4.adam.PackedMoment`, and a GPU step then costs the host less than the device — on
  an H100, GPT-2 medium, 0.8× ``optax.adamw``'s step against 1.5× with ``packed=False``). Tensors the
  kernels do not cover take the XLA path, applied in the same jitted step. ``step`` computes, per tensor,
  ``p + (−lr)·(û + wd·p)`` in fp32 (the ops of ``add_decayed_weights``, ``scale_by_learning_rate`` and
  ``apply_updates``, in their order; bf16 params are rounded once). A step whose gradient holds a NaN/Inf
  changes nothing but ``nonfinite_count``: params, moments and the schedule's count stay as they were.
  Donate the params and state to the jitted step so that the kernels update them in place.
  """
  _check_alias(learning_rate, weight_decay)
  if second_moment not in ("rank1", "block"):
    raise ValueError(f"second_moment must be 'rank1' or 'block' for the fused kernels, got {second_moment!r}")
  if packed is None:
    packed = second_moment == "block"
  transformation = adamw_4bit(learning_rate, b1, b2, eps, weight_decay, mask=mask, second_moment=second_moment,
                              implementation="pallas", packed=packed)
  _, adam_step = adam_4bit_functions(b1, b2, eps, second_moment=second_moment, implementation="pallas",
                                     packed=packed)

  def step(grads, state, params):
    adam_state, decay_state, schedule_state = state
    if callable(learning_rate):
      step_size = -learning_rate(schedule_state.count)
    else:
      step_size = -learning_rate
    mask_tree = mask(params) if callable(mask) else mask
    if mask_tree is None:
      decays = jax.tree.map(lambda _: weight_decay, params)
    else:  # a mask may be a prefix of the params tree, as for optax.masked
      decays = jax.tree.map(lambda keep, subtree: jax.tree.map(lambda _: jnp.where(keep, weight_decay, 0.0), subtree),
                            mask_tree, params)
    new_params, new_adam_state = adam_step(
        grads, adam_state, ApplyStep(params, jnp.asarray(step_size, jnp.float32), decays))
    if callable(learning_rate):
      skipped = new_adam_state.nonfinite_count != adam_state.nonfinite_count
      count = jnp.where(skipped, schedule_state.count, optax.safe_increment(schedule_state.count))
      schedule_state = schedule_state._replace(count=count)
    return new_params, (new_adam_state, decay_state, schedule_state)

  return FusedOptimizer(transformation.init, transformation.update, step)


def shampoo_adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.05,
    *,
    mask: MaskOrFn = None,
    adam_bits: int = 32,
    second_moment: str = "rank1",
    skip_nonfinite: bool = False,
    bits: int = 4,
    quantize: str = "eigenvectors",
    block_size: int = 64,
    codebook: str = "linear2",
    max_order: int = 1200,
    statistics_every: int = 100,
    inverse_root_every: int = 500,
    beta: float = 0.95,
    epsilon: float = 1e-6,
    bjorck_steps: Tuple[int, int] = (1, 4),
    min_quantized_size: int = 4096,
    start_step: int = 1,
    inverse_root_method: Optional[str] = None,
    error_feedback: bool = True,
    error_feedback_beta: float = 0.0,
    preconditioning_precision: str = "high",
    linalg_precision: Optional[str] = None,
    shard_blocks: Union[int, jax.sharding.NamedSharding] = 1,
    replicate_roots: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Shampoo-preconditioned AdamW [S4]: grafted Shampoo direction → Adam → decoupled weight decay → lr.

  Args:
    learning_rate: a float or an Optax schedule (Adam's learning rates transfer through grafting).
    b1, b2, eps: Adam's constants (defaults 0.9, 0.999, 1e-8).
    weight_decay: decoupled weight decay (default 0.05, [S4]).
    mask: weight-decay mask, as in ``optax.adamw``.
    adam_bits: 32 (``optax.scale_by_adam``), 8 or 4 (:func:`scale_by_adam_4bit`): with ``bits=4`` too,
      the whole optimizer state is 4-bit.
    second_moment: Adam's second-moment storage when ``adam_bits < 32``.
    skip_nonfinite: wrap in ``optax.apply_if_finite``.
    bits, quantize, …, shard_blocks, replicate_roots: the Shampoo arguments, see :func:`scale_by_shampoo`.
  """
  _check_alias(learning_rate, weight_decay, skip_nonfinite=skip_nonfinite)
  if adam_bits not in (4, 8, 32) or isinstance(adam_bits, bool):
    raise ValueError(f"adam_bits must be one of (4, 8, 32), got {adam_bits!r}")
  return _finalize(optax.chain(
      scale_by_shampoo(
          bits=bits, quantize=quantize, block_size=block_size, codebook=codebook, max_order=max_order,
          statistics_every=statistics_every, inverse_root_every=inverse_root_every, beta=beta, epsilon=epsilon,
          bjorck_steps=bjorck_steps, min_quantized_size=min_quantized_size, start_step=start_step,
          inverse_root_method=inverse_root_method, error_feedback=error_feedback,
          error_feedback_beta=error_feedback_beta, preconditioning_precision=preconditioning_precision,
          linalg_precision=linalg_precision,
          shard_blocks=shard_blocks, replicate_roots=replicate_roots),
      _adam(b1, b2, eps, adam_bits, second_moment),
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
    skip_nonfinite: bool = False,
    bits: int = 4,
    quantize: str = "eigenvectors",
    block_size: int = 64,
    codebook: str = "linear2",
    max_order: int = 1200,
    statistics_every: int = 100,
    inverse_root_every: int = 500,
    beta: float = 0.95,
    epsilon: float = 1e-6,
    bjorck_steps: Tuple[int, int] = (1, 4),
    min_quantized_size: int = 4096,
    start_step: int = 1,
    inverse_root_method: Optional[str] = None,
    error_feedback: bool = True,
    error_feedback_beta: float = 0.0,
    preconditioning_precision: str = "high",
    linalg_precision: Optional[str] = None,
    shard_blocks: Union[int, jax.sharding.NamedSharding] = 1,
    replicate_roots: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Shampoo-preconditioned SGD with momentum [S4]: grafted Shampoo direction + L2 decay → momentum → lr.

  The L2 term ``wd·p`` is added after grafting and before momentum, as in [S4].

  Args:
    learning_rate: a float or an Optax schedule (default of [S4]: 0.1).
    momentum: heavy-ball momentum (default 0.9).
    nesterov: use Nesterov momentum.
    weight_decay: L2 coefficient (default 5e-4).
    mask: weight-decay mask.
    skip_nonfinite: wrap in ``optax.apply_if_finite``.
    bits, quantize, …, shard_blocks, replicate_roots: the Shampoo arguments, see :func:`scale_by_shampoo`.
  """
  _check_alias(learning_rate, weight_decay, momentum, skip_nonfinite)
  return _finalize(optax.chain(
      scale_by_shampoo(
          bits=bits, quantize=quantize, block_size=block_size, codebook=codebook, max_order=max_order,
          statistics_every=statistics_every, inverse_root_every=inverse_root_every, beta=beta, epsilon=epsilon,
          bjorck_steps=bjorck_steps, min_quantized_size=min_quantized_size, start_step=start_step,
          inverse_root_method=inverse_root_method, error_feedback=error_feedback,
          error_feedback_beta=error_feedback_beta, preconditioning_precision=preconditioning_precision,
          linalg_precision=linalg_precision,
          shard_blocks=shard_blocks, replicate_roots=replicate_roots),
      optax.add_decayed_weights(weight_decay, mask),
      optax.trace(decay=momentum, nesterov=nesterov),
      optax.scale_by_learning_rate(learning_rate),
  ), skip_nonfinite)
