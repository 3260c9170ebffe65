"""Preconditioner storages: how a stack of Shampoo statistics and inverse roots is kept between steps.

Every storage is a :class:`Storage` with the same four functions over a stack ``(k, n, n)``:
``init(k, n, hyper)``, ``update_statistics(state, grams, hyper) -> (state, ok)``,
``update_inverse_root(state, hyper) -> (state, ok)`` and ``inverse_root(state)``; :data:`STORAGES` maps the
names of ``ShampooConfig.storage`` to them, and :func:`make_storage` builds one for an order class.

``"eigenvectors"`` [S4]
  the eigenvector matrix ``U`` of each statistic (4-bit linear-2, block-wise along each eigenvector) and
  the eigenvalues in fp32. Statistics update: dequantize, one Björck step, rebuild ``L = Uᵀ diag(λ) U``,
  EMA, one warm-started step of subspace iteration, Rayleigh quotients. Inverse root: 4 Björck steps and
  ``U diag((λ + ε·λmax)^{-1/4}) Uᵀ``.
``"matrix"``
  ``L`` itself, diagonal in fp32 and the rest quantized: the naive baseline of [S4], which fails at 4 bits;
  at 32 bits, classic Shampoo [S4, Alg. 4].
``"cholesky"`` [CQ]
  the Cholesky factor ``C`` of ``L + ε·max(diag L) I`` with error feedback ``E`` stored transposed in the
  upper triangle of the same 4-bit array (diagonal in fp32).

In all three the inverse root is stored with its diagonal in fp32 and the rest quantized. A result that is
not finite (or, for eigenvectors, not orthonormal) is rejected per matrix: the previous one is kept.

References:
  [S4] Wang, Zhou, Li, Huang. *4-bit Shampoo for Memory-Efficient Network Training.* NeurIPS 2024.
  [CQ] Li, Ding, Toh, Zhou. *Memory-Efficient 4-bit Preconditioned Stochastic Optimization.* arXiv 2412.10663.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Tuple, Union

import jax
import jax.numpy as jnp

from optax_shampoo4 import linalg
from optax_shampoo4.config import ShampooConfig
from optax_shampoo4.quantization import QuantizedArray, dequantize, quantize

# An eigenbasis whose rows deviate from orthonormality by more than this after an update is rejected.
ORTHOGONALITY_TOLERANCE = 1e-3
ROOT = 4  # Shampoo's L^{-1/4} G R^{-1/4} for 2-D blocks


Stored = Union[jax.Array, QuantizedArray]


# ----------------------------------------------------------------------------------------------------------
# How one stack of matrices is stored: fp32, or quantized with a given layout
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MatrixCodec:
  """Stores ``(k, n, n)`` stacks either in fp32 (``bits=32`` or small orders) or quantized."""

  bits: int
  codebook: str
  block_size: int

  @property
  def quantized(self) -> bool:
    return self.bits != 32

  def store(self, x: jax.Array, *, keep_diagonal: bool = False, triangular: bool = False) -> Stored:
    if not self.quantized:
      # a copy, so that no two state leaves share a buffer (donating the state would fail)
      return jnp.array(x, dtype=jnp.float32, copy=True)
    return quantize(x, codebook=self.codebook, bits=self.bits, block_size=self.block_size,
                    keep_diagonal=keep_diagonal, normalization="triangular" if triangular else "block")

  def load(self, stored: Stored) -> jax.Array:
    return dequantize(stored) if isinstance(stored, QuantizedArray) else stored


def select(ok: jax.Array, new, old):
  """Per stack element: ``new`` where ``ok`` (shape ``(k,)``), else ``old`` (works through QuantizedArray)."""
  def pick(a, b):
    return jnp.where(ok.reshape(ok.shape + (1,) * (a.ndim - 1)), a, b)
  return jax.tree.map(pick, new, old)


def all_finite(x: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------------------------------------
# Storages
# ----------------------------------------------------------------------------------------------------------
class EigenPreconditioner(NamedTuple):
  """Eigenvector storage [S4]: rows of ``eigenvectors`` are eigenvectors (decreasing eigenvalue)."""

  eigenvectors: Stored  # (k, n, n)
  eigenvalues: jax.Array  # (k, n) fp32
  inverse_root: Stored  # (k, n, n), diagonal kept in fp32


class EigenBasis(NamedTuple):
  """An eigenvector storage without inverse roots: SOAP's bases (same fields, same statistics update)."""

  eigenvectors: Stored  # (k, n, n)
  eigenvalues: jax.Array  # (k, n) fp32


class MatrixPreconditioner(NamedTuple):
  """The statistic itself (diagonal kept in fp32) — naive at 4 bits, classic Shampoo at 32."""

  statistic: Stored
  inverse_root: Stored


class CholeskyPreconditioner(NamedTuple):
  """[CQ]: lower triangle + diagonal = Cholesky factor C̄; strict upper triangle = error state Eᵀ."""

  factor_and_error: Stored
  inverse_root: Stored


@dataclasses.dataclass(frozen=True)
class Hyper:
  """Numeric hyperparameters (possibly traced, e.g. under ``optax.inject_hyperparams``)."""

  beta: Any
  epsilon: Any
  error_feedback_beta: Any


@dataclasses.dataclass(frozen=True)
class Storage:
  codec: MatrixCodec
  bjorck_steps: Tuple[int, int]
  inverse_root_method: str
  error_feedback: bool

  def _identity(self, k, n):
    return jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), (k, n, n))

  def _store_root(self, root):
    return self.codec.store(root, keep_diagonal=True)

  def _matrix_inverse_root(self, statistic, epsilon):
    if self.inverse_root_method == "eigh":
      return linalg.inverse_root_eigh(statistic, root=ROOT, epsilon=epsilon)
    return linalg.inverse_root_newton(statistic, root=ROOT, epsilon=epsilon)

  def inverse_root(self, state) -> jax.Array:
    return self.codec.load(state.inverse_root)

  def update_inverse_root(self, state, hyper: Hyper):
    # computed and quantized where its block's statistics live (under linalg.constrain_stacks), whatever
    # the stored root's own sharding
    root = linalg.constrain(self._compute_inverse_root(state, hyper))
    ok = all_finite(root)
    stored = jax.tree.map(linalg.constrain, self._store_root(root))
    return state._replace(inverse_root=select(ok, stored, state.inverse_root)), ok


class EigenStorage(Storage):

  def init(self, k, n, hyper):
    return EigenPreconditioner(*self.init_basis(k, n, hyper), self._store_root(self._identity(k, n)))

  def init_basis(self, k, n, hyper) -> EigenBasis:
    """A stack of identity bases (also the state of SOAP's rotations, :mod:`optax_shampoo4.soap`)."""
    return EigenBasis(self.codec.store(self._identity(k, n)), jnp.full((k, n), hyper.epsilon, jnp.float32))

  def load_basis(self, eigenvectors: Stored) -> jax.Array:
    """The eigenvectors (rows), rectified by ``bjorck_steps[0]`` Björck steps when they were quantized (fp32
    rows come out of ``orthonormalize_columns`` already orthonormal)."""
    rows = self.codec.load(eigenvectors)
    return linalg.bjorck(rows, self.bjorck_steps[0]) if self.codec.quantized else rows

  def update_statistics(self, state, grams, hyper):
    rows = self.load_basis(state.eigenvectors)
    previous = linalg.matmul(linalg.transpose(rows), rows * state.eigenvalues[..., :, None])
    # symmetric up to rounding, which the products below do not need removed
    statistic = hyper.beta * previous + (1.0 - hyper.beta) * grams
    new_rows, eigenvalues = linalg.subspace_iteration_step(statistic, rows)
    # Keep the basis sorted by decreasing eigenvalue: subspace iteration with a triangular (QR)
    # orthonormalization converges to that order, and a wrong order makes it rotate pairs instead.
    order = jnp.argsort(-eigenvalues, axis=-1)
    eigenvalues = jnp.maximum(jnp.take_along_axis(eigenvalues, order, axis=-1), 0.0)
    new_rows = jnp.take_along_axis(new_rows, order[..., :, None], axis=-2)
    ok = (all_finite(new_rows) & all_finite(eigenvalues) &
          (linalg.orthogonality_error_estimate(new_rows) <= ORTHOGONALITY_TOLERANCE))
    new = state._replace(eigenvectors=self.codec.store(new_rows), eigenvalues=eigenvalues)
    return select(ok, new, state), ok

  def _compute_inverse_root(self, state, hyper):
    rows = linalg.bjorck(self.codec.load(state.eigenvectors), self.bjorck_steps[1])
    return linalg.inverse_root_from_eigenbasis(rows, state.eigenvalues, root=ROOT, epsilon=hyper.epsilon)


class MatrixStorage(Storage):

  def init(self, k, n, hyper):
    eye = self._identity(k, n)
    return MatrixPreconditioner(self.codec.store(hyper.epsilon * eye, keep_diagonal=True), self._store_root(eye))

  def update_statistics(self, state, grams, hyper):
    statistic = hyper.beta * self.codec.load(state.statistic) + (1.0 - hyper.beta) * grams
    ok = all_finite(statistic)
    new = state._replace(statistic=self.codec.store(statistic, keep_diagonal=True))
    return select(ok, new, state), ok

  def _compute_inverse_root(self, state, hyper):
    return self._matrix_inverse_root(self.codec.load(state.statistic), hyper.epsilon)


class CholeskyStorage(Storage):

  def init(self, k, n, hyper):
    eye = self._identity(k, n)
    return CholeskyPreconditioner(self.codec.store(jnp.sqrt(hyper.epsilon) * eye, triangular=True),
                                  self._store_root(eye))

  def _unpack(self, state):
    packed = self.codec.load(state.factor_and_error)
    factor = jnp.tril(packed)
    error = jnp.tril(linalg.transpose(packed), -1)
    return factor, error

  def statistic(self, state) -> jax.Array:
    """The statistic rebuilt from the stored factor, ``C̄ C̄ᵀ`` (symmetric positive semi-definite)."""
    factor, _ = self._unpack(state)
    return linalg.gram(factor)

  def update_statistics(self, state, grams, hyper):
    factor, error = self._unpack(state)
    statistic = hyper.beta * linalg.gram(factor) + (1.0 - hyper.beta) * grams
    cholesky = linalg.cholesky_lower(statistic, hyper.epsilon)
    ok = all_finite(cholesky)
    if self.error_feedback and self.codec.quantized:
      target = cholesky + error  # E is strictly lower: the fp32 diagonal is exact and needs no feedback
      stored_factor = jnp.tril(self.codec.load(self.codec.store(target, triangular=True)))
      residual = target - stored_factor
      beta_e = hyper.error_feedback_beta
      new_error = beta_e * error + (1.0 - beta_e) * residual
      packed = target + linalg.transpose(jnp.tril(new_error, -1))
    else:
      packed = cholesky
    new = state._replace(factor_and_error=self.codec.store(packed, triangular=True))
    return select(ok, new, state), ok

  def _compute_inverse_root(self, state, hyper):
    return self._matrix_inverse_root(self.statistic(state), hyper.epsilon)


STORAGES = {"eigenvectors": EigenStorage, "matrix": MatrixStorage, "cholesky": CholeskyStorage}


def make_storage(config: ShampooConfig, order: int) -> Storage:
  """The storage of ``config`` for preconditioners of ``order`` (fp32 below ``min_quantized_size``)."""
  bits = config.bits if order * order >= config.min_quantized_size else 32
  codec = MatrixCodec(bits, config.codebook, config.block_size)
  return STORAGES[config.storage](codec, config.bjorck_steps, config.root_method, config.error_feedback)
