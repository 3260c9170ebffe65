"""Optax's own conformance checks for optimizers
(``optax/contrib/_common_test.py``), run on every public optimizer of this
package: convergence on the parabola, Rosenbrock, matrix-parabola and mixed
  targets, ``optax.tree.map_params``, learning-rate schedules, and dtype/shape
  stability of the state under
``lax.cond``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_shampoo4 as o4

INTERVALS = dict(statistics_every=1, inverse_root_every=2)
# name -> factory of the optimizer given a learning rate (or schedule). SGD
# keeps a constant 1e-3: the curvature at Rosenbrock's minimum, about 1000,
# bounds a heavy-ball rate by 2(1 + momentum)/1000.
OPTIMIZERS = {
    "shampoo_adamw":
        lambda lr: o4.shampoo_adamw(lr, weight_decay=0.0, **INTERVALS),
    "shampoo_adamw_all_4bit":
        lambda lr: o4.shampoo_adamw(lr, weight_decay=0.0, adam=o4.AdamConfig(),
                                    **INTERVALS),
    "shampoo_sgdm":
        lambda lr: o4.shampoo_sgdm(1e-3, weight_decay=0.0, **INTERVALS),
    "adamw_4bit":
        lambda lr: o4.adamw_4bit(lr, weight_decay=0.0),
    "soap":
        lambda lr: o4.soap(lr, weight_decay=0.0, precondition_every=1),
    "soap_4bit_moments":
        lambda lr: o4.soap(lr, weight_decay=0.0, precondition_every=1,
                           moments=o4.AdamConfig(bits=4)),
}


def parabola():
  return jnp.array([-1.0, 10.0, 1.0]), jnp.array([1.0, -1.0,
                                                  1.0]), lambda p, t: jnp.sum(
                                                      (p - t)**2)


def rosenbrock():
  return jnp.zeros(2), jnp.array(
      [1.0, 1.0]), lambda p, t: (1.0 - p[0])**2 + 100.0 * (p[1] - p[0]**2)**2


def matrix_parabola():
  return jnp.zeros((2, 2)), jnp.array([[3.0, -2.0],
                                       [1.0, 4.0]]), lambda p, t: jnp.sum(
                                           (p - t)**2)


def mixed():
  start = (jnp.zeros(3), jnp.zeros((2, 2)))
  target = (jnp.array([1.0, -1.0, 2.0]), jnp.array([[1.0, 0.0], [-1.0, 1.0]]))
  return start, target, lambda p, t: sum(
      jnp.sum((a - b)**2) for a, b in zip(p, t))


@pytest.mark.parametrize("target",
                         [parabola, rosenbrock, matrix_parabola, mixed])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_converges_on_optax_targets(name, target):
  start, final, objective = target()
  tx = OPTIMIZERS[name](optax.exponential_decay(
      3e-2, 1000, 0.5))  # a schedule, as users pass one
  state = optax.tree.map_params(
      tx, lambda v: v, tx.init(start))  # a no-op map must keep the state valid

  def step(carry, _):
    params, state = carry
    updates, state = tx.update(
        jax.grad(objective)(params, final), state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, length=6000))(
      (start, state))
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(final)):
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(want), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_shapes_and_dtypes_are_stable_under_cond(name, dtype):
  params = {"w": jnp.full((8, 12), 0.5, dtype), "b": jnp.zeros(12, dtype)}
  tx = OPTIMIZERS[name](1e-2)
  signature = lambda tree: [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]

  @jax.jit
  def step(params, state, i):
    grads = jax.tree.map(
        lambda p: (jax.random.normal(jax.random.PRNGKey(i), p.shape) * 0.1).
        astype(p.dtype), params)
    # a cond whose branches must agree: the update's state must match the state
    # passed in
    updates, state = jax.lax.cond(
        i % 2 == 0, lambda: tx.update(grads, state, params), lambda:
        (jax.tree.map(jnp.zeros_like, params), state))
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  before = signature(state)
  for i in range(3):
    params, state = step(params, state, i)
  assert signature(state) == before
  assert all(p.dtype == dtype for p in jax.tree.leaves(params))
