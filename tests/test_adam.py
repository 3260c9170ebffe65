"""4-bit AdamW and 4-bit Factor (docs/algorithms.md) against optax.adamw."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_shampoo4 as o4
from helpers import (
    digits_mlp_problem, least_squares_problem, loss_curve, substate)


@pytest.fixture(scope="module")
def big_mlp_problem():
  """The digits MLP with a 64×128 and a 128×64 layer: both above the
  4096-element threshold."""
  return digits_mlp_problem()


@pytest.mark.parametrize("second_moment", ["rank1", "block", "factored"])
def test_4bit_adamw_tracks_optax_adamw_on_real_data(big_mlp_problem,
                                                    second_moment):
  reference, _ = loss_curve(
      optax.adamw(3e-3, weight_decay=1e-4), big_mlp_problem, 300)
  curve, state = loss_curve(
      o4.adamw_4bit(3e-3, weight_decay=1e-4,
                    config=o4.AdamConfig(second_moment=second_moment)),
      big_mlp_problem, 300)
  assert isinstance(
      substate(state, o4.ScaleByAdam4bitState).mu["w1"], o4.QuantizedArray)
  # Every 25 steps from step 50 on (losses 0.33 down to 0.036), within 10 % of
  # optax.adamw's (measured ≤ 5.6 %).
  np.testing.assert_allclose(curve[1:], reference[1:], rtol=0.1, atol=0)


def minibatch_least_squares(n=4096, d_in=96, d_out=64, batch=64):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, d_in)), jnp.float32)
  y = x @ jnp.asarray(rng.standard_normal(
      (d_in, d_out)), jnp.float32) + 0.1 * jnp.asarray(
          rng.standard_normal((n, d_out)), jnp.float32)

  def loss(p, xb, yb):
    return jnp.mean((xb @ p["w"] + p["b"] - yb)**2)

  def sample(i):
    index = jax.random.randint(jax.random.PRNGKey(i), (batch,), 0, n)
    return x[index], y[index]

  return loss, {
      "w": jnp.zeros((d_in, d_out)),
      "b": jnp.zeros(d_out)
  }, sample, (x, y)


def test_4bit_adamw_on_minibatch_least_squares():
  """Measured: on linear regression 4-bit AdamW converges but more slowly than
  optax.adamw (loss 1.4 vs 0.5 after 400 steps, from 66: 2.8×); 8-bit stays
  within 10 % of optax.adamw at every checkpoint."""
  problem = minibatch_least_squares()
  initial = float(problem[0](problem[1], *problem[3]))
  reference, _ = loss_curve(
      optax.adamw(1e-2, weight_decay=0.0), problem, 400, every=50)
  eight, _ = loss_curve(
      o4.adamw_4bit(1e-2, weight_decay=0.0, config=o4.AdamConfig(bits=8)),
      problem, 400, every=50)
  four, _ = loss_curve(
      o4.adamw_4bit(1e-2, weight_decay=0.0), problem, 400, every=50)
  np.testing.assert_allclose(eight, reference, rtol=0.15, atol=0)
  assert np.all(four <= 3.5 * reference) and np.all(four >= reference), (
      four, reference)
  assert np.all(np.diff(four) < 0) and four[-1] < 0.03 * initial


def test_first_moment_dead_zone_on_an_ill_conditioned_quadratic():
  """Known limit, measured: on a deterministic quadratic, m's per-step EMA
  increments are smaller than the 4-bit dynamic-tree code spacing, so entries
  stall between codes and 4-bit AdamW lags; 8-bit does not. (With fp32 m and
  4-bit v the curve tracks optax.adamw: the first moment is the cause.)"""
  problem = least_squares_problem(d_in=96, d_out=64, decades=1.0)
  reference, _ = loss_curve(
      optax.adamw(1e-2, weight_decay=0.0), problem, 200, every=200)
  eight, _ = loss_curve(
      o4.adamw_4bit(1e-2, weight_decay=0.0, config=o4.AdamConfig(bits=8)),
      problem, 200, every=200)
  four, _ = loss_curve(
      o4.adamw_4bit(1e-2, weight_decay=0.0), problem, 200, every=200)
  assert abs(eight[-1] - reference[-1]) <= 0.1 * reference[-1]
  assert four[-1] > 1.5 * reference[-1]


def test_small_tensors_are_exactly_optax_adamw():
  params = {
      "w": jnp.ones((32, 64)),
      "b": jnp.zeros(64)
  }  # 2048 elements: below the threshold
  ours, theirs = o4.adamw_4bit(1e-2), optax.adamw(1e-2, weight_decay=1e-4)
  s1, s2 = ours.init(params), theirs.init(params)
  key = jax.random.PRNGKey(0)
  for _ in range(5):
    key, sub = jax.random.split(key)
    g = jax.tree.map(lambda p: jax.random.normal(sub, p.shape), params)
    u1, s1 = jax.jit(ours.update)(g, s1, params)
    u2, s2 = jax.jit(theirs.update)(g, s2, params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_allclose(
          np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


def test_zero_point_makes_the_update_explode_and_linear_nozero_does_not():
  """[A4] §4.1: a second-moment codebook with a zero decodes small v to 0 and
  1/(√v + ε) explodes.

  Steady gradients of 1, then one entry per block of 128 jumps to 2000 (v's
  block max grows 4e6-fold, m's only 2000-fold: m stays representable, v of the
  other entries rounds to the zero code), then a step where those entries get a
  zero gradient (a sparse gradient, as for an embedding).
  """
  n = 8192
  spikes = np.zeros(n, np.float32)
  spikes[::128] = 2000.0
  stream = [np.ones(n, np.float32)] * 50 + [np.where(spikes > 0, spikes, 1.0)
                                           ] + [np.where(spikes > 0, 1.0, 0.0)]
  largest = {}
  for codebook in ("dynamic_tree_unsigned", "linear_nozero", None):
    tx = (
        optax.scale_by_adam() if codebook is None else o4.scale_by_adam_4bit(
            config=o4.AdamConfig(second_moment="block",
                                 second_moment_codebook=codebook)))
    state = tx.init(jnp.zeros(n))
    for g in stream:
      update, state = tx.update(jnp.asarray(g), state)
    largest[codebook] = float(jnp.max(jnp.abs(update)))
  assert largest[None] < 2.0  # fp32 Adam: m̂/√v̂ stays O(1)
  assert largest["dynamic_tree_unsigned"] > 1e4, largest  # explodes
  assert largest["linear_nozero"] < 2.0, largest  # bounded


@pytest.mark.parametrize("config", [
    o4.AdamConfig(),
    o4.AdamConfig(second_moment="block"),
    o4.AdamConfig(second_moment="factored"),
    o4.AdamConfig(bits=8),
    o4.AdamConfig(bits=32),
])
def test_zero_moments_decode_to_zeros_of_every_params_shape(config):
  """``MomentLayout.zeros`` (Adam's and SOAP's init): every stored moment
  decodes to exact zeros of its parameter's shape, whatever its storage."""
  from optax_shampoo4.moments import (FactoredMoment, MomentLayout,
                                      factored_estimate)
  layout = MomentLayout.from_config(config)
  params = {
      "w": jnp.ones((96, 128)),
      "conv": jnp.ones((3, 3, 16, 256)),
      "b": jnp.ones((7,)),
      "s": jnp.ones(())
  }
  mu, nu = layout.zeros(params)
  for name, p in params.items():
    assert np.array_equal(
        layout.load_first(mu[name], p.shape), np.zeros(p.shape))
    v = nu[name]
    if isinstance(v, FactoredMoment):
      assert layout.factored(p.shape)
      v = factored_estimate(v)
    else:
      v = layout.load_second(v, p.shape)
    assert np.array_equal(v, np.zeros(p.shape))
  # the large matrix is stored compressed unless the layout is fp32
  assert isinstance(mu["w"], o4.QuantizedArray) == (config.bits != 32)
