"""Ready-made optimizers, composed like ``optax.adamw``: a scaling, weight decay, the learning rate."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import optax

from optax_shampoo4.adam import scale_by_adam_4bit
from optax_shampoo4.shampoo import scale_by_shampoo

ScalarOrSchedule = Union[float, optax.Schedule]
MaskOrFn = Optional[Union[Any, Callable[[optax.Params], Any]]]


def _adam(b1, b2, eps, bits, second_moment):
  if bits == 32 and second_moment == "rank1":
    return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  return scale_by_adam_4bit(b1=b1, b2=b2, eps=eps, bits=bits, second_moment=second_moment)


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

  Optimizer state: about 1.03–1.06 bytes per parameter (0.53 for "factored") instead of optax.adamw's 8.
  """
  return _finalize(optax.chain(
      scale_by_adam_4bit(b1=b1, b2=b2, eps=eps, bits=bits, second_moment=second_moment),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  ), skip_nonfinite)


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
    **shampoo_kwargs,
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
    **shampoo_kwargs: passed to :func:`scale_by_shampoo` (``bits``, ``quantize``, ``statistics_every``…).
  """
  return _finalize(optax.chain(
      scale_by_shampoo(**shampoo_kwargs),
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
    **shampoo_kwargs,
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
    **shampoo_kwargs: passed to :func:`scale_by_shampoo`.
  """
  return _finalize(optax.chain(
      scale_by_shampoo(**shampoo_kwargs),
      optax.add_decayed_weights(weight_decay, mask),
      optax.trace(decay=momentum, nesterov=nesterov),
      optax.scale_by_learning_rate(learning_rate),
  ), skip_nonfinite)
