"""Linear algebra of the preconditioners (optax_shampoo4.linalg) against numpy
float64."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import references
from optax_shampoo4 import linalg, preconditioners
from optax_shampoo4.quantization import fake_quantize


def test_linalg_inverse_roots_agree_with_float64():
  rng = np.random.default_rng(3)
  g = rng.standard_normal((3, 40, 60))
  a = np.einsum("kij,klj->kil", g, g) / 60
  w, v = np.linalg.eigh(a)
  want = np.einsum("kij,kj,klj->kil", v,
                   (w + 1e-6 * w.max(-1, keepdims=True))**-0.25, v)
  for fn in (linalg.inverse_root_eigh,
             functools.partial(linalg.inverse_root_newton, iterations=40)):
    got = np.asarray(fn(jnp.asarray(a, jnp.float32)), np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4, fn
  q = np.asarray(
      linalg.orthonormalize_columns(jnp.asarray(g[:, :, :40], jnp.float32)),
      np.float64)
  np.testing.assert_allclose(q, _qr_factor(g[:, :, :40]), atol=2e-4)


@pytest.mark.parametrize(
    "condition, tolerance, factorizations_expected",
    [
        # after the first pass ‖XᵀX − I‖_F ≈ 0.02: both later passes are
        # first-order corrections
        (1e1, 3e-2, 1),
        # ≈ 4.6 after the first pass: a second factorization, then a correction
        # (≈ 0.03)
        (1e4, 3e-2, 2),
        (1e4, None, 3),
    ])
def test_cholesky_qr_first_order_passes_match_qr(condition, tolerance,
                                                 factorizations_expected,
                                                 monkeypatch):
  rng = np.random.default_rng(11)
  n = 48
  q0 = _qr_factor(rng.standard_normal((2, n, n)))
  x = q0 @ (
      np.logspace(0, -np.log10(condition), n)[:, None] * rng.standard_normal(
          (n, n)))
  factorizations = []
  cholesky = jax.lax.linalg.cholesky
  monkeypatch.setattr(
      linalg.lax.linalg, "cholesky",
      lambda a, **kw: factorizations.append(1) or cholesky(a, **kw))
  with jax.disable_jit():  # lax.cond then runs only the branch it takes
    q = np.asarray(
        linalg.orthonormalize_columns(
            jnp.asarray(x, jnp.float32), correction_tolerance=tolerance),
        np.float64)
  # On CPU the factorizations run one matrix at a time (linalg.per_matrix):
  # count them per pass
  assert len(factorizations) == factorizations_expected * len(x)
  np.testing.assert_allclose(q, _qr_factor(x),
                             atol=2e-4 if condition > 100 else 2e-5)
  assert np.max(np.abs(np.swapaxes(q, -1, -2) @ q - np.eye(n))) < 2e-6


def test_orthogonality_estimate_tracks_the_exact_error():
  rng = np.random.default_rng(5)
  rows = jnp.asarray(
      np.linalg.qr(rng.standard_normal((2, 200, 200)))[0], jnp.float32)
  exact, estimate = linalg.orthogonality_error(
      rows), linalg.orthogonality_error_estimate(rows)
  assert float(jnp.max(exact)) < 1e-5 and float(jnp.max(estimate)) < 1e-4
  # One pair of nearly parallel rows (a gross failure) must exceed the rejection
  # tolerance in both measures.
  broken = rows.at[:, 7].set(rows[:, 3] + 0.05 * rows[:, 7])
  exact, estimate = linalg.orthogonality_error(
      broken), linalg.orthogonality_error_estimate(broken)
  assert float(jnp.min(exact)) > 0.5 and float(
      jnp.min(estimate)) > preconditioners.ORTHOGONALITY_TOLERANCE


def test_orthogonality_estimate_draws_no_random_numbers_in_the_program():
  """The probes are a constant drawn on the host: the statistics step of
  every order compiled a random-number generator before."""
  rows = jnp.eye(48, dtype=jnp.float32)[None]
  text = jax.jit(linalg.orthogonality_error_estimate).lower(rows).as_text()
  assert "threefry" not in text and "rng_bit_generator" not in text
  # fixed probes: the same estimate for the same rows, call after call
  skewed = rows.at[0, 3, 5].set(0.3)
  first = linalg.orthogonality_error_estimate(skewed)
  np.testing.assert_array_equal(first,
                                linalg.orthogonality_error_estimate(skewed))
  assert 0.05 < float(first[0]) < 1.5


def test_orthonormalization_runs_at_its_own_precision():
  """``Numerics.orthonormalization`` takes the Cholesky-QR Gram matrices, their
  corrections and the orthogonality estimate; the statistic's products with the
  basis keep ``precision``."""
  numerics = linalg.Numerics(jax.lax.Precision.HIGH,
                             orthonormalization=jax.lax.Precision.HIGHEST)
  rows = jnp.eye(32, dtype=jnp.float32)[None]
  statistic = jnp.diag(jnp.linspace(2.0, 1.0, 32))[None]

  def precisions(fn, *args):
    text = jax.jit(fn).lower(*args).as_text()
    return [
        line.split("precision = [")[1].split(",")[0]
        for line in text.splitlines()
        if "dot_general" in line
    ]

  step = precisions(
      functools.partial(linalg.subspace_iteration_step, numerics=numerics),
      statistic, rows)
  # A·V and the Rayleigh quotients A·P; three Gram matrices and the two
  # first-order corrections of orthonormalize_columns
  assert sorted(step) == ["HIGH"] * 2 + ["HIGHEST"] * 5, step
  assert precisions(
      functools.partial(linalg.orthogonality_error_estimate, numerics=numerics),
      rows) == ["HIGHEST"] * 2
  # without it, every product runs at ``precision``
  assert set(
      precisions(
          functools.partial(linalg.subspace_iteration_step,
                            numerics=linalg.Numerics(jax.lax.Precision.HIGH)),
          statistic, rows)) == {"HIGH"}


def _qr_factor(x):
  q, r = np.linalg.qr(x)
  return q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]


def _quantized_basis(n, bits, seed=0):
  """A random orthogonal basis (rows), its 4- or 8-bit stored form and
  eigenvalues spanning six decades."""
  q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
  return q.T, _stored(q.T, bits), np.logspace(0, -6, n)


def _stored(matrix, bits=4):
  return np.asarray(
      fake_quantize(
          jnp.asarray(matrix, jnp.float32), codebook="linear2", bits=bits,
          block_size=64), np.float64)


def test_tf32_rectification_of_4bit_bases_is_below_their_own_error():
  """Why ``ShampooConfig.rectification_precision`` defaults to TF32 at 4 bits:
  in float64 with TF32-rounded operands, the Björck steps change the rebuilt
  statistic and the inverse root by under 2 % of the error that the 4-bit
  basis (and the root's own 4-bit storage) leave in them after float64 Björck
  steps; at 8 bits TF32 would leave the rectified basis several times less
  orthogonal."""
  rows, stored, eigenvalues = _quantized_basis(256, bits=4)
  statistic = lambda v: (v.T * eigenvalues) @ v
  exact = statistic(rows)
  fp64, tf32 = (
      references.bjorck(stored, 1, operands)
      for operands in (lambda a: a, references.tf32))
  own_error = np.abs(statistic(fp64) - exact).max()
  assert own_error > 1e-3
  assert np.abs(statistic(tf32) - statistic(fp64)).max() < 0.02 * own_error

  # the inverse root, before and after its own 4-bit storage
  damped = (eigenvalues + 1e-6)**-0.25
  root = lambda v: (v.T * damped) @ v
  fp64, tf32 = (
      root(references.bjorck(stored, 4, operands))
      for operands in (lambda a: a, references.tf32))
  own_error = np.abs(_stored(fp64) - root(rows)).max()
  assert np.abs(tf32 - fp64).max() < 0.02 * own_error

  _, stored, _ = _quantized_basis(256, bits=8)
  orthogonality = lambda v: np.abs(v @ v.T - np.eye(256)).max()
  assert orthogonality(references.bjorck(stored, 1, references.tf32)) > 3 * (
      orthogonality(references.bjorck(stored, 1)))


def test_rectification_runs_at_its_own_precision():
  """``bjorck`` multiplies at ``Numerics.rectification``, not ``precision``."""
  numerics = linalg.Numerics(jax.lax.Precision.HIGHEST,
                             rectification=jax.lax.Precision.HIGH)
  text = jax.jit(functools.partial(linalg.bjorck,
                                   steps=2, numerics=numerics)).lower(
                                       jnp.eye(8)[None]).as_text()
  dots = [line for line in text.splitlines() if "dot_general" in line]
  assert len(dots) == 4 and all("precision = [HIGH, HIGH]" in l for l in dots)
