"""Preconditioner storages: how a stack of Shampoo statistics and inverse roots
is kept between steps.

Every storage is a :class:`Storage`: a NamedTuple of the same functions over a
stack ``(k, n, n)``, as ``optax.GradientTransformation`` is a NamedTuple of
``init`` and ``update``. :data:`STORAGES` maps the names of
``ShampooConfig.storage`` to the functions that build them, and
:func:`make_storage` builds the one of a config for an order.

``"eigenvectors"`` [S4]
  the eigenvector matrix ``U`` of each statistic (4-bit linear-2, block-wise
  along each eigenvector) and the eigenvalues in fp32. Statistics update:
  dequantize, one Björck step, rebuild ``L = Uᵀ diag(λ) U``, EMA, one
  warm-started step of subspace iteration, Rayleigh quotients. Inverse root: 4
  Björck steps and ``U diag((λ + ε·λmax)^{-1/4}) Uᵀ``.
``"matrix"``
  ``L`` itself, diagonal in fp32 and the rest quantized: the naive baseline of
  [S4], which fails at 4 bits; at 32 bits, classic Shampoo [S4, Alg. 4].
``"cholesky"`` [CQ]
  the Cholesky factor ``C`` of ``L + ε·max(diag L) I`` with error feedback ``E``
  stored transposed in the upper triangle of the same 4-bit array (diagonal in
  fp32).

In all three the inverse root is stored with its diagonal in fp32 and the rest
quantized. A result that is not finite (or, for eigenvectors, not orthonormal)
is rejected per matrix: the previous one is kept.

References:
  [S4] Wang, Zhou, Li, Huang. *4-bit Shampoo for Memory-Efficient Network
  Training.* NeurIPS 2024. [CQ] Li, Ding, Toh, Zhou. *Memory-Efficient 4-bit
  Preconditioned Stochastic Optimization.* arXiv 2412.10663.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Tuple, Union

import jax
import jax.numpy as jnp

from optax_shampoo4 import linalg
from optax_shampoo4.config import ShampooConfig
from optax_shampoo4.quantization import QuantizedArray, dequantize, quantize

# An eigenbasis whose rows deviate from orthonormality by more than this after
# an update is rejected.
ORTHOGONALITY_TOLERANCE = 1e-3
ROOT = 4  # Shampoo's L^{-1/4} G R^{-1/4} for 2-D blocks

Stored = Union[jax.Array, QuantizedArray]


# ------------------------------------------------------------------------------
# How one stack of matrices is stored: fp32, or quantized with a given layout
# ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MatrixCodec:
  """Stores ``(k, n, n)`` stacks either in fp32 (``bits=32`` or small orders) or
  quantized."""

  bits: int
  codebook: str
  block_size: int

  @property
  def quantized(self) -> bool:
    return self.bits != 32

  def store(self, x: jax.Array, *, keep_diagonal: bool = False,
            triangular: bool = False) -> Stored:
    if not self.quantized:
      # a copy, so that no two state leaves share a buffer (donating the state
      # would fail)
      return jnp.array(x, dtype=jnp.float32, copy=True)
    return quantize(x, codebook=self.codebook, bits=self.bits,
                    block_size=self.block_size, keep_diagonal=keep_diagonal,
                    normalization="triangular" if triangular else "block")

  def load(self, stored: Stored) -> jax.Array:
    return dequantize(stored) if isinstance(stored, QuantizedArray) else stored


def select(ok: jax.Array, new, old):
  """Per stack element: ``new`` where ``ok`` (shape ``(k,)``), else ``old``
  (works through QuantizedArray)."""

  def pick(a, b):
    return jnp.where(ok.reshape(ok.shape + (1,) * (a.ndim - 1)), a, b)

  return jax.tree.map(pick, new, old)


def all_finite(x: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))


# ------------------------------------------------------------------------------
# Storages
# ------------------------------------------------------------------------------
class EigenPreconditioner(NamedTuple):
  """Eigenvector storage [S4]: rows of ``eigenvectors`` are eigenvectors
  (decreasing eigenvalue)."""

  eigenvectors: Stored  # (k, n, n)
  eigenvalues: jax.Array  # (k, n) fp32
  inverse_root: Stored  # (k, n, n), diagonal kept in fp32


class EigenBasis(NamedTuple):
  """An eigenvector storage without inverse roots: SOAP's bases (same fields,
  same statistics update)."""

  eigenvectors: Stored  # (k, n, n)
  eigenvalues: jax.Array  # (k, n) fp32


class MatrixPreconditioner(NamedTuple):
  """The statistic itself (diagonal kept in fp32) — naive at 4 bits, classic
  Shampoo at 32."""

  statistic: Stored
  inverse_root: Stored


class CholeskyPreconditioner(NamedTuple):
  """[CQ]: lower triangle + diagonal = Cholesky factor C̄; strict upper triangle
  = error state Eᵀ."""

  factor_and_error: Stored
  inverse_root: Stored


@dataclasses.dataclass(frozen=True)
class Hyper:
  """Numeric hyperparameters (possibly traced, e.g. under
  ``optax.inject_hyperparams``)."""

  beta: Any
  epsilon: Any
  error_feedback_beta: Any


class Storage(NamedTuple):
  """How a stack ``(k, n, n)`` of one order's preconditioners is kept between
  steps.

  Attributes:
    init: ``init(k, n, hyper) -> state``: statistics ``ε·I`` and identity
      inverse roots.
    update_statistics: ``(state, grams, hyper) -> (state, ok)``: the EMA with
      this step's Grams; a matrix whose update fails (``ok`` false) keeps its
      previous state.
    update_inverse_root: ``(state, hyper) -> (state, ok)``: the inverse 4th
      roots from the statistics.
    inverse_root: ``state -> (k, n, n)`` fp32 inverse roots.
    load: a stored stack (or a slice of one) ``-> fp32``.
    statistic: ``state -> (k, n, n)`` fp32 statistics as the storage holds them.
  """

  init: Callable[..., Any]
  update_statistics: Callable[..., Tuple[Any, jax.Array]]
  update_inverse_root: Callable[..., Tuple[Any, jax.Array]]
  inverse_root: Callable[[Any], jax.Array]
  load: Callable[[Stored], jax.Array]
  statistic: Callable[[Any], jax.Array]


def _identity(k: int, n: int) -> jax.Array:
  return jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), (k, n, n))


def _store_root(codec: MatrixCodec, root: jax.Array) -> Stored:
  return codec.store(root, keep_diagonal=True)


def _update_inverse_root(codec: MatrixCodec, numerics: linalg.Numerics, compute,
                         state, hyper: Hyper):
  # computed and quantized where its block's statistics live (numerics'
  # constraint), whatever the stored root's own sharding
  constrain = lambda x: linalg.constrain(x, numerics)
  root = constrain(compute(state, hyper))
  ok = all_finite(root)
  stored = jax.tree.map(constrain, _store_root(codec, root))
  return state._replace(inverse_root=select(ok, stored, state.inverse_root)), ok


def _matrix_inverse_root(method: str, statistic: jax.Array, epsilon,
                         numerics: linalg.Numerics) -> jax.Array:
  root = {
      "eigh": linalg.inverse_root_eigh,
      "newton": linalg.inverse_root_newton
  }
  return root[method](statistic, root=ROOT, epsilon=epsilon, numerics=numerics)


def _functions(codec: MatrixCodec, numerics: linalg.Numerics, init,
               update_statistics, compute_root, statistic) -> Storage:
  update_root = functools.partial(_update_inverse_root, codec, numerics,
                                  compute_root)
  return Storage(init, update_statistics, update_root,
                 lambda state: codec.load(state.inverse_root), codec.load,
                 statistic)


# ------------------------------------------------------------------------------
# Eigenvectors [S4] (also SOAP's bases)
# ------------------------------------------------------------------------------
def init_basis(codec: MatrixCodec, k: int, n: int, hyper: Hyper) -> EigenBasis:
  """A stack of identity bases with eigenvalues ``ε`` (also the state of SOAP's
  rotations)."""
  return EigenBasis(
      codec.store(_identity(k, n)), jnp.full((k, n), hyper.epsilon,
                                             jnp.float32))


def load_basis(codec: MatrixCodec, bjorck_steps: int, eigenvectors: Stored,
               numerics: linalg.Numerics = linalg.FP32) -> jax.Array:
  """The eigenvectors (rows), rectified by ``bjorck_steps`` Björck steps when
  they were quantized (fp32 rows come out of ``orthonormalize_columns`` already
  orthonormal)."""
  rows = codec.load(eigenvectors)
  return linalg.bjorck(rows, bjorck_steps,
                       numerics) if codec.quantized else rows


def eigen_statistic(codec: MatrixCodec, bjorck_steps: int, state,
                    numerics: linalg.Numerics = linalg.FP32) -> jax.Array:
  """``Uᵀ diag(λ) U`` from a stored basis (symmetric up to rounding)."""
  rows = load_basis(codec, bjorck_steps, state.eigenvectors, numerics)
  return linalg.matmul(
      linalg.transpose(rows), rows * state.eigenvalues[..., :, None], numerics)


def update_eigenbasis(codec: MatrixCodec, bjorck_steps: int, state,
                      grams: jax.Array, hyper: Hyper,
                      numerics: linalg.Numerics = linalg.FP32):
  """The EMA of the statistic rebuilt from the basis, then one warm-started
  subspace-iteration step; works on an :class:`EigenPreconditioner` and an
  :class:`EigenBasis` alike. ``(state, ok)``."""
  rows = load_basis(codec, bjorck_steps, state.eigenvectors, numerics)
  previous = linalg.matmul(
      linalg.transpose(rows), rows * state.eigenvalues[..., :, None], numerics)
  # symmetric up to rounding, which the products below do not need removed
  statistic = hyper.beta * previous + (1.0 - hyper.beta) * grams
  new_rows, eigenvalues = linalg.subspace_iteration_step(
      statistic, rows, numerics=numerics)
  # Keep the basis sorted by decreasing eigenvalue: subspace iteration with a
  # triangular (QR) orthonormalization converges to that order, and a wrong
  # order makes it rotate pairs instead.
  order = jnp.argsort(-eigenvalues, axis=-1)
  eigenvalues = jnp.maximum(
      jnp.take_along_axis(eigenvalues, order, axis=-1), 0.0)
  new_rows = jnp.take_along_axis(new_rows, order[..., :, None], axis=-2)
  ok = (
      all_finite(new_rows)
      & all_finite(eigenvalues) & (linalg.orthogonality_error_estimate(
          new_rows, numerics=numerics) <= ORTHOGONALITY_TOLERANCE))
  new = state._replace(
      eigenvectors=codec.store(new_rows), eigenvalues=eigenvalues)
  return select(ok, new, state), ok


def _eigenvector_storage(codec: MatrixCodec, config: ShampooConfig,
                         numerics: linalg.Numerics) -> Storage:
  load_steps, root_steps = config.bjorck_steps_of("shampoo")

  def init(k, n, hyper):
    return EigenPreconditioner(*init_basis(codec, k, n, hyper),
                               _store_root(codec, _identity(k, n)))

  def compute_root(state, hyper):
    rows = linalg.bjorck(codec.load(state.eigenvectors), root_steps, numerics)
    return linalg.inverse_root_from_eigenbasis(rows, state.eigenvalues,
                                               root=ROOT, epsilon=hyper.epsilon,
                                               numerics=numerics)

  update = functools.partial(update_eigenbasis, codec, load_steps,
                             numerics=numerics)
  statistic = functools.partial(eigen_statistic, codec, load_steps,
                                numerics=numerics)
  return _functions(codec, numerics, init, update, compute_root, statistic)


# ------------------------------------------------------------------------------
# The statistic itself
# ------------------------------------------------------------------------------
def _matrix_storage(codec: MatrixCodec, config: ShampooConfig,
                    numerics: linalg.Numerics) -> Storage:

  def init(k, n, hyper):
    eye = _identity(k, n)
    return MatrixPreconditioner(
        codec.store(hyper.epsilon * eye, keep_diagonal=True),
        _store_root(codec, eye))

  def update_statistics(state, grams, hyper):
    statistic = hyper.beta * codec.load(
        state.statistic) + (1.0 - hyper.beta) * grams
    ok = all_finite(statistic)
    new = state._replace(statistic=codec.store(statistic, keep_diagonal=True))
    return select(ok, new, state), ok

  def compute_root(state, hyper):
    return _matrix_inverse_root(config.root_method, codec.load(state.statistic),
                                hyper.epsilon, numerics)

  return _functions(codec, numerics, init, update_statistics, compute_root,
                    lambda state: codec.load(state.statistic))


# ------------------------------------------------------------------------------
# Cholesky factor with error feedback [CQ]
# ------------------------------------------------------------------------------
def unpack_cholesky(packed: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """``(C̄, E)`` from a loaded ``factor_and_error`` stack: the lower triangle
  and diagonal, and the strict upper triangle transposed."""
  return jnp.tril(packed), jnp.tril(linalg.transpose(packed), -1)


def _cholesky_storage(codec: MatrixCodec, config: ShampooConfig,
                      numerics: linalg.Numerics) -> Storage:
  feedback = config.error_feedback and codec.quantized

  def init(k, n, hyper):
    return CholeskyPreconditioner(
        codec.store(jnp.sqrt(hyper.epsilon) * _identity(k, n), triangular=True),
        _store_root(codec, _identity(k, n)))

  def statistic(state):
    factor = unpack_cholesky(codec.load(state.factor_and_error))[0]
    return linalg.gram(factor, numerics)

  def update_statistics(state, grams, hyper):
    factor, error = unpack_cholesky(codec.load(state.factor_and_error))
    statistic = (
        hyper.beta * linalg.gram(factor, numerics) + (1.0 - hyper.beta) * grams)
    cholesky = linalg.cholesky_lower(statistic, hyper.epsilon, numerics)
    ok = all_finite(cholesky)
    packed = cholesky
    if feedback:
      # E is strictly lower: the fp32 diagonal is exact and needs no feedback
      target = cholesky + error
      stored_factor = jnp.tril(codec.load(codec.store(target, triangular=True)))
      beta_e = hyper.error_feedback_beta
      new_error = beta_e * error + (1.0 - beta_e) * (target - stored_factor)
      packed = target + linalg.transpose(jnp.tril(new_error, -1))
    new = state._replace(factor_and_error=codec.store(packed, triangular=True))
    return select(ok, new, state), ok

  def compute_root(state, hyper):
    return _matrix_inverse_root(config.root_method, statistic(state),
                                hyper.epsilon, numerics)

  return _functions(codec, numerics, init, update_statistics, compute_root,
                    statistic)


STORAGES = {
    "eigenvectors": _eigenvector_storage,
    "matrix": _matrix_storage,
    "cholesky": _cholesky_storage
}


def make_codec(config: ShampooConfig, order: int) -> MatrixCodec:
  """How ``config`` stores an order's stacks: fp32 below ``min_quantized_size``
  entries."""
  bits = config.bits if order * order >= config.min_quantized_size else 32
  return MatrixCodec(bits, config.codebook, config.block_size)


def make_storage(config: ShampooConfig, order: int,
                 numerics: linalg.Numerics = linalg.FP32) -> Storage:
  """The storage of ``config`` for preconditioners of ``order``, its algebra
  run with ``numerics`` (precision and sharding constraint)."""
  return STORAGES[config.storage](make_codec(config, order), config, numerics)
