"""Batched fp32 linear algebra for Shampoo preconditioners, built from matrix
products.

Every function takes stacks of matrices (``(..., n, n)``) and a
:class:`Numerics`: the precision of its products and the sharding constraint of
its results, passed explicitly. The default is ``Precision.HIGHEST``, because
XLA's default fp32 dot is TF32 on recent GPUs and bf16 passes on TPUs, which is
too coarse for preconditioner statistics whose eigenvalues span six decades.

Batched QR is avoided on purpose: on GPUs ``jnp.linalg.qr`` over a stack is
orders of magnitude slower than matrix products (``benchmarks/profile.py``
measures both). Orthonormalization is a shifted Cholesky-QR repeated three
times, which reproduces the Q factor of a QR decomposition with matrix products,
one Cholesky and one triangular solve per pass (or, once the columns are nearly
orthonormal, one product: a first-order correction).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

HIGHEST = lax.Precision.HIGHEST
_FP32_UNIT_ROUNDOFF = 2.0**-24
# Cholesky-QR passes after the first whose Gram matrix is within this Frobenius
# distance of the identity are first-order corrections (see
# orthonormalize_columns); None: a Cholesky factorization every pass. Read when
# a statistics update is traced. Measured on order-600 statistics (4-bit bases,
# eigenvalues spanning 1e7, rank-deficient, rank 5): the result differs from
# three Cholesky passes by < 1e-5 and stays orthonormal to ‖QᵀQ − I‖_F ≤ 4e-5.
CHOLESKY_QR_CORRECTION_TOLERANCE: Optional[float] = 3e-2


class Numerics(NamedTuple):
  """How the preconditioner algebra runs, passed to every function below that
  multiplies or factors stacks.

  Attributes:
    precision: of the products: a ``lax.Precision`` or a
      ``lax.DotAlgorithmPreset`` (default fp32).
    constraint: a function every stack-sized result passes through (e.g. a
      ``with_sharding_constraint`` that keeps a stack sharded along its leading
      axis), or None. :func:`per_matrix` reads its ``mesh`` and ``axes``
      attributes when it has them.
    orthonormalization: the precision of :func:`orthonormalize_columns`' Gram
      matrices and corrections and of :func:`orthogonality_error_estimate`
      (default: ``precision``). Their shift and tolerances are sized for
      rounding near fp32's, so a single TF32 pass (``Precision.HIGH`` on GPUs,
      rounding ≈ 5e-4) stays out of them.
    rectification: the precision of :func:`bjorck`'s products (default:
      ``precision``).
  """

  precision: Any = HIGHEST
  constraint: Optional[Callable[[jax.Array], jax.Array]] = None
  orthonormalization: Any = None
  rectification: Any = None

  def orthonormalizing(self) -> "Numerics":
    """These numerics with the products at ``orthonormalization`` (when set)."""
    return self._at(self.orthonormalization)

  def rectifying(self) -> "Numerics":
    """These numerics with the products at ``rectification`` (when set)."""
    return self._at(self.rectification)

  def _at(self, precision) -> "Numerics":
    return self if precision is None else self._replace(precision=precision)


FP32 = Numerics()


def constrain(x: jax.Array, numerics: Numerics = FP32) -> jax.Array:
  """``x`` through ``numerics.constraint`` (unchanged without one)."""
  return x if numerics.constraint is None else numerics.constraint(x)


PRODUCT_PRECISIONS = {
    "bf16": lax.DotAlgorithmPreset.BF16_BF16_F32,
    "default": lax.Precision.DEFAULT,
    "high": lax.Precision.HIGH,
    "highest": lax.Precision.HIGHEST
}


def product(a: jax.Array, b: jax.Array, precision: str) -> jax.Array:
  """``a @ b`` of the per-step products; ``precision`` is a
  ``ShampooConfig.preconditioning_precision`` name. ``"bf16"`` rounds both
  operands to bf16 and accumulates in fp32 (half the bytes of an fp32 operand,
  and bf16 tensor-core rate); rounding before the product lets XLA fuse it
  into the dequantization that makes the operand."""
  if precision == "bf16":
    return jnp.matmul(
        a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
        preferred_element_type=jnp.float32)
  return jnp.matmul(a, b, precision=PRODUCT_PRECISIONS[precision])


def matmul(a: jax.Array, b: jax.Array, numerics: Numerics = FP32) -> jax.Array:
  return constrain(jnp.matmul(a, b, precision=numerics.precision), numerics)


def per_matrix(fn, *stacks, numerics: Numerics = FP32):
  """``fn`` over stacks ``(..., n, m)`` of matrices, for LAPACK-backed ops
  (Cholesky, triangular solve, eigh).

  On the CPU backend the matrices go through ``fn`` one at a time (``lax.map``):
  jaxlib's batched CPU LAPACK kernels split a batch over the process's intra-op
  thread pool and block until it is done, and when every pool thread is one CPU
  device running such a kernel (a multi-device CPU program; seen with jaxlib
  0.10.2 on 4 and 8 devices and 2 cores), nothing is left to run the pieces: the
  step hangs. A stack sharded along its leading axis with a mesh (a constraint
  of ``numerics`` carrying ``mesh`` and ``axes``) loops over each
  device's own slots inside ``shard_map``, since a loop over the sharded axis
  would gather the whole stack onto every device. GPUs and TPUs take the batched
  call, and so do stacks spread by propagation alone (no mesh to map over).
  """
  constraint = numerics.constraint
  if jax.default_backend() != "cpu" or (constraint is not None and
                                        not hasattr(constraint, "mesh")):
    return fn(*stacks)
  batch = stacks[0].shape[:-2]
  flat = [s.reshape((-1,) + s.shape[-2:]) for s in stacks]
  loop = lambda *xs: lax.map(lambda ys: fn(*ys), xs)
  if constraint is not None:
    spec = jax.sharding.PartitionSpec(constraint.axes)
    loop = jax.shard_map(loop, mesh=constraint.mesh, in_specs=spec,
                         out_specs=spec)
  out = loop(*flat)
  return jax.tree.map(lambda o: o.reshape(batch + o.shape[1:]), out)


def transpose(a: jax.Array) -> jax.Array:
  return jnp.swapaxes(a, -1, -2)


def symmetrize(a: jax.Array) -> jax.Array:
  return 0.5 * (a + transpose(a))


def gram(x: jax.Array, numerics: Numerics = FP32) -> jax.Array:
  """``x xᵀ`` (symmetrized)."""
  return symmetrize(matmul(x, transpose(x), numerics))


def bjorck(rows: jax.Array, steps: int, numerics: Numerics = FP32) -> jax.Array:
  """``steps`` Björck (Newton–Schulz) steps ``V ← 1.5 V − 0.5 V Vᵀ V`` towards
  the nearest orthogonal matrix.

  Converges quadratically while the singular values lie in (0, √3); one step
  turns a 4-bit quantized orthogonal matrix (orthogonality error ~1e-2) into one
  with error ~1e-4 [S4, §3.2]. The products run at ``numerics.rectifying()``.
  """
  numerics = numerics.rectifying()
  for _ in range(steps):
    outer = matmul(rows, transpose(rows), numerics)
    rows = 1.5 * rows - 0.5 * matmul(outer, rows, numerics)
  return rows


def orthogonality_error(rows: jax.Array) -> jax.Array:
  """``max |V Vᵀ − I|`` per matrix of the stack."""
  n = rows.shape[-1]
  return jnp.max(
      jnp.abs(matmul(rows, transpose(rows)) - jnp.eye(n, dtype=rows.dtype)),
      axis=(-2, -1))


@functools.lru_cache(maxsize=None)
def _gaussian_probes(n: int, probes: int) -> np.ndarray:
  # Drawn on the host: a constant of the program rather than a random-number
  # generator in it, whose instructions every order's statistics step compiled.
  z = np.random.default_rng(0).standard_normal((n, probes)).astype(np.float32)
  z.setflags(write=False)
  return z


def orthogonality_error_estimate(rows: jax.Array, probes: int = 4,
                                 numerics: Numerics = FP32) -> jax.Array:
  """A cheap stand-in for :func:`orthogonality_error`: ``max |(V Vᵀ − I) z|``
  over fixed Gaussian probes ``z``.

  Costs ``4·n²·probes`` flops instead of ``2n³``. An error ``e`` in one entry of
  ``V Vᵀ`` shows as about ``e·|z_j|`` (so a gross failure is caught with near
  certainty); errors spread over all entries add up as ``e·√n``, so the estimate
  leans towards rejecting.
  """
  numerics = numerics.orthonormalizing()
  z = jnp.asarray(_gaussian_probes(rows.shape[-1], probes), rows.dtype)
  residual = matmul(rows, matmul(transpose(rows), z, numerics), numerics) - z
  return jnp.max(jnp.abs(residual), axis=(-2, -1))


def orthonormalize_columns(x: jax.Array, passes: int = 3, shift: float = 10.0,
                           correction_tolerance: Optional[float] = None,
                           numerics: Numerics = FP32) -> jax.Array:
  """Q factor of ``x = Q R`` (positive diagonal of R) by shifted Cholesky-QR,
  ``passes`` times.

  Each pass scales the columns to unit norm (Q is invariant to positive column
  scaling), factors the Gram matrix ``XᵀX + s I = R̃ᵀ R̃`` and sets ``X ← X
  R̃⁻¹``. The shift ``s = shift · u · ‖XᵀX‖_F`` (u the fp32 unit roundoff) keeps
  the Cholesky factorization from breaking down when the columns are nearly
  dependent, and each pass improves the conditioning (Fukaya et al., *Shifted
  Cholesky QR for computing the QR factorization of ill-conditioned matrices*,
  SIAM J. Sci. Comput. 2020). The last pass's shift shrinks the columns by about
  ``s/2``; scaling them back to unit norm leaves an orthogonality error at fp32
  rounding level (measured: the same as a final Björck step, which would cost
  ``4n³`` more flops). Because every ``R̃`` is upper triangular, the column
  spans ``span(Q[:, :k]) = span(x[:, :k])`` are those of QR, which is what
  subspace iteration needs (a polar factor would not converge to the
  eigenbasis).

  With ``correction_tolerance`` τ, a pass after the first whose Gram matrix is
  already close to the identity (``‖XᵀX − I‖_F`` ≤ τ for every matrix of the
  stack in the last pass, ≤ √τ in one followed by another) replaces the Cholesky
  factorization and the triangular solve — the work of several matrix products —
  by one product: with ``XᵀX = I + E`` and ``U`` the upper triangle of ``E``
  (half its diagonal), ``X ← X (I − U)`` is the first-order expansion of ``X
  R⁻¹`` and leaves ``‖XᵀX − I‖ = O(‖E‖²)`` (measured ≈ 0.15‖E‖²). ``I − U`` is
  upper triangular, so the column spans are still those of QR. The choice is a
  ``lax.cond`` per pass on the whole stack (both branches under ``vmap``).

  Measured (fp32, order 1200): orthogonality error ~1e-6 both for a rank-5
  statistic started from the identity and for a statistic with eigenvalues
  spanning 1e7 started from a 4-bit basis.
  """
  n = x.shape[-1]
  eye = jnp.eye(n, dtype=x.dtype)
  numerics = numerics.orthonormalizing()

  def cholesky_pass(x, gram_matrix):
    frobenius = jnp.sqrt(
        jnp.sum(gram_matrix * gram_matrix, axis=(-2, -1), keepdims=True))
    # Only the lower triangle is read: the product's rounding asymmetry needs no
    # symmetrizing pass.
    shifted = gram_matrix + (shift * _FP32_UNIT_ROUNDOFF) * frobenius * eye

    def factor_and_solve(shifted, x):
      lower = lax.linalg.cholesky(shifted, symmetrize_input=False)
      # x ← x R̃⁻¹ with R̃ = lowerᵀ: solve  x_new · lowerᵀ = x.
      return lax.linalg.triangular_solve(lower, x, left_side=False, lower=True,
                                         transpose_a=True)

    return per_matrix(factor_and_solve, shifted, x, numerics=numerics)

  def first_order_pass(x, gram_matrix):
    deviation = gram_matrix - eye
    upper = jnp.triu(deviation, 1) + 0.5 * deviation * eye
    return x - matmul(x, upper, numerics)

  for index in range(passes):
    x = _unit_columns(x)
    gram_matrix = matmul(transpose(x), x, numerics)
    if index == 0 or correction_tolerance is None:
      x = constrain(cholesky_pass(x, gram_matrix), numerics)
      continue
    # A pass followed by another may start further from orthonormal: its result
    # (≈ ‖E‖² ≤ tolerance) qualifies the next pass for a correction.
    last = index == passes - 1
    tolerance = correction_tolerance if last else correction_tolerance**0.5
    deviation = jnp.sqrt(jnp.sum(jnp.square(gram_matrix - eye), axis=(-2, -1)))
    x = constrain(
        lax.cond(
            jnp.all(deviation <= tolerance), first_order_pass, cholesky_pass, x,
            gram_matrix), numerics)
  return _unit_columns(x)


def _unit_columns(x: jax.Array) -> jax.Array:
  norms = jnp.sqrt(jnp.sum(x * x, axis=-2, keepdims=True))
  return x / jnp.maximum(norms, jnp.finfo(x.dtype).tiny)


def subspace_iteration_step(statistic: jax.Array, rows: jax.Array, *,
                            shift: float = 1e-5, numerics: Numerics = FP32):
  """One warm-started step of simultaneous (subspace) iteration for the
  eigenbasis of ``statistic``.

  Args:
    statistic: symmetric positive semi-definite ``A`` (..., n, n).
    rows: the previous eigenvectors as rows, ``Vᵀ`` (..., n, n), in order of
      decreasing eigenvalue.
    shift: ``A + shift·λ̂ I`` is iterated instead of ``A`` (λ̂ the largest
      column norm of ``A V``), which leaves the eigenvectors unchanged and
      bounds the condition number of ``A V`` by ``1/shift``, so that the fp32
      Cholesky-QR cannot break down on rank-deficient statistics (the first ``G
      Gᵀ``).

  Returns:
    ``(new_rows, eigenvalues)``: ``Pᵀ`` with ``P = orth(A V)``, and the Rayleigh
    quotients ``diag(Pᵀ A P)`` (fp32).
  """
  columns = transpose(rows)
  product = matmul(statistic, columns, numerics)
  largest = jnp.max(jnp.sqrt(jnp.sum(product * product, axis=-2)),
                    axis=-1)[..., None, None]
  basis = orthonormalize_columns(
      product + shift * largest * columns,
      correction_tolerance=CHOLESKY_QR_CORRECTION_TOLERANCE, numerics=numerics)
  eigenvalues = jnp.sum(basis * matmul(statistic, basis, numerics), axis=-2)
  return transpose(basis), eigenvalues


def relative_damping(eigenvalues: jax.Array, epsilon) -> jax.Array:
  """``ρ = ε · max(λ)`` per matrix (``docs/algorithms.md``, 4-bit Shampoo), kept
  strictly positive for an all-zero statistic."""
  largest = jnp.max(eigenvalues, axis=-1, keepdims=True)
  return epsilon * jnp.maximum(largest, 0.0) + jnp.finfo(jnp.float32).tiny


def inverse_root_from_eigenbasis(rows: jax.Array, eigenvalues: jax.Array, *,
                                 root: int = 4, epsilon=1e-6,
                                 numerics: Numerics = FP32) -> jax.Array:
  """``Vᵀ diag((λ + ρ)^(-1/root)) V`` with rows of ``rows`` the eigenvectors;
  ``ρ = ε·max(λ)``."""
  damped = jnp.maximum(eigenvalues, 0.0) + relative_damping(
      eigenvalues, epsilon)
  scaled = rows * (damped**(-1.0 / root))[..., :, None]
  return symmetrize(matmul(transpose(rows), scaled, numerics))


def inverse_root_eigh(statistic: jax.Array, *, root: int = 4, epsilon=1e-6,
                      numerics: Numerics = FP32) -> jax.Array:
  """``(A + ε·λmax I)^(-1/root)`` through a symmetric eigendecomposition
  (fp32)."""
  eigenvalues, vectors = per_matrix(
      lambda a: jnp.linalg.eigh(a, symmetrize_input=False),
      symmetrize(statistic), numerics=numerics)
  return inverse_root_from_eigenbasis(
      transpose(vectors), eigenvalues, root=root, epsilon=epsilon,
      numerics=numerics)


def largest_eigenvalue(statistic: jax.Array,
                       iterations: int = 100) -> jax.Array:
  """Power-iteration estimate of ``λmax`` of a PSD stack, shape ``(...,)``
  (Rayleigh quotient; its error is the square of the vector's, so 100
  matrix-vector products resolve even close top eigenvalues)."""
  n = statistic.shape[-1]
  vector = jnp.ones(statistic.shape[:-1], statistic.dtype) / jnp.sqrt(n)

  def body(_, v):
    w = jnp.einsum("...ij,...j->...i", statistic, v, precision=HIGHEST)
    return w / jnp.maximum(
        jnp.linalg.norm(w, axis=-1, keepdims=True),
        jnp.finfo(w.dtype).tiny)

  vector = lax.fori_loop(0, iterations, body, vector)
  return jnp.einsum("...i,...ij,...j->...", vector, statistic, vector,
                    precision=HIGHEST)


def inverse_root_newton(statistic: jax.Array, *, root: int = 4, epsilon=1e-6,
                        iterations: int = 30,
                        numerics: Numerics = FP32) -> jax.Array:
  """``(A + ε·λmax I)^(-1/root)`` by the coupled Newton iteration (Guo & Higham
  2006), matrix products only.

  ``M₀ = z A_ρ, H₀ = z^{1/p} I`` with ``z = (1 + p) / (2‖A_ρ‖)``; then ``T =
  ((p+1) I − M)/p``, ``H ← H T``, ``M ← T^p M``, so that ``M → I`` and ``H →
  A_ρ^{-1/p}``.
  """
  n = statistic.shape[-1]
  eye = jnp.eye(n, dtype=statistic.dtype)
  largest = largest_eigenvalue(statistic)
  damped = symmetrize(statistic) + (epsilon * jnp.maximum(
      largest, 0.0) + jnp.finfo(jnp.float32).tiny)[..., None, None] * eye
  # 1.05·λmax over-estimates the spectral norm safely (power iteration
  # approaches it from below).
  z = (1.0 + root) / (2.0 * 1.05 *
                      (largest * (1.0 + epsilon) + jnp.finfo(jnp.float32).tiny))
  m = damped * z[..., None, None]
  h = eye * (z**(1.0 / root))[..., None, None]

  def body(_, carry):
    m, h = carry
    t = ((root + 1.0) * eye - m) / root
    t_power = t
    for _ in range(root - 1):
      t_power = matmul(t_power, t, numerics)
    return matmul(t_power, m, numerics), matmul(h, t, numerics)

  _, h = lax.fori_loop(0, iterations, body, (m, h))
  return symmetrize(h)


def cholesky_lower(statistic: jax.Array, epsilon,
                   numerics: Numerics = FP32) -> jax.Array:
  """Lower Cholesky factor of ``A + ε·max(diag A)·I`` (NaN where the
  factorization fails)."""
  n = statistic.shape[-1]
  diagonal_max = jnp.max(jnp.diagonal(statistic, axis1=-2, axis2=-1), axis=-1)
  ridge = epsilon * jnp.maximum(diagonal_max, 0.0) + jnp.finfo(jnp.float32).tiny
  shifted = symmetrize(statistic) + ridge[..., None, None] * jnp.eye(
      n, dtype=statistic.dtype)
  return per_matrix(lambda a: lax.linalg.cholesky(a, symmetrize_input=False),
                    shifted, numerics=numerics)
