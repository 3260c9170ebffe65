"""4-bit AdamW's fused apply path: the update and ``optax.apply_updates`` in one
pass per tensor.

:func:`~optax_shampoo4.adamw_4bit` with the Pallas kernels
(``AdamConfig(implementation="pallas")``) returns an ordinary Optax
transformation that also carries a fused ``step``. Each kernel reads a tensor's
gradient, params and 4-bit moments and writes the new params and moments: no
update tensor and no separate ``apply_updates`` pass. The step works on exactly
the state that ``init`` returns, so the two paths can be mixed, checkpointed and
restored alike. It finds its sub-states by type.

  >>> params, opt_state = o4.fused_step(tx)(grads, opt_state, params)
  >>> state = o4.apply_gradients(state, grads)  # a Flax TrainState
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp
import optax

from optax_shampoo4.adam import (
    ApplyStep, ScaleByAdam4bitState, adam_4bit_functions)
from optax_shampoo4.config import AdamConfig

Step = Callable[[optax.Updates, optax.OptState, optax.Params],
                Tuple[optax.Params, optax.OptState]]


class WithFusedStep(optax.GradientTransformationExtraArgs):
  """An Optax transformation that also has a fused ``step`` (read it with
  :func:`fused_step`)."""
  # A NamedTuple subclass without __slots__: each instance keeps its step in its
  # own __dict__.


def with_fused_step(tx: optax.GradientTransformation,
                    step: Step) -> WithFusedStep:
  out = WithFusedStep(tx.init, tx.update)
  out.step = step
  return out


def fused_step(tx: optax.GradientTransformation) -> Step:
  """``step(grads, opt_state, params) -> (params, opt_state)``: the fused
  kernels where ``tx`` has them (:func:`~optax_shampoo4.adamw_4bit` with
  ``implementation="pallas"``), else ``tx.update`` followed by
  ``optax.apply_updates``."""
  step = getattr(tx, "step", None)
  if step is not None:
    return step

  def update_and_apply(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return update_and_apply


def apply_gradients(train_state: Any, grads: optax.Updates) -> Any:
  """``train_state.apply_gradients(grads=grads)`` for a Flax ``TrainState``,
  through :func:`fused_step`."""
  params, opt_state = fused_step(train_state.tx)(grads, train_state.opt_state,
                                                 train_state.params)
  return train_state.replace(step=train_state.step + 1, params=params,
                             opt_state=opt_state)


def find_state(state: Any, kind: type, required: bool = True) -> Any:
  """The one sub-state of type ``kind`` in an optimizer state (chains, guards,
  injections), or None."""
  is_kind = lambda x: isinstance(x, kind)
  found = [s for s in jax.tree.leaves(state, is_leaf=is_kind) if is_kind(s)]
  if len(found) > 1 or (required and not found):
    raise ValueError(
        f"expected one {kind.__name__} in the optimizer state, found "
        f"{len(found)}"
    )
  return found[0] if found else None


def _replace_state(state: Any, kind: type, new: Any) -> Any:
  is_kind = lambda x: isinstance(x, kind)
  return jax.tree.map(lambda s: new
                      if is_kind(s) else s, state, is_leaf=is_kind)


def _weight_decays(weight_decay, mask, params):
  mask_tree = mask(params) if callable(mask) else mask
  if mask_tree is None:
    return jax.tree.map(lambda _: weight_decay, params)
  # a mask may be a prefix of the params tree, as for optax.masked
  return jax.tree.map(
      lambda keep, sub: jax.tree.map(
          lambda _: jnp.where(keep, weight_decay, 0.0), sub), mask_tree, params)


def adamw_4bit_step(learning_rate, b1, b2, eps, weight_decay, mask,
                    config: AdamConfig) -> Step:
  """The fused step of ``adamw_4bit`` with these arguments (see the module
  docstring).

  Per tensor it computes ``p + (−lr)·(û + wd·p)`` in fp32: the ops of
  ``add_decayed_weights``, ``scale_by_learning_rate`` and ``apply_updates``, in
  their order; bf16 params are rounded once. A step whose gradient holds a
  NaN/Inf changes the params and moments not at all and the counters as the
  transformation's own update does. Donate the params and state to the jitted
  step, so that the kernels update them in place. One GPU or replicated params.
  """
  _, adam_step = adam_4bit_functions(b1, b2, eps, 0.0, config)

  def step(grads, state, params):
    adam_state = find_state(state, ScaleByAdam4bitState)
    schedule_state = find_state(state, optax.ScaleByScheduleState,
                                required=callable(learning_rate))
    step_size = -(
        learning_rate(schedule_state.count)
        if callable(learning_rate) else learning_rate)
    new_params, new_adam = adam_step(
        grads, adam_state,
        ApplyStep(params, jnp.asarray(step_size, jnp.float32),
                  _weight_decays(weight_decay, mask, params)))
    finite = new_adam.nonfinite_count == adam_state.nonfinite_count
    state = _replace_state(state, ScaleByAdam4bitState, new_adam)
    if schedule_state is not None:
      count = jnp.where(finite, optax.safe_increment(schedule_state.count),
                        schedule_state.count)
      state = _replace_state(state, optax.ScaleByScheduleState,
                             schedule_state._replace(count=count))
    guard = find_state(state, optax.ApplyIfFiniteState, required=False)
    # the alias's skip_nonfinite passes the 4-bit state through (it keeps
    # itself)
    if guard is not None:
      state = _replace_state(
          state, optax.ApplyIfFiniteState,
          guard._replace(
              notfinite_count=jnp.where(
                  finite, 0, optax.safe_increment(guard.notfinite_count)),
              last_finite=finite, total_notfinite=jnp.where(
                  finite, guard.total_notfinite,
                  optax.safe_increment(guard.total_notfinite))))
    return new_params, state

  return step
