"""skip_nonfinite (optax_shampoo4.nonfinite) against optax.apply_if_finite, its
conditional counterpart."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_shampoo4 as o4


def test_skip_nonfinite_equals_optax_apply_if_finite_without_a_conditional():
  """Step by step through finite, NaN and Inf gradients: the same updates (zeros
  on a skipped step), the same inner state and the same counters as
  ``optax.apply_if_finite``; and its jitted update holds no conditional (the
  point of it: XLA:GPU syncs the host on each one)."""
  params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
  ours, reference = (o4.skip_nonfinite(optax.adam(1e-2)),
                     optax.apply_if_finite(
                         optax.adam(1e-2), max_consecutive_errors=100))
  states = [ours.init(params), reference.init(params)]
  updates = [jax.jit(ours.update), jax.jit(reference.update)]
  for t, bad in enumerate([None, jnp.nan, None, jnp.inf, jnp.nan, None]):
    grads = {"w": jnp.full((3, 4), 0.1 * (t + 1)), "b": jnp.full(4, -0.2)}
    if bad is not None:
      grads["b"] = grads["b"].at[t % 4].set(bad)
    (ours_updates, states[0]), (reference_updates, states[1]) = (
        update(grads, state, params) for update, state in zip(updates, states))
    for a, b in zip(
        jax.tree.leaves((ours_updates, states[0])),
        jax.tree.leaves((reference_updates, states[1]))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(states[0].total_notfinite) == 3 and int(
      states[0].notfinite_count) == 0
  assert "cond" not in str(
      jax.make_jaxpr(ours.update)(grads, states[0], params))


def test_states_that_keep_themselves_are_passed_through():
  """A sub-state of a type named in ``keeps_own_state`` is the inner update's
  own on a skipped step (no select); the others are kept by the guard."""
  params = {"w": jnp.ones((8, 8))}
  inner = optax.chain(
      o4.scale_by_shampoo(statistics_every=1, inverse_root_every=1),
      optax.scale_by_adam())
  tx = o4.skip_nonfinite(inner, keeps_own_state=(o4.ShampooState,))
  state = tx.init(params)
  _, new = tx.update({"w": jnp.full((8, 8), jnp.nan)}, state, params)
  shampoo_state, adam_state = new.inner_state[0], new.inner_state[1]
  assert int(shampoo_state.nonfinite_count
            ) == 1  # its own count: the guard did not select it back
  for a, b in zip(
      jax.tree.leaves(adam_state), jax.tree.leaves(state.inner_state[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_all_finite_against_numpy_on_mixed_dtypes_and_huge_finite_values():
  """A NaN or ±Inf anywhere, in any leaf, of fp32, bf16 or int dtype, against
  numpy's ``isfinite``; finite values near fp32's largest do not overflow the
  check (it sums ``x · 0``, never ``x``)."""
  from optax_shampoo4.nonfinite import all_finite
  big = np.float32(3e38)
  base = {
      "a": jnp.full((4, 5), big),
      "b": jnp.full((4, 5), big),  # same shape as "a": added to it first
      "c": jnp.ones((3,), jnp.bfloat16),
      "n": jnp.arange(6)
  }
  check = jax.jit(all_finite)
  assert bool(check(base))
  for leaf, bad in [("a", np.nan), ("b", -np.inf), ("c", np.inf),
                    ("a", np.inf)]:
    tree = dict(base)
    tree[leaf] = tree[leaf].at[(1,) * tree[leaf].ndim].set(bad)
    expected = all(
        np.isfinite(np.asarray(x, np.float64)).all()
        for x in jax.tree.leaves(tree))
    assert bool(check(tree)) == expected == False, (leaf, bad)
  assert bool(check({})) and bool(check({"n": jnp.arange(3)}))
