"""Frozen, self-validating configs for the structural choices of the optimizers.

Structure (bit widths, storages, codebooks, block sizes, orders, layouts,
sharding) lives here, in objects that ``optax.inject_hyperparams`` leaves alone;
the numbers users schedule or log (learning rate, betas, epsilons, the update
intervals) stay plain arguments of the factories, so they can be traced. See
``docs/algorithms.md`` for what each choice means.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional, Tuple, Union

import jax
import numpy as np

from optax_shampoo4 import _checks
from optax_shampoo4.quantization import validate_quantization_args

STORAGES = ("eigenvectors", "matrix", "cholesky")
INVERSE_ROOT_METHODS = ("eigh", "newton")
PRECONDITIONING_PRECISIONS = ("bf16", "default", "high", "highest")
LINALG_PRECISIONS = ("highest", "bf16_3x", "high")
SECOND_MOMENTS = ("rank1", "block", "factored")
IMPLEMENTATIONS = ("xla", "pallas")
MIB = 2**20
# Björck steps (statistics update, use) of a loaded 4-bit basis, by algorithm;
# ShampooConfig.bjorck_steps says why the uses differ. The first entries agree:
# SOAP's refresh is Shampoo's statistics step (shampoo.update_statistics).
DEFAULT_BJORCK_STEPS = {"shampoo": (1, 4), "soap": (1, 0)}


@dataclasses.dataclass(frozen=True)
class DimensionNumbers:
  """Which axes of one tensor are a preconditioned matrix's rows and which its
  columns.

  Axes in neither group are batch axes: each index along them is preconditioned
  as its own matrix (as ``optax.contrib.MuonDimensionNumbers`` does). Negative
  axes count from the end.

  Example: ``DimensionNumbers(rows=(0,), cols=(2,))`` on a ``(d_model, heads,
  head_dim)`` kernel gives every head its own ``(d_model, head_dim)`` matrix.
  Neither rows nor columns (:data:`NO_PRECONDITIONER`): the leaf gets no
  preconditioner, and its gradient passes to the base optimizer as a bias's
  does.
  """

  rows: Tuple[int, ...]
  cols: Tuple[int, ...]

  def __post_init__(self):
    for name in ("rows", "cols"):
      axes = getattr(self, name)
      if isinstance(axes, int):
        object.__setattr__(self, name, (axes,))
      elif not isinstance(axes, tuple) or not all(
          isinstance(a, int) and not isinstance(a, bool) for a in axes):
        raise TypeError(
            f"DimensionNumbers.{name} must be an int or a tuple of ints, got "
            f"{axes!r}"
        )
    if bool(self.rows) != bool(self.cols):
      raise ValueError(
          "DimensionNumbers needs at least one row axis and one column axis "
          f"(or neither: NO_PRECONDITIONER), got {self}")

  def resolve(
      self,
      ndim: int) -> Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]:
    """``(batch, rows, cols)`` as non-negative axes of a rank-``ndim``
    tensor."""
    norm = lambda axes: tuple(a % ndim
                              if -ndim <= a < ndim else _bad_axis(a, ndim)
                              for a in axes)
    rows, cols = norm(self.rows), norm(self.cols)
    if len(set(rows + cols)) != len(rows) + len(cols):
      raise ValueError(
          f"DimensionNumbers rows {self.rows} and cols {self.cols} overlap or "
          "repeat an axis"
      )
    batch = tuple(a for a in range(ndim) if a not in rows + cols)
    return batch, rows, cols


#: The :class:`DimensionNumbers` of a leaf that gets no preconditioner.
NO_PRECONDITIONER = DimensionNumbers(rows=(), cols=())


def unpreconditioned_biases(params: Any) -> Any:
  """Dimension numbers that leave every leaf named ``bias`` unpreconditioned and
  every other leaf to the shape rule: ``ShampooConfig``'s default.

  Flax's attention and ``DenseGeneral`` biases are ``(heads, head_dim)``, which
  the shape rule, seeing two axes longer than 1, would precondition as a
  matrix. A GPT's 36 such biases made orders 12 and 64 of its stacks and 12 %
  of its statistics program's instructions (``docs/benchmarks.md``,
  "Attention biases"). A leaf is a bias when the last key of its path is
  ``bias`` (linen), or ``bias`` then ``value`` (``nnx``), or, in a flattened
  tree, a key whose last ``/``- or ``.``-separated name is ``bias``
  (``"block/attn/bias"``, ``"['attn']['bias']"``).
  """

  def leaf_spec(path, _):
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    names = [n for n in names if isinstance(n, str)]
    if names[-1:] == ["value"]:
      names = names[:-1]
    # a flattened tree's keys: "block/attn/bias", "h0.attn.bias", keystr's
    words = re.split(r"[/.\[\]'\"]+", names[-1]) if names else []
    is_bias = [w for w in words if w][-1:] == ["bias"]
    return NO_PRECONDITIONER if is_bias else None

  return jax.tree_util.tree_map_with_path(leaf_spec, params)


def _bad_axis(axis: int, ndim: int):
  raise ValueError(
      f"DimensionNumbers axis {axis} is out of range for a tensor of rank "
      f"{ndim}"
  )


# A pytree of DimensionNumbers / None shaped like the params (None: the default
# rule), or a function of the params that returns one.
DimensionNumbersSpec = Union[None, Any, Callable[[Any], Any]]


def dimension_numbers_leaves(spec: Any) -> list:
  """The leaves of a pytree of DimensionNumbers / None, in params order; raises
  naming ``dimension_numbers`` on any other leaf (the count is checked against
  the params at ``init``, where they are known)."""
  leaves = jax.tree.leaves(
      spec, is_leaf=lambda x: x is None or isinstance(x, DimensionNumbers))
  wrong = [
      x for x in leaves
      if x is not None and not isinstance(x, DimensionNumbers)
  ]
  if wrong:
    raise TypeError(
        "dimension_numbers must be a pytree of DimensionNumbers or None shaped "
        f"like the params, or a function of the params; got a leaf {wrong[0]!r}"
    )
  return leaves


@dataclasses.dataclass(frozen=True)
class ShampooConfig:
  """Structure of Shampoo's preconditioners (and of SOAP's bases): how they are
  stored and laid out.

  Attributes:
    bits: 4 or 8 (quantized) or 32 (fp32: the full-precision baseline, same code
      path).
    storage: ``"eigenvectors"`` (4-bit Shampoo), ``"matrix"`` (the statistic
      itself: the naive 4-bit baseline, or classic Shampoo at 32 bits) or
        ``"cholesky"`` (Cholesky factor with error feedback).
    codebook: 4/8-bit codebook of the stored matrices (default ``"linear2"``).
    block_size: elements per quantization block along each stored row (default
      64).
    max_order: largest preconditioner order; longer sides are cut into chunks of
      this size (default 1200).
    min_quantized_size: matrices with fewer elements (``order²``) stay fp32
      (default 4096).
    bjorck_steps: Björck steps applied to a loaded 4-bit basis ``(statistics
      update, use)``, the use being Shampoo's inverse roots or SOAP's rotations
      of every step; SOAP's refresh rectifies its change of basis by the
      first. Default (``None``): ``(1, 4)`` for Shampoo, whose
      ``λ^(-1/4)`` amplifies a basis's error [S4, §3.2]; ``(1, 0)`` for SOAP,
      whose Adam runs in whatever basis it is given (its preconditioner ``Ũᵀ D
      Ũ`` stays positive definite); a step on each basis per step cost SOAP's
      plain step about a fifth of its GPU time and left the loss within noise
      (``docs/benchmarks.md``, "SOAP's rotations without the per-step
      rectification").
    inverse_root_method: ``"eigh"`` or ``"newton"`` for the
      ``"matrix"``/``"cholesky"`` storages; default ``"newton"`` at 32 bits,
      ``"eigh"`` otherwise.
    error_feedback: ``"cholesky"`` only: quantize ``C + E`` and carry the
      quantization error.
    preconditioning_precision: precision of the per-step products, Shampoo's
      ``L̂ G R̂`` and SOAP's rotations (with any per-step rectification of its
      4-bit bases): ``"bf16"`` (operands rounded to bf16, fp32 accumulation),
      ``"high"`` (TF32 on GPUs, 3 bf16 passes on TPUs), ``"highest"`` or
      ``"default"``. Default (``None``): ``"bf16"`` for Shampoo's quantized
      roots, whose 4 or 8 bits bf16's 8-bit significand holds, on GPUs and
      TPUs; ``"high"`` otherwise and for SOAP, where bf16 changed the update by
      under 1 % and the byte-level LM's loss within noise
      (``docs/benchmarks.md``).
    linalg_precision: precision of the statistics and root updates:
      ``"highest"`` (fp32), ``"bf16_3x"`` (three bf16 passes, relative error
      ≈1e-5) or ``"high"`` (one TF32 pass on GPUs, ≈5e-4, three bf16 passes on
      TPUs; the orthonormalization's Gram matrices stay at ``"bf16_3x"``); CPUs
      use fp32 whichever is named. Default: ``"highest"`` at 32 bits,
      ``"bf16_3x"`` for quantized storage, the fastest precision with
      fp32-level eigenvalues (``docs/benchmarks.md``, "Precision of the
      statistics step"). ``"high"`` suits SOAP's 4-bit bases, whose own
      rounding (≈1e-2) is far above TF32's (``docs/benchmarks.md``, "SOAP's
      refresh at TF32").
    rectification_precision: of the Björck steps on a loaded quantized basis
      (``linalg_precision``'s names). Default: ``"high"`` for 4-bit bases
      unless ``linalg_precision="highest"``, since their own error (≈1e-2)
      and 4-bit roots hide TF32's rounding (``docs/algorithms.md``, "4-bit
      Shampoo"); ``linalg_precision`` otherwise.
    dimension_numbers: per-leaf :class:`DimensionNumbers` overriding the shape
      rule of ``docs/algorithms.md`` ("Shapes"): a pytree like the params with
      ``None`` for "the shape rule", or a function of the params returning
      one. Default :func:`unpreconditioned_biases`: every leaf named ``bias``
      goes to the base optimizer unpreconditioned, whatever its shape, and
      every other leaf follows the shape rule; ``None``: the shape rule for
      all. Without preconditioners for its 36 ``(heads, head_dim)`` attention
      biases, the training programs of the benchmarks' 86 M-param GPT
      compiled faster at the same loss within run-to-run noise
      (``docs/benchmarks.md``, "Attention biases").
    working_set_bytes: fp32 bytes the statistics, root and preconditioning work
      may hold at once per order class; stacks are processed chunk by chunk
      within it. ``None``: whole stacks at once (fastest compile on small
      models, largest memory). Default 1 GiB: within it the per-step
      products of an 86 M-param model's stacks run whole instead of in a loop,
      and its statistics steps in larger batches, and its mean training step
      was shorter than at 256 MiB (``docs/benchmarks.md``).
    shard_blocks: an int pads every stack to a multiple of it; a
      ``NamedSharding`` such as ``NamedSharding(mesh, P("blocks"))`` also keeps
      the updates' stacks sharded along that mesh axis (each device does the
      work of its share of blocks). Other than 1, either form turns chunking
      off.
    replicate_roots: with a ``NamedSharding``: keep the stored inverse roots
      whole on every device.
  """

  bits: int = 4
  storage: str = "eigenvectors"
  codebook: str = "linear2"
  block_size: int = 64
  max_order: int = 1200
  min_quantized_size: int = 4096
  bjorck_steps: Optional[Tuple[int, int]] = None
  inverse_root_method: Optional[str] = None
  error_feedback: bool = True
  preconditioning_precision: Optional[str] = None
  linalg_precision: Optional[str] = None
  rectification_precision: Optional[str] = None
  dimension_numbers: DimensionNumbersSpec = unpreconditioned_biases
  working_set_bytes: Optional[int] = 1024 * MIB
  shard_blocks: Union[int, jax.sharding.NamedSharding] = 1
  replicate_roots: bool = False

  def __post_init__(self):
    _checks.check_choice("bits", self.bits, (4, 8, 32))
    _checks.check_choice("storage", self.storage, STORAGES)
    if self.bits != 32:
      validate_quantization_args(codebook=self.codebook, bits=self.bits,
                                 block_size=self.block_size)
    _checks.check_int("max_order", self.max_order, 2)
    _checks.check_int("min_quantized_size", self.min_quantized_size, 0)
    steps = self.bjorck_steps
    if steps is not None:
      is_count = lambda s: isinstance(s, (int, np.integer)) and not isinstance(
          s, bool) and s >= 0
      if not (isinstance(steps, (tuple, list)) and len(steps) == 2 and
              all(map(is_count, steps))):
        raise ValueError(
            "bjorck_steps must be None or a pair of non-negative ints, got "
            f"{self.bjorck_steps!r}")
      object.__setattr__(self, "bjorck_steps", tuple(int(s) for s in steps))
    _checks.check_bool("error_feedback", self.error_feedback)
    for name, choices in (
        ("inverse_root_method", INVERSE_ROOT_METHODS),
        ("preconditioning_precision", PRECONDITIONING_PRECISIONS),
        ("linalg_precision", LINALG_PRECISIONS),
        ("rectification_precision", LINALG_PRECISIONS)):
      if getattr(self, name) is not None:
        _checks.check_choice(name, getattr(self, name), choices)
    if self.working_set_bytes is not None:
      _checks.check_int("working_set_bytes", self.working_set_bytes, 1)
    if not callable(self.dimension_numbers):
      dimension_numbers_leaves(self.dimension_numbers)
    if isinstance(self.shard_blocks, jax.sharding.NamedSharding):
      spec = self.shard_blocks.spec
      if not len(spec) or spec[0] is None:
        raise ValueError(
            "shard_blocks: the NamedSharding's spec must name a mesh axis for "
            "the stacks' "
            f"leading axis, got {spec}")
    else:
      _checks.check_int("shard_blocks", self.shard_blocks, 1)
    _checks.check_bool("replicate_roots", self.replicate_roots)
    if self.replicate_roots and self.block_sharding is None:
      raise ValueError(
          "replicate_roots needs shard_blocks to be a NamedSharding (the mesh "
          "to replicate over)"
      )

  def bjorck_steps_of(self, algorithm: str) -> Tuple[int, int]:
    """``bjorck_steps``, or the default of ``algorithm`` (``"shampoo"`` or
    ``"soap"``)."""
    return self.bjorck_steps or DEFAULT_BJORCK_STEPS[algorithm]

  @property
  def root_method(self) -> str:
    if self.inverse_root_method is not None:
      return self.inverse_root_method
    return "newton" if self.bits == 32 else "eigh"

  @property
  def linalg_precision_name(self) -> str:
    if self.linalg_precision is not None:
      return self.linalg_precision
    return "highest" if self.bits == 32 else "bf16_3x"

  @property
  def rectification_precision_name(self) -> str:
    if self.rectification_precision is not None:
      return self.rectification_precision
    if self.bits == 4 and self.linalg_precision_name != "highest":
      return "high"
    return self.linalg_precision_name

  @property
  def block_sharding(self) -> Optional[jax.sharding.NamedSharding]:
    return self.shard_blocks if isinstance(self.shard_blocks,
                                           jax.sharding.NamedSharding) else None

  @property
  def block_axes(self) -> Optional[Tuple[str, ...]]:
    if self.block_sharding is None:
      return None
    axes = self.block_sharding.spec[0]
    return axes if isinstance(axes, tuple) else (axes,)

  @property
  def stacks_spread(self) -> bool:
    """Whether the stacks may be split over devices (``shard_blocks`` other than
    1): then no loop may run over their leading axis, which would gather them
      whole onto every device."""
    return self.block_sharding is not None or self.shard_blocks > 1

  @property
  def stack_multiple(self) -> int:
    """Every stack's length is padded to a multiple of this (the devices sharing
    the stacks)."""
    if self.block_sharding is None:
      return self.shard_blocks
    mesh = self.block_sharding.mesh
    return int(np.prod([mesh.shape[a] for a in self.block_axes]))


@dataclasses.dataclass(frozen=True)
class AdamConfig:
  """How Adam's moments are stored and computed (4-bit AdamW, and the base of
  Shampoo).

  Attributes:
    bits: 4 (default), 8 (dynamic-tree codes, blocks of 256) or 32 (fp32
      moments).
    second_moment: ``"rank1"`` (default), ``"block"`` or ``"factored"`` (4-bit
      Factor).
    block_size: block of the block-wise quantizer; default 128 at 4 bits, 256 at
      8.
    min_quantized_size: tensors with at most this many elements keep fp32
      moments (default 4096).
    second_moment_codebook: override of the second moment's codebook
      (ablations).
    implementation: ``"xla"`` or ``"pallas"`` (fused GPU kernels; one GPU or
      replicated params).
    packed: both moments of the whole model in a few arrays (``"pallas"``, 4
      bits, ``"block"``, 128).
  """

  bits: int = 4
  second_moment: str = "rank1"
  block_size: Optional[int] = None
  min_quantized_size: int = 4096
  second_moment_codebook: Optional[str] = None
  implementation: str = "xla"
  packed: bool = False

  def __post_init__(self):
    _checks.check_choice("bits", self.bits, (4, 8, 32))
    _checks.check_choice("second_moment", self.second_moment, SECOND_MOMENTS)
    if self.block_size is None:
      object.__setattr__(self, "block_size", 256 if self.bits == 8 else 128)
    if self.bits != 32:
      validate_quantization_args(codebook="dynamic_tree", bits=self.bits,
                                 block_size=self.block_size)
      if self.second_moment_codebook is not None:
        validate_quantization_args(codebook=self.second_moment_codebook,
                                   bits=self.bits, block_size=self.block_size,
                                   argument_prefix="second_moment_")
    _checks.check_int("min_quantized_size", self.min_quantized_size, 0)
    _checks.check_choice("implementation", self.implementation, IMPLEMENTATIONS)
    _checks.check_bool("packed", self.packed)
    if self.packed and (self.implementation, self.bits, self.second_moment,
                        self.block_size) != ("pallas", 4, "block", 128):
      raise ValueError(
          "packed=True needs implementation='pallas', bits=4, "
          "second_moment='block' and "
          f"block_size=128, got {self.implementation!r}, {self.bits}, "
          f"{self.second_moment!r}, "
          f"{self.block_size}")

  @property
  def is_plain_adam(self) -> bool:
    """fp32 moments with the rank-1 default: exactly ``optax.scale_by_adam``."""
    return self.bits == 32 and self.second_moment == "rank1"
