"""Preconditioner storages (optax_shampoo4.preconditioners): the eigenvector
storage against float64, and Cholesky quantization with error feedback ([CQ],
docs/algorithms.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_shampoo4 as o4
from optax_shampoo4 import diagnostics, preconditioners
from helpers import relative
from optax_shampoo4.config import ShampooConfig


def gram_stream(n=96, m=48, steps=60, seed=0):
  rng = np.random.default_rng(seed)
  scales = np.logspace(0, -2, n)[:, None]
  return [(lambda g: g @ g.T / m)(rng.standard_normal((n, m)) * scales)
          for _ in range(steps)]


# Relative errors allowed after eight updates, (statistic, inverse root), about
# twice those measured. The eigenvector storage takes one subspace step per
# update, so its statistic converges over updates instead of being exact; the
# 32-bit Cholesky storage's root is a coupled Newton iteration.
CONTRACT_BOUNDS = {
    ("eigenvectors", 32): (0.25, 0.1), ("eigenvectors", 4): (0.25, 0.12),
    ("matrix", 32): (1e-4, 1e-5), ("matrix", 4): (0.05, 0.12),
    ("cholesky", 32): (1e-4, 0.01), ("cholesky", 4): (0.05, 0.04),
}


@pytest.mark.parametrize("bits", [32, 4])
@pytest.mark.parametrize("storage", sorted(preconditioners.STORAGES))
def test_every_storage_keeps_the_interface_contract(storage, bits):
  """One contract for every storage of the table: ``init`` holds identity
  roots; after eight EMA updates of two matrices ``statistic`` is the float64
  EMA and ``inverse_root`` the float64 ``(L + ε·λmax)^{-1/4}`` of it, within
  ``CONTRACT_BOUNDS``; a NaN Gram is refused (``ok`` false) and leaves the state
  bit for bit; shapes and dtypes never change."""
  n, k, beta, epsilon = 48, 2, 0.5, 1e-6
  config = ShampooConfig(bits=bits, storage=storage, min_quantized_size=0)
  functions = preconditioners.make_storage(config, n)
  hyper = preconditioners.Hyper(beta, epsilon, 0.0)
  state = functions.init(k, n, hyper)
  np.testing.assert_allclose(functions.inverse_root(state),
                             np.broadcast_to(np.eye(n), (k, n, n)), atol=0.02)
  signature = lambda t: [(x.shape, x.dtype) for x in jax.tree.leaves(t)]
  before = signature(state)
  update = jax.jit(lambda s, g: functions.update_statistics(s, g, hyper))
  expected = np.broadcast_to(epsilon * np.eye(n), (k, n, n))
  for gram in gram_stream(n=n, steps=8, seed=3):
    grams = np.stack([gram, 2 * gram])
    state, ok = update(state, jnp.asarray(grams, jnp.float32))
    assert bool(jnp.all(ok)) and signature(state) == before
    expected = beta * expected + (1 - beta) * grams
  statistic = np.asarray(functions.statistic(state), np.float64)
  statistic_bound, root_bound = CONTRACT_BOUNDS[storage, bits]
  assert relative(statistic, expected) <= statistic_bound
  state, ok = functions.update_inverse_root(state, hyper)
  assert bool(jnp.all(ok)) and signature(state) == before
  values, vectors = np.linalg.eigh(expected)
  damped = np.maximum(values, 0) + epsilon * values[..., -1:]
  want = np.einsum("kij,kj,klj->kil", vectors, damped**-0.25, vectors)
  got = np.asarray(functions.inverse_root(state), np.float64)
  assert relative(got, want) <= root_bound, relative(got, want)
  bad, ok = update(state, jnp.full((k, n, n), jnp.nan))
  assert not bool(jnp.any(ok))
  for a, b in zip(jax.tree.leaves(bad), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rebuilt_statistic_stays_symmetric_positive_definite_over_a_long_run():
  storage = preconditioners.make_storage(
      ShampooConfig(storage="cholesky", min_quantized_size=0), 64)
  hyper = preconditioners.Hyper(0.95, 1e-6, 0.0)
  n = 80
  state = storage.init(2, n, hyper)
  step = jax.jit(lambda s, g: storage.update_statistics(s, g, hyper))
  rng = np.random.default_rng(1)
  for _ in range(200):
    g = rng.standard_normal(
        (2, n, 8)) * rng.uniform(0.01, 100)  # low-rank updates of varying scale
    state, ok = step(state, jnp.asarray(g @ np.swapaxes(g, -1, -2),
                                        jnp.float32))
    assert bool(jnp.all(ok))
    statistic = np.asarray(storage.statistic(state), np.float64)
    np.testing.assert_allclose(statistic, np.swapaxes(statistic, -1, -2),
                               atol=1e-5 * np.abs(statistic).max())
    # C̄ C̄ᵀ with a positive fp32 diagonal of C̄: positive definite (checked in
    # float64, where the product is exact enough; the fp32 product carries
    # ~1e-8-relative rounding).
    factor = np.asarray(
        preconditioners.unpack_cholesky(storage.load(
            state.factor_and_error))[0], np.float64)
    assert np.all(np.diagonal(factor, axis1=-2, axis2=-1) > 0)
    assert np.min(np.linalg.eigvalsh(factor @ np.swapaxes(factor, -1, -2))) > 0


def test_packed_array_holds_factor_and_error_in_one_4bit_matrix():
  storage = preconditioners.make_storage(
      ShampooConfig(storage="cholesky", min_quantized_size=0), 64)
  hyper = preconditioners.Hyper(0.95, 1e-6, 0.0)
  state = storage.init(1, 64, hyper)
  grams = gram_stream(n=64, steps=5)
  for g in grams:
    state, _ = storage.update_statistics(state,
                                         jnp.asarray(g[None],
                                                     jnp.float32), hyper)
  packed = state.factor_and_error
  assert packed.codes.shape == (
      1, 64, 32) and packed.codes.dtype == jnp.uint8  # n²/2 bytes: one matrix
  factor, error = preconditioners.unpack_cholesky(
      storage.load(state.factor_and_error))
  assert float(jnp.abs(jnp.triu(error)).max()) == 0.0  # E strictly lower
  assert float(jnp.abs(
      error).max()) > 0  # and not empty: it carries the quantization residual
  dense = np.asarray(storage.load(packed)[0])
  np.testing.assert_array_equal(np.tril(dense), np.asarray(factor[0]))
  np.testing.assert_array_equal(np.triu(dense, 1).T, np.asarray(error[0]))


def test_without_error_feedback_the_error_state_stays_zero():
  storage = preconditioners.make_storage(
      ShampooConfig(storage="cholesky", error_feedback=False,
                    min_quantized_size=0), 64)
  hyper = preconditioners.Hyper(0.95, 1e-6, 0.0)
  state = storage.init(1, 64, hyper)
  for g in gram_stream(n=64, steps=3):
    state, _ = storage.update_statistics(state,
                                         jnp.asarray(g[None],
                                                     jnp.float32), hyper)
  _, error = preconditioners.unpack_cholesky(
      storage.load(state.factor_and_error))
  assert float(jnp.abs(error).max()) == 0.0


def test_failed_factorization_keeps_the_previous_factor():
  storage = preconditioners.make_storage(
      ShampooConfig(storage="cholesky", min_quantized_size=0), 64)
  hyper = preconditioners.Hyper(0.95, 1e-6, 0.0)
  state = storage.init(1, 64, hyper)
  bad = jnp.full((1, 64, 64), jnp.nan)
  new_state, ok = storage.update_statistics(state, bad, hyper)
  assert not bool(ok[0])
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("beta_e", [0.0, 0.5])
def test_error_state_follows_the_feedback_recurrence_against_float64(beta_e):
  """``E_k = β_e E_{k−1} + (1 − β_e)(C_k + E_{k−1} − D(C̄_k))`` in numpy float64
  from the stored state before each update (its factor and error) and the stored
  factor after it. The library's E is itself stored in 4 bits (measured 11 %
  relative error); half-strength feedback, or dropping ``(1 − β_e)`` at β_e =
  0.5, is off by ≥ 47 %."""
  n, beta, epsilon = 64, 0.95, 1e-6
  storage = preconditioners.make_storage(
      ShampooConfig(storage="cholesky", min_quantized_size=0), n)
  hyper = preconditioners.Hyper(beta, epsilon, beta_e)
  state = storage.init(1, n, hyper)
  for gram in gram_stream(n=n, steps=6):
    factor, error = (
        np.asarray(a[0], np.float64) for a in preconditioners.unpack_cholesky(
            storage.load(state.factor_and_error)))
    state, ok = storage.update_statistics(state,
                                          jnp.asarray(gram[None], jnp.float32),
                                          hyper)
    assert bool(ok[0])
    new_factor, new_error = (
        np.asarray(a[0], np.float64) for a in preconditioners.unpack_cholesky(
            storage.load(state.factor_and_error)))
    statistic = beta * factor @ factor.T + (1 - beta) * gram
    statistic = (statistic + statistic.T) / 2
    ridge = epsilon * max(np.max(np.diag(statistic)), 0.0) + np.finfo(
        np.float32).tiny
    target = np.linalg.cholesky(statistic + ridge * np.eye(n)) + error
    expected = np.tril(beta_e * error + (1 - beta_e) * (target - new_factor),
                       -1)
    assert np.linalg.norm(new_error -
                          expected) <= 0.15 * np.linalg.norm(expected)


def test_32bit_eigenvector_path_converges_to_float64_eigendecomposition():
  """One subspace step per update: with a fixed statistic, the basis converges
  to the exact one."""
  rng = np.random.default_rng(1)
  n = 80
  basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
  gram = jnp.asarray((basis * 0.92**np.arange(n)) @ basis.T,
                     jnp.float32)  # eigenvalues 1 … 1.4e-3
  storage = preconditioners.make_storage(o4.ShampooConfig(bits=32), n)
  hyper = preconditioners.Hyper(0.5, 1e-6, 0.0)
  state = storage.init(1, n, hyper)
  step = jax.jit(lambda s: storage.update_statistics(s, gram[None], hyper)[0])
  for _ in range(300):
    state = step(state)
  state, _ = storage.update_inverse_root(state, hyper)
  # the fixed point of the EMA is the gram itself (the ε·I of the initial state
  # has decayed)
  w, v = np.linalg.eigh(np.asarray(gram, np.float64))
  want = (v * (w + 1e-6 * w.max())**-0.25) @ v.T
  got = np.asarray(storage.inverse_root(state)[0], np.float64)
  assert diagnostics.normwise_relative_error(got, want) <= 1e-4
  np.testing.assert_allclose(
      np.asarray(state.eigenvalues[0]), w[::-1], rtol=1e-4)
