"""Skipping a step whose gradient holds a NaN or an Inf, without a conditional.

``optax.apply_if_finite`` runs the inner update inside ``lax.cond``. XLA:GPU
copies a conditional's predicate to the host and waits for it, and this
predicate depends on the whole gradient: the host stops launching kernels until
the backward pass is done, and then the GPU waits while the host launches the
optimizer's kernels (``benchmarks/train_lm.py --profile-steps`` shows the gap).
:func:`skip_nonfinite` always computes the update and keeps the old state by an
element-wise select, which XLA fuses into the kernels that compute the new
state. Its state is ``optax.ApplyIfFiniteState``, so code that reads its
counters and checkpoints written under ``optax.apply_if_finite`` work unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import optax


def all_finite(tree) -> jax.Array:
  """Whether every element of every array in ``tree`` is finite (a scalar
  bool).

  The sum of ``x · 0`` is 0 when every element is finite and NaN otherwise
  (``0 · ±Inf`` and ``0 · NaN`` are NaN, and it cannot overflow), so the check
  is a float sum, the reduction XLA:GPU does fastest: an AND-reduction of
  ``isfinite`` over the same leaves took several times as long as reading them
  (``docs/benchmarks.md``). Leaves of one shape are added first, into one
  reduction per shape: a 24-layer model has 24 tensors of each shape, and
  per-leaf reductions were a third of 4-bit Adam's fused step's kernel
  launches.
  """
  groups = {}
  for x in jax.tree.leaves(tree):
    groups.setdefault(tuple(x.shape),
                      []).append(jnp.asarray(x, jnp.float32) * 0.0)
  sums = [
      jnp.sum(functools.reduce(jnp.add, group)) for group in groups.values()
  ]
  return jnp.isfinite(functools.reduce(jnp.add,
                                       sums)) if sums else jnp.asarray(True)


def skip_nonfinite(
    inner: optax.GradientTransformation,
    keeps_own_state: Tuple[type, ...] = (),
) -> optax.GradientTransformationExtraArgs:
  """``inner``, except that a step whose gradient holds a NaN or Inf returns
  zero updates and leaves ``inner``'s state unchanged; the counters of
  ``optax.ApplyIfFiniteState`` record it. Unlike ``optax.apply_if_finite`` it
  never gives up and accepts such a step.

  Args:
    inner: the transformation to guard.
    keeps_own_state: types of sub-states of ``inner`` that already keep
      themselves unchanged on such a step because they see the gradient itself
      (``ShampooState`` and ``SoapState``, first in their chains). They are
      passed through: a select would copy their stacks every step.
  """
  inner = optax.with_extra_args_support(inner)
  own = lambda x: isinstance(x, keeps_own_state)

  def init_fn(params):
    return optax.ApplyIfFiniteState(
        notfinite_count=jnp.zeros([], jnp.int32),
        last_finite=jnp.array(True, jnp.bool_),
        total_notfinite=jnp.zeros([],
                                  jnp.int32), inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    finite = all_finite(updates)
    new_updates, new_inner = inner.update(updates, state.inner_state, params,
                                          **extra_args)
    keep = lambda new, old: new if own(new) else jnp.where(finite, new, old)
    inner_state = jax.tree.map(keep, new_inner, state.inner_state, is_leaf=own)
    new_updates = jax.tree.map(
        lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
    return new_updates, optax.ApplyIfFiniteState(
        notfinite_count=jnp.where(finite, 0,
                                  optax.safe_increment(state.notfinite_count)),
        last_finite=finite,
        total_notfinite=jnp.where(finite, state.total_notfinite,
                                  optax.safe_increment(state.total_notfinite)),
        inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def step_counters(state: Any, step: jax.Array,
                  finite: jax.Array) -> Dict[str, jax.Array]:
  """The ``count`` and ``nonfinite_count`` fields of ``state`` after a step: a
  step whose gradient held a NaN/Inf is skipped, not counted."""
  return dict(
      count=jnp.where(finite, step, state.count).astype(jnp.int32),
      nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32))


def where_finite(finite: jax.Array, new: Any, old: Any) -> Any:
  """``new`` where the step's gradient was finite, else ``old``, leaf by leaf
  (two pytrees of one structure)."""
  return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
