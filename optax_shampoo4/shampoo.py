"""Shampoo with 4-bit (or 8-/32-bit) preconditioner states, as an Optax transformation.

``scale_by_shampoo`` turns a gradient ``G`` of every matrix-shaped parameter into the grafted, preconditioned
gradient ``G̃ = Ĝ · ‖G‖_F / ‖Ĝ‖_F`` with ``Ĝ = L^{-1/4} G R^{-1/4}`` (per block), to be followed by a base
optimizer (AdamW or SGD with momentum; see :mod:`optax_shampoo4.alias`). Other parameters pass through.

The statistics ``L = β L + (1 − β) G Gᵀ`` and ``R = β R + (1 − β) Gᵀ G`` are stored in one of three ways:

``"eigenvectors"`` [S4]
  the eigenvector matrix ``U`` of each statistic, 4-bit linear-2 (block-wise along each eigenvector), plus
  the eigenvalues in fp32. Every ``statistics_every`` steps: dequantize, one Björck step, rebuild
  ``L = Uᵀ diag(λ) U``, take the EMA, one warm-started step of subspace iteration, Rayleigh quotients.
  Every ``inverse_root_every`` steps: 4 Björck steps and ``U diag((λ + ε·λmax)^{-1/4}) Uᵀ``.
``"matrix"``
  ``L`` itself, diagonal in fp32 and the rest 4-bit — the naive baseline of [S4], which fails at 4 bits;
  at ``bits=32`` this is classic Shampoo with fp32 statistics [S4, Alg. 4].
``"cholesky"`` [CQ]
  the Cholesky factor ``C`` of ``L + ε·max(diag L) I``, with error feedback ``E`` stored transposed in the
  upper triangle of the same 4-bit array (diagonal in fp32).

In all three the inverse root itself is stored with its diagonal in fp32 and the rest 4-bit.

References:
  [S4] Wang, Zhou, Li, Huang. *4-bit Shampoo for Memory-Efficient Network Training.* NeurIPS 2024.
  [CQ] Li, Ding, Toh, Zhou. *Memory-Efficient 4-bit Preconditioned Stochastic Optimization.* arXiv 2412.10663.
  Gupta, Koren, Singer. *Shampoo: Preconditioned Stochastic Tensor Optimization.* ICML 2018.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_shampoo4 import blocking
from optax_shampoo4 import linalg
from optax_shampoo4.quantization import QuantizedArray, dequantize, quantize, validate_quantization_args

STORAGES = ("eigenvectors", "matrix", "cholesky")
INVERSE_ROOT_METHODS = ("eigh", "newton")
PRECISIONS = {"default": lax.Precision.DEFAULT, "high": lax.Precision.HIGH, "highest": lax.Precision.HIGHEST}
# Products of the statistics / inverse-root updates: fp32, or three bf16 passes (≈1e-5 relative error, about
# twice the rate of fp32 on GPUs). XLA's CPU backend does not implement the bf16 algorithms for every dot, and
# has no faster path for them, so CPUs always use fp32.
LINALG_PRECISIONS = {"highest": lax.Precision.HIGHEST, "bf16_3x": lax.DotAlgorithmPreset.BF16_BF16_F32_X3}
# An eigenbasis whose rows deviate from orthonormality by more than this after an update is rejected.
ORTHOGONALITY_TOLERANCE = 1e-3
ROOT = 4  # Shampoo's L^{-1/4} G R^{-1/4} for 2-D blocks


def _linalg_precision(name: str):
  return lax.Precision.HIGHEST if jax.default_backend() == "cpu" else LINALG_PRECISIONS[name]


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


def _select(ok: jax.Array, new, old):
  """Per stack element: ``new`` where ``ok`` (shape ``(k,)``), else ``old`` (works through QuantizedArray)."""
  def pick(a, b):
    return jnp.where(ok.reshape(ok.shape + (1,) * (a.ndim - 1)), a, b)
  return jax.tree.map(pick, new, old)


def _all_finite(x: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------------------------------------
# Storages
# ----------------------------------------------------------------------------------------------------------
class EigenPreconditioner(NamedTuple):
  """Eigenvector storage [S4]: rows of ``eigenvectors`` are eigenvectors (decreasing eigenvalue)."""

  eigenvectors: Stored  # (k, n, n)
  eigenvalues: jax.Array  # (k, n) fp32
  inverse_root: Stored  # (k, n, n), diagonal kept in fp32


class MatrixPreconditioner(NamedTuple):
  """The statistic itself (diagonal kept in fp32) — naive at 4 bits, classic Shampoo at 32."""

  statistic: Stored
  inverse_root: Stored


class CholeskyPreconditioner(NamedTuple):
  """[CQ]: lower triangle + diagonal = Cholesky factor C̄; strict upper triangle = error state Eᵀ."""

  factor_and_error: Stored
  inverse_root: Stored


@dataclasses.dataclass(frozen=True)
class _Hyper:
  """Numeric hyperparameters (possibly traced, e.g. under ``optax.inject_hyperparams``)."""

  beta: Any
  epsilon: Any
  error_feedback_beta: Any


@dataclasses.dataclass(frozen=True)
class _Storage:
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

  def update_inverse_root(self, state, hyper: _Hyper):
    # computed and quantized where its block's statistics live (under linalg.constrain_stacks), whatever
    # the stored root's own sharding
    root = linalg.constrain(self._compute_inverse_root(state, hyper))
    ok = _all_finite(root)
    stored = jax.tree.map(linalg.constrain, self._store_root(root))
    return state._replace(inverse_root=_select(ok, stored, state.inverse_root)), ok


class _EigenStorage(_Storage):

  def init(self, k, n, hyper):
    eye = self._identity(k, n)
    return EigenPreconditioner(self.codec.store(eye), jnp.full((k, n), hyper.epsilon, jnp.float32),
                               self._store_root(eye))

  def update_statistics(self, state, grams, hyper):
    rows = self.codec.load(state.eigenvectors)
    if self.codec.quantized:  # fp32 rows come out of orthonormalize_columns already orthonormal
      rows = linalg.bjorck(rows, self.bjorck_steps[0])
    previous = linalg.matmul(linalg.transpose(rows), rows * state.eigenvalues[..., :, None])
    # symmetric up to rounding, which the products below do not need removed
    statistic = hyper.beta * previous + (1.0 - hyper.beta) * grams
    new_rows, eigenvalues = linalg.subspace_iteration_step(statistic, rows)
    # Keep the basis sorted by decreasing eigenvalue: subspace iteration with a triangular (QR)
    # orthonormalization converges to that order, and a wrong order makes it rotate pairs instead.
    order = jnp.argsort(-eigenvalues, axis=-1)
    eigenvalues = jnp.maximum(jnp.take_along_axis(eigenvalues, order, axis=-1), 0.0)
    new_rows = jnp.take_along_axis(new_rows, order[..., :, None], axis=-2)
    ok = (_all_finite(new_rows) & _all_finite(eigenvalues) &
          (linalg.orthogonality_error_estimate(new_rows) <= ORTHOGONALITY_TOLERANCE))
    new = state._replace(eigenvectors=self.codec.store(new_rows), eigenvalues=eigenvalues)
    return _select(ok, new, state), ok

  def _compute_inverse_root(self, state, hyper):
    rows = linalg.bjorck(self.codec.load(state.eigenvectors), self.bjorck_steps[1])
    return linalg.inverse_root_from_eigenbasis(rows, state.eigenvalues, root=ROOT, epsilon=hyper.epsilon)


class _MatrixStorage(_Storage):

  def init(self, k, n, hyper):
    eye = self._identity(k, n)
    return MatrixPreconditioner(self.codec.store(hyper.epsilon * eye, keep_diagonal=True), self._store_root(eye))

  def update_statistics(self, state, grams, hyper):
    statistic = hyper.beta * self.codec.load(state.statistic) + (1.0 - hyper.beta) * grams
    ok = _all_finite(statistic)
    new = state._replace(statistic=self.codec.store(statistic, keep_diagonal=True))
    return _select(ok, new, state), ok

  def _compute_inverse_root(self, state, hyper):
    return self._matrix_inverse_root(self.codec.load(state.statistic), hyper.epsilon)


class _CholeskyStorage(_Storage):

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
    ok = _all_finite(cholesky)
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
    return _select(ok, new, state), ok

  def _compute_inverse_root(self, state, hyper):
    return self._matrix_inverse_root(self.statistic(state), hyper.epsilon)


_STORAGE_CLASSES = {"eigenvectors": _EigenStorage, "matrix": _MatrixStorage, "cholesky": _CholeskyStorage}


# ----------------------------------------------------------------------------------------------------------
# The transformation
# ----------------------------------------------------------------------------------------------------------
class ShampooState(NamedTuple):
  """State of :func:`scale_by_shampoo`.

  Attributes:
    count: steps taken (int32); steps whose gradient had a NaN/Inf are not counted.
    preconditioners: one entry per preconditioner order ``"order_<n>"``, a stack of ``k`` preconditioners
      (an :class:`EigenPreconditioner`, :class:`MatrixPreconditioner` or :class:`CholeskyPreconditioner`).
    nonfinite_count: steps skipped because a gradient leaf held NaN/Inf (int32).
    failure_count: preconditioner updates rejected (non-finite or non-orthogonal result) and replaced by the
      previous preconditioner (int32).
  """

  count: jax.Array
  preconditioners: Dict[str, Any]
  nonfinite_count: jax.Array
  failure_count: jax.Array


class _NotParams:
  """Marks, for ``optax.tree.map_params``, state that is not shaped like the parameters."""

  def __repr__(self):
    return "NOT_PARAMS"


NOT_PARAMS = _NotParams()


def _stack_key(order: int) -> str:
  return f"order_{order}"


def _check_int(name, value, minimum=1):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_number(name, value, low=None, high=None, low_open=False, high_open=False):
  """Validates a numeric hyperparameter; traced/array values (inject_hyperparams) are accepted as is."""
  if isinstance(value, (jax.Array, np.ndarray)) or callable(value):
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
  if not np.isfinite(value):
    raise ValueError(f"{name} must be finite, got {value}")
  if low is not None and (value < low or (low_open and value == low)):
    raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
  if high is not None and (value > high or (high_open and value == high)):
    raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")


def scale_by_shampoo(
    *,
    bits: int = 4,
    quantize: str = "eigenvectors",
    block_size: int = 64,
    codebook: str = "linear2",
    max_order: int = 1200,
    statistics_every: int = 100,
    inverse_root_every: int = 500,
    beta: float = 0.95,
    epsilon: float = 1e-6,
    bjorck_steps: Tuple[int, int] = (1, 4),
    min_quantized_size: int = 4096,
    start_step: int = 1,
    inverse_root_method: Optional[str] = None,
    error_feedback: bool = True,
    error_feedback_beta: float = 0.0,
    preconditioning_precision: str = "high",
    linalg_precision: Optional[str] = None,
    shard_blocks: Union[int, jax.sharding.NamedSharding] = 1,
    replicate_roots: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Shampoo preconditioning with quantized preconditioner states [S4][CQ], to chain before a base optimizer.

  Every step, each parameter with at least two non-unit axes is folded to 2-D (see
  :mod:`optax_shampoo4.blocking`), cut into blocks of at most ``max_order``, and each block ``G`` becomes
  ``L̂ G R̂`` with ``L̂ ≈ L^{-1/4}``, ``R̂ ≈ R^{-1/4}``; the result is grafted per tensor to ``‖G‖_F``. Other
  parameters pass through unchanged. Until the first inverse-root step ``L̂ = R̂ = I``, so the output equals
  the gradient.

  Args:
    bits: 4 or 8 (quantized preconditioners) or 32 (fp32: the full-precision baseline, same code path).
    quantize: what is stored: ``"eigenvectors"`` (4-bit Shampoo [S4]), ``"matrix"`` (the statistic itself:
      the naive 4-bit baseline, or classic Shampoo at ``bits=32``) or ``"cholesky"`` (the Cholesky factor
      with error feedback [CQ]).
    block_size: quantization block (elements along each row), default 64 [S4]. Static.
    codebook: quantization codebook, default ``"linear2"``; ``"dynamic_tree"`` for the ablation. Static.
    max_order: largest preconditioner order; larger dimensions are split into chunks (default 1200). Static.
    statistics_every: ``T1``, steps between statistics updates (default 100).
    inverse_root_every: ``T2``, steps between inverse-root updates (default 500).
    beta: EMA factor of the statistics, in [0, 1) (default 0.95).
    epsilon: relative damping: inverse roots use ``λ + ε·λmax`` (default 1e-6); also the initial eigenvalues.
    bjorck_steps: ``(t1, t2)`` Björck steps before the statistics update and before the inverse root
      (default ``(1, 4)``). Static.
    min_quantized_size: preconditioners with fewer than this many elements (order² <) stay fp32
      (default 4096, i.e. orders below 64). Static.
    start_step: statistics and inverse roots are updated only from this (1-based) step on (default 1).
    inverse_root_method: for ``"matrix"`` and ``"cholesky"``: ``"eigh"`` (symmetric eigendecomposition) or
      ``"newton"`` (coupled Newton iteration, matrix products only). Default: ``"eigh"`` for quantized
      storage, ``"newton"`` at ``bits=32`` — measured on an H100 (``benchmarks/inverse_root.py``), batched
      fp32 eigh is 3.4–4.4× faster but only 2.8 % accurate on ill-conditioned statistics (below the 3.3 %
      of storing the root in 4 bits), Newton 1e-4–3e-3. Static.
    error_feedback: ``"cholesky"`` only: quantize ``C + E`` and carry the quantization error (default True).
    error_feedback_beta: ``"cholesky"`` only: EMA factor ``β_e`` of the error state (default 0.0 — plain error feedback — chosen by
      experiment, see ``docs/ablation.md``).
    preconditioning_precision: matmul precision of the per-step ``L̂ G R̂`` only: ``"high"`` (default: TF32
      on GPUs, 3 bf16 passes on TPUs — far below the 4-bit quantization error), ``"highest"`` or
      ``"default"``. Static.
    linalg_precision: matmul precision of the statistics and inverse-root updates: ``"highest"`` (fp32) or
      ``"bf16_3x"`` (three bf16 passes, relative error ≈1e-5, about 2× the fp32 rate on H100s; CPUs use
      fp32 either way). Default: ``"highest"`` at ``bits=32``, ``"bf16_3x"`` for quantized storage, whose 4-bit
      eigenvectors carry errors near 1e-2 (measured in ``benchmarks/profile.py``). Static.
    shard_blocks: how the preconditioner stacks are spread over devices. A ``NamedSharding`` such as
      ``NamedSharding(mesh, P("blocks"))`` (the first entry of its spec names the mesh axis, or axes, of the
      stacks' leading axis): every stack is padded to a multiple of that axis's size, and the statistics
      and inverse-root updates keep every stack they compute sharded along it (sharding constraints), so
      each device does the work of its share of blocks. An int only pads the stacks to a multiple of it and
      leaves the layout inside the step to the compiler's sharding propagation — which, measured on two
      H200s, replicated the work of the updates on both devices. Shard the state itself with
      :func:`optax_shampoo4.sharding.optimizer_state_sharding`. Static.
    replicate_roots: with ``shard_blocks`` a ``NamedSharding``: keep the stored (4-bit) inverse roots whole
      on every device while the statistics stay sharded — the updates are still split over the devices
      and gather the new roots once per inverse-root update, and the per-step ``L̂ G R̂`` needs no
      communication. Costs the roots' bytes (about half of the preconditioner state) on every device.
      Shard the state with ``optimizer_state_sharding(..., replicate_roots=True)`` to match. Static.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`ShampooState`.

  Memory per preconditioner of order n (4-bit eigenvectors): ``2 × (n²/2 + 4n·⌈n/64⌉)`` bytes for the two
  4-bit matrices plus ``8n`` bytes of fp32 eigenvalues and diagonal — about 7× less than the ``8n²`` bytes of
  fp32 ``L`` and ``L^{-1/4}``.
  """
  _check_int("bits", bits)
  if bits not in (4, 8, 32):
    raise ValueError(f"bits must be one of (4, 8, 32), got {bits!r}")
  if quantize not in STORAGES:
    raise ValueError(f"quantize must be one of {STORAGES}, got {quantize!r}")
  if inverse_root_method is None:
    inverse_root_method = "newton" if bits == 32 else "eigh"
  if inverse_root_method not in INVERSE_ROOT_METHODS:
    raise ValueError(f"inverse_root_method must be one of {INVERSE_ROOT_METHODS}, got {inverse_root_method!r}")
  if preconditioning_precision not in PRECISIONS:
    raise ValueError(f"preconditioning_precision must be one of {tuple(PRECISIONS)}, "
                     f"got {preconditioning_precision!r}")
  if linalg_precision is None:
    linalg_precision = "highest" if bits == 32 else "bf16_3x"
  if linalg_precision not in LINALG_PRECISIONS:
    raise ValueError(f"linalg_precision must be one of {tuple(LINALG_PRECISIONS)}, got {linalg_precision!r}")
  if bits != 32:
    validate_quantization_args(codebook=codebook, bits=bits, block_size=block_size)
  _check_int("max_order", max_order, 2)
  _check_int("min_quantized_size", min_quantized_size, 0)
  _check_int("start_step", start_step, 1)
  block_sharding = shard_blocks if isinstance(shard_blocks, jax.sharding.NamedSharding) else None
  whole = None  # the replicated sharding on block_sharding's mesh
  if block_sharding is not None:
    whole = jax.sharding.NamedSharding(block_sharding.mesh, jax.sharding.PartitionSpec())
    axes = block_sharding.spec[0] if len(block_sharding.spec) else None
    if axes is None:
      raise ValueError("shard_blocks: the NamedSharding's spec must name a mesh axis for the stacks' leading "
                       f"axis, got {block_sharding.spec}")
    axes = axes if isinstance(axes, tuple) else (axes,)
    shard_blocks = int(np.prod([block_sharding.mesh.shape[a] for a in axes]))
  else:
    axes = None
    _check_int("shard_blocks", shard_blocks, 1)
  if not isinstance(replicate_roots, bool):
    raise TypeError(f"replicate_roots must be a bool, got {type(replicate_roots).__name__}")
  if replicate_roots and block_sharding is None:
    raise ValueError("replicate_roots needs shard_blocks to be a NamedSharding (the mesh to replicate over)")
  for name, value in (("statistics_every", statistics_every), ("inverse_root_every", inverse_root_every)):
    if isinstance(value, (jax.Array, np.ndarray)):
      continue
    _check_int(name, value, 1)
  if (not isinstance(bjorck_steps, (tuple, list)) or len(bjorck_steps) != 2 or
      any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in bjorck_steps)):
    raise ValueError(f"bjorck_steps must be a pair of non-negative ints (t1, t2), got {bjorck_steps!r}")
  check_number("beta", beta, 0.0, 1.0, high_open=True)
  check_number("epsilon", epsilon, 0.0, low_open=True)
  check_number("error_feedback_beta", error_feedback_beta, 0.0, 1.0, high_open=True)
  if not isinstance(error_feedback, bool):
    raise TypeError(f"error_feedback must be a bool, got {type(error_feedback).__name__}")

  bjorck_steps = tuple(int(s) for s in bjorck_steps)
  quantized_codec = MatrixCodec(bits, codebook, block_size)
  fp32_codec = MatrixCodec(32, codebook, block_size)
  precision = PRECISIONS[preconditioning_precision]
  storage_class = _STORAGE_CLASSES[quantize]

  def storage_for(order: int) -> _Storage:
    codec = quantized_codec if order * order >= min_quantized_size else fp32_codec
    return storage_class(codec, bjorck_steps, inverse_root_method, error_feedback)

  def hyper() -> _Hyper:
    return _Hyper(beta, epsilon, error_feedback_beta)

  def stack_constraint(length: int):
    """Keeps arrays whose leading axis is a stack of ``length`` blocks sharded along ``shard_blocks``."""
    if block_sharding is None:
      return None

    def constrain(x):
      if getattr(x, "ndim", 0) < 1 or x.shape[0] != length:
        return x
      spec = jax.sharding.PartitionSpec(axes, *([None] * (x.ndim - 1)))
      return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(block_sharding.mesh, spec))
    return constrain

  def constrain_stack(stack, length: int):
    """The statistics of a stack stay sharded; its stored inverse root is replicated with
    ``replicate_roots``, else follows the state's sharding."""
    constraint = stack_constraint(length)
    if constraint is None:
      return stack
    if not hasattr(stack, "inverse_root"):  # the grams
      return jax.tree.map(constraint, stack)
    stack = stack._replace(**{name: jax.tree.map(constraint, getattr(stack, name))
                              for name in stack._fields if name != "inverse_root"})
    if replicate_roots:
      stack = stack._replace(inverse_root=jax.tree.map(
          lambda x: jax.lax.with_sharding_constraint(x, whole), stack.inverse_root))
    return stack

  def plan_for(tree) -> Tuple[blocking.Plan, Any, Sequence[jax.Array]]:
    leaves, treedef = jax.tree.flatten(tree)
    plan = blocking.make_plan(tuple(tuple(np.shape(x)) for x in leaves), max_order, shard_blocks)
    return plan, treedef, leaves

  def init_fn(params):
    if type(params).__name__ == "_ParamsPlaceholder":
      # optax.tree.map_params probes the state's layout with a placeholder for the whole params tree; the
      # preconditioner stacks are not params-shaped, so they are marked as one non-params leaf.
      counter = lambda: jnp.zeros([], jnp.int32)
      return ShampooState(counter(), NOT_PARAMS, counter(), counter())
    plan, _, _ = plan_for(params)
    preconditioners = {
        _stack_key(order): storage_for(order).init(plan.stack_length(order), order, hyper())
        for order in plan.orders}
    counter = lambda: jnp.zeros([], jnp.int32)  # distinct buffers: the state may be donated
    return ShampooState(counter(), preconditioners, counter(), counter())

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    plan, treedef, leaves = plan_for(updates)
    hp = hyper()
    step = state.count + 1
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves] or [True]))

    matrices = [None if ms is None else jnp.reshape(x, ms).astype(jnp.float32)
                for x, ms in zip(leaves, plan.matrix_shapes)]
    group_blocks = blocking.gather_blocks(plan, matrices)

    def update_stack(order, preconditioners, update):
      """``update(storage, stack)`` of one order's stack, every stack it computes kept on ``shard_blocks``."""
      length = plan.stack_length(order)
      with linalg.constrain_stacks(stack_constraint(length)):
        new, ok = update(storage_for(order), constrain_stack(preconditioners[_stack_key(order)], length))
      return constrain_stack(new, length), ok

    def statistics_grams(order):
      """The ``(stack_length, order, order)`` Grams of this step's gradient blocks, in slot order."""
      eye = jnp.eye(order, dtype=jnp.float32)
      if block_sharding is None:
        left = [linalg.gram(g) for g in group_blocks]
        right = [linalg.gram(linalg.transpose(g)) for g in group_blocks]
        return blocking.assemble_stack(plan, order, left, right, fill=eye)
      # Sharded: slot the gradient blocks themselves, shard that stack, then take the Grams, so each device
      # computes the Grams of its own slots. (Grams taken per block group and then assembled were computed
      # whole on every device, and their concatenation into a sharded stack moved data between devices.)
      # The slotted stack is constrained whole and then sharded — each device slices its slots out of its
      # replicated gradient; constrained sharded only, its concatenation became all-to-alls. The blocks
      # stay replicated too: left to propagation, the stacks' sharding reaches back into the gradient
      # blocks, which the per-step product then reshuffles between devices every step.
      blocks = [jax.lax.with_sharding_constraint(g, whole) for g in group_blocks]
      length = plan.stack_length(order)
      oriented = jax.lax.with_sharding_constraint(blocking.oriented_blocks(plan, order, blocks), whole)
      oriented = stack_constraint(length)(oriented)
      with linalg.constrain_stacks(stack_constraint(length)):
        grams = linalg.gram(oriented)
      return jnp.where(blocking.padding_slots(plan, order)[:, None, None], eye, grams)

    def update_statistics(preconditioners):
      new, failures = {}, jnp.zeros([], jnp.int32)
      for order in plan.orders:
        grams = constrain_stack(statistics_grams(order), plan.stack_length(order))
        new[_stack_key(order)], ok = update_stack(
            order, preconditioners, lambda storage, stack: storage.update_statistics(stack, grams, hp))
        failures += jnp.sum(~ok)
      return new, failures

    def update_inverse_roots(preconditioners):
      new, failures = {}, jnp.zeros([], jnp.int32)
      for order in plan.orders:
        new[_stack_key(order)], ok = update_stack(
            order, preconditioners, lambda storage, stack: storage.update_inverse_root(stack, hp))
        failures += jnp.sum(~ok)
      return new, failures

    def unchanged(preconditioners):
      return preconditioners, jnp.zeros([], jnp.int32)

    def update_due(preconditioners):
      preconditioners, stats_failures = lax.cond(do_statistics, update_statistics, unchanged, preconditioners)
      preconditioners, root_failures = lax.cond(do_roots, update_inverse_roots, unchanged, preconditioners)
      return preconditioners, stats_failures + root_failures

    active = finite & (step >= start_step)
    do_statistics = active & (step % statistics_every == 0)
    do_roots = active & (step % inverse_root_every == 0)
    # XLA:GPU copies every conditional's predicate to the host and waits for it, which drains the launch
    # queue: a plain step reads one predicate (the outer cond), and each expensive branch is traced once.
    with linalg.precision(_linalg_precision(linalg_precision)):  # the branches are traced here
      preconditioners, failures = lax.cond(do_statistics | do_roots, update_due, unchanged, state.preconditioners)
    preconditioners = {_stack_key(order): constrain_stack(preconditioners[_stack_key(order)], plan.stack_length(order))
                       for order in plan.orders}

    # Slice the stored (4-bit) roots per block group and dequantize the slices: with stacks sharded over
    # devices, what moves between devices is then codes, not fp32 matrices.
    stored_roots = {order: preconditioners[_stack_key(order)].inverse_root for order in plan.orders}
    load = lambda order, stored: storage_for(order).codec.load(stored)
    preconditioned = [
        jnp.matmul(jnp.matmul(load(group.rows, left), g, precision=precision), load(group.cols, right),
                   precision=precision)
        for g, group, (left, right) in zip(group_blocks, plan.groups, blocking.group_slices(plan, stored_roots))]
    new_matrices = blocking.scatter_blocks(plan, preconditioned)

    outputs = list(leaves)
    for index, matrix in new_matrices.items():
      gradient = matrices[index]
      grafted = matrix * (jnp.linalg.norm(gradient) / (jnp.linalg.norm(matrix) + 1e-12))
      outputs[index] = grafted.reshape(leaves[index].shape).astype(leaves[index].dtype)

    new_state = ShampooState(
        count=jnp.where(finite, step, state.count).astype(jnp.int32),
        preconditioners=preconditioners,
        nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32),
        failure_count=state.failure_count + failures)
    return jax.tree.unflatten(treedef, outputs), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_storage(quantize: str = "eigenvectors", *, bits: int = 4, codebook: str = "linear2",
                 block_size: int = 64, bjorck_steps: Tuple[int, int] = (1, 4), inverse_root_method: str = "eigh",
                 error_feedback: bool = True):
  """One preconditioner storage (the object :func:`scale_by_shampoo` uses per order class), for analysis.

  Its methods ``init(count, order, hyper)``, ``update_statistics(state, grams, hyper)``,
  ``update_inverse_root(state, hyper)`` and ``inverse_root(state)`` act on a stack of preconditioners;
  ``hyper`` is ``Hyper(beta, epsilon, error_feedback_beta)``.
  """
  codec = MatrixCodec(bits, codebook, block_size)
  return _STORAGE_CLASSES[quantize](codec, tuple(bjorck_steps), inverse_root_method, error_feedback)


Hyper = _Hyper
