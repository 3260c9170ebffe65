"""Error metrics of quantized preconditioners ([S4] Table 1;
``docs/algorithms.md``): NRE and angle error of A^{-1/4}."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from optax_shampoo4 import linalg, preconditioners
from optax_shampoo4.config import ShampooConfig
from optax_shampoo4.quantization import fake_quantize


def normwise_relative_error(approx, exact) -> float:
  """NRE = ‖approx − exact‖_F / ‖exact‖_F (computed in float64)."""
  approx, exact = np.asarray(approx, np.float64), np.asarray(exact, np.float64)
  return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def angle_error_degrees(approx, exact) -> float:
  """AE = angle in degrees between vec(approx) and vec(exact)."""
  approx, exact = np.asarray(approx, np.float64).ravel(), np.asarray(
      exact, np.float64).ravel()
  cosine = approx @ exact / (np.linalg.norm(approx) * np.linalg.norm(exact))
  return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def synthetic_statistic(order: int = 1200, small_eigenvalue: float = 1e-3,
                        seed: int = 0):
  """[S4] Table 1's test matrix: Haar-random U, half the eigenvalues 1 and half
  ``small_eigenvalue``.

  Returns ``(eigenvectors_as_columns, eigenvalues)`` in float64.
  """
  rng = np.random.default_rng(seed)
  q, r = np.linalg.qr(rng.standard_normal((order, order)))
  q = q * np.sign(np.diag(r))  # Haar measure
  eigenvalues = np.where(np.arange(order) < order // 2, 1.0, small_eigenvalue)
  return q, eigenvalues


def inverse_root_error(eigenvectors, eigenvalues, *, storage: str,
                       bits: int = 4, codebook: str = "linear2",
                       block_size: int = 64, bjorck_steps: int = 1,
                       root: int = 4, epsilon: float = 1e-6):
  """NRE and AE of ``A^{-1/root}`` computed from a quantized representation of
  ``A = U diag(λ) Uᵀ``.

  ``storage``: ``"eigenvectors"`` (quantize the rows of ``Uᵀ``, keep λ exact,
  ``bjorck_steps`` Björck steps), ``"matrix"`` (quantize ``A`` with its diagonal
  exact) or ``"cholesky"`` (quantize the Cholesky factor with its diagonal
  exact). The eigenvector storage keeps λ exact, so it needs no damping; the two
  others take the optimizer's rule ``(max(λ̂, 0) + ε·max λ̂)^{-1/root}`` on the
  eigenvalues of the rebuilt matrix, which quantization may have pushed to or
  below zero.
  """
  u = np.asarray(eigenvectors, np.float64)
  lam = np.asarray(eigenvalues, np.float64)
  exact = (u * lam**(-1.0 / root)) @ u.T
  kwargs = dict(codebook=codebook, bits=bits, block_size=block_size)
  if storage == "eigenvectors":
    rows = linalg.bjorck(
        fake_quantize(jnp.asarray(u.T, jnp.float32), **kwargs), bjorck_steps)
    approx = linalg.matmul(
        linalg.transpose(rows),
        rows * jnp.asarray(lam**(-1.0 / root), jnp.float32)[:, None])
  else:
    a = (u * lam) @ u.T
    if storage == "matrix":
      rebuilt = fake_quantize(
          jnp.asarray(a, jnp.float32), keep_diagonal=True, **kwargs)
    elif storage == "cholesky":
      factor = jnp.asarray(np.linalg.cholesky(a), jnp.float32)
      rebuilt = linalg.gram(
          jnp.tril(fake_quantize(factor, normalization="triangular", **kwargs)))
    else:
      raise ValueError(
          f"storage must be 'eigenvectors', 'matrix' or 'cholesky', got "
          f"{storage!r}"
      )
    w, v = np.linalg.eigh(np.asarray(rebuilt, np.float64))
    damped = np.maximum(w, 0.0) + epsilon * np.max(w)
    approx = (v * damped**(-1.0 / root)) @ v.T
  return normwise_relative_error(approx,
                                 exact), angle_error_degrees(approx, exact)


def error_feedback_errors(grams, *, bits: int = 4, beta: float = 0.95,
                          error_feedback: bool = True,
                          error_feedback_beta: float = 0.0,
                          epsilon: float = 1e-6):
  """Relative error of the statistic rebuilt from the 4-bit Cholesky storage
  after each update.

  Runs the library's Cholesky storage and an fp32 one on the same stream of
  ``grams`` (``G Gᵀ``, each ``(n, n)``) and returns ``‖L̂_k − L_k‖_F / ‖L_k‖_F``
  for every step ``k``.
  """
  n = np.shape(grams[0])[-1]
  hyper = preconditioners.Hyper(beta, epsilon, error_feedback_beta)
  quantized = preconditioners.make_storage(
      ShampooConfig(bits=bits, storage="cholesky",
                    error_feedback=error_feedback, min_quantized_size=0), n)
  reference = preconditioners.make_storage(
      ShampooConfig(bits=32, storage="cholesky"), n)
  states = [quantized.init(1, n, hyper), reference.init(1, n, hyper)]
  steps = [
      jax.jit(lambda s, g, st=st: st.update_statistics(s, g[None], hyper)[0])
      for st in (quantized, reference)
  ]
  errors = []
  for gram in grams:
    gram = jnp.asarray(gram, jnp.float32)
    states = [step(state, gram) for step, state in zip(steps, states)]
    approx, exact = (np.asarray(st.statistic(state)[0])
                     for st, state in zip((quantized, reference), states))
    errors.append(normwise_relative_error(approx, exact))
  return errors
