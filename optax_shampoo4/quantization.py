"""Block-wise and rank-1 quantization of optimizer states to 4 or 8 bits.

A quantizer is a *normalization* followed by a *mapping* (``docs/algorithms.md``, Quantizer; after [A4] and [S4]):

* normalization divides every element by a scale: the absolute maximum of its block of ``block_size``
  consecutive elements along the last axis (``"block"``), the smaller of its row and column maxima
  (``"rank1"``, [A4]), or the block maxima of the strictly lower and strictly upper triangles taken
  separately (``"triangular"``, used to store a Cholesky factor and its error in one array, [CQ]);
* mapping replaces the normalized value by the index of the nearest entry of a sorted codebook, ties going
  to the lower index.

Codes are stored in ``uint8``; at 4 bits two codes share a byte (even element in the low nibble), and every
row is padded to an even length so that no byte holds elements of two rows.

References:
  [S4] Wang et al., *4-bit Shampoo for Memory-Efficient Network Training*, NeurIPS 2024.
  [A4] Li, Chen, Zhu, *Memory Efficient Optimizers with 4-bit States*, NeurIPS 2023.
  [CQ] Li et al., *Memory-Efficient 4-bit Preconditioned Stochastic Optimization*, arXiv 2412.10663.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

CODEBOOKS = ("linear2", "dynamic_tree", "dynamic_tree_unsigned", "linear_nozero")
NORMALIZATIONS = ("block", "rank1", "triangular")
BITS = (4, 8)
# Rank-1 normalization has no second axis for 1-D tensors; [A4] falls back to blocks of this size.
RANK1_FALLBACK_BLOCK_SIZE = 128


# ----------------------------------------------------------------------------------------------------------
# Codebooks
# ----------------------------------------------------------------------------------------------------------
def _dynamic_tree(bits: int, signed: bool) -> np.ndarray:
  """Dynamic-tree (dynamic exponent) map of Dettmers et al., as built by bitsandbytes."""
  exponent_levels = bits - 1
  values = [0.0, 1.0]
  for level in range(exponent_levels):
    items = 2**level + 1 if signed else 2 ** (level + 1) + 1
    boundaries = np.linspace(0.1, 1.0, items)
    means = (boundaries[:-1] + boundaries[1:]) / 2.0
    scale = 10.0 ** (level - (exponent_levels - 1))
    values.extend(scale * means)
    if signed:
      values.extend(-scale * means)
  return np.sort(np.asarray(values, np.float64))


@functools.lru_cache(maxsize=None)
def _codebook64(name: str, bits: int) -> np.ndarray:
  if bits not in BITS:
    raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
  levels = 2**bits
  if name == "linear2":
    x = np.linspace(-1.0, 1.0, levels)
    x[levels // 2 - 1] = 0.0  # give the signed map an exact zero
    table = np.sign(x) * x**2
  elif name == "dynamic_tree":
    table = _dynamic_tree(bits, signed=True)
  elif name == "dynamic_tree_unsigned":
    table = _dynamic_tree(bits, signed=False)
  elif name == "linear_nozero":
    table = (np.arange(levels, dtype=np.float64) + 1.0) / levels
  else:
    raise ValueError(f"codebook must be one of {CODEBOOKS}, got {name!r}")
  assert table.shape == (levels,) and np.all(np.diff(table) > 0), (name, bits)
  table.setflags(write=False)
  return table


def codebook(name: str, bits: int = 4) -> np.ndarray:
  """Returns the sorted values of a codebook (index order = code value), as float32.

  Args:
    name: ``"linear2"`` (signed, ``sign(x)·x²`` of a linear grid with an exact zero; Shampoo states),
      ``"dynamic_tree"`` (signed dynamic exponent; Adam first moment), ``"dynamic_tree_unsigned"``
      (ablation, and 8-bit Adam second moment) or ``"linear_nozero"`` (``(i + 1) / 2**bits``; 4-bit Adam
      second moment: no zero, so ``1 / (sqrt(v) + eps)`` cannot explode).
    bits: 4 or 8.
  """
  return _codebook64(name, bits).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _decision_boundaries(name: str, bits: int) -> np.ndarray:
  table = _codebook64(name, bits)
  return ((table[:-1] + table[1:]) / 2.0).astype(np.float32)


def _encode(normalized: jax.Array, name: str, bits: int) -> jax.Array:
  """Index of the nearest codebook entry, ties to the lower one: #{k : normalized > midpoint_k}, by a
  branchless binary search (8 comparisons against looked-up midpoints instead of 255). NaN compares false
  everywhere and gets code 0. (4-bit codes: :func:`_encode_scaled`.)"""
  boundaries = _decision_boundaries(name, bits)
  table = jnp.asarray(boundaries)
  # The first comparison is against the middle midpoint itself: a look-up at a constant index (all zeros)
  # is a gather XLA constant-folds into an array the size of the tensor (seconds of compile per leaf).
  step = 2 ** (bits - 1)
  index = jnp.where(normalized > boundaries[step - 1], step, 0).astype(jnp.int32)
  step //= 2
  while step >= 1:
    index = index + jnp.where(normalized > table[index + (step - 1)], step, 0)
    step //= 2
  return index.astype(jnp.uint8)


def _evenly_spaced(name: str, bits: int):
  """``(first value, spacing)`` in fp32 when the codebook is an arithmetic sequence whose values and
  midpoints that formula reproduces exactly (``linear_nozero``: ``(i + 1) / 16``), else ``None``."""
  table = codebook(name, bits)
  first, spacing = np.float32(table[0]), np.float32(table[1] - table[0])
  index = np.arange(len(table), dtype=np.float32)
  if (np.array_equal(first + spacing * index, table) and
      np.array_equal(first + spacing * (index[1:] - np.float32(0.5)), _decision_boundaries(name, bits))):
    return float(first), float(spacing)
  return None


def _encode_scaled(x: jax.Array, scale: jax.Array, name: str, bits: int, midpoint_lookup=None) -> jax.Array:
  """Codes of ``x / scale`` (``scale`` ≥ 0, broadcastable to ``x``); where the scale is 0 or NaN, the code
  nearest 0 (the block decodes to 0 × scale: zeros, or NaN that stays visible in the stored scale).

  At 4 bits the code is ``#{k : x > midpoint_k · scale}``, found by a branchless binary search (4
  comparisons; the midpoint each needs is computed for an evenly spaced codebook, else picked by a few
  selects, or by ``midpoint_lookup(index)`` — a kernel's load from a table of the midpoints) instead of
  dividing: a product is correctly rounded by every backend, while fp32 division is not (Triton emits an
  approximate divide), so the XLA path and the fused Pallas kernels give the same code for the same value.
  The search is this elementwise step's largest cost (it runs in the memory-bound Adam step).
  """
  positive = scale > 0
  if bits > 4:
    return _encode(jnp.where(positive, x / jnp.where(positive, scale, 1.0), 0.0), name, bits)
  safe_scale = jnp.where(positive, scale, 1.0)
  x = jnp.where(positive, x, 0.0)
  boundaries = _decision_boundaries(name, bits)
  spaced = _evenly_spaced(name, bits)
  index = jnp.zeros(jnp.broadcast_shapes(x.shape, jnp.shape(scale)), jnp.int32)
  half = 2 ** (bits - 1)
  while half >= 1:
    candidate = index + half  # x above midpoint_{candidate − 1} means code ≥ candidate
    if spaced is not None:
      midpoint = spaced[0] + spaced[1] * (candidate.astype(jnp.float32) - 0.5)  # exact in fp32
    elif midpoint_lookup is not None and half < 2 ** (bits - 1):  # the first level's midpoint is a constant
      midpoint = midpoint_lookup(candidate - 1)
    else:  # the candidates of this level are half − 1 + 2·half·j
      midpoint = jnp.full(index.shape, boundaries[half - 1])
      for k in range(3 * half - 1, len(boundaries), 2 * half):
        midpoint = jnp.where(candidate == k + 1, boundaries[k], midpoint)
    index = jnp.where(x > midpoint * safe_scale, candidate, index)
    half //= 2
  return index.astype(jnp.uint8)


def _decode(codes: jax.Array, name: str, bits: int, value_lookup=None) -> jax.Array:
  """Codebook values of ``codes``; ``value_lookup(codes)`` (a kernel's load from a table of the codebook)
  replaces the selects a 4-bit codebook that is not evenly spaced otherwise takes."""
  table = codebook(name, bits)
  if bits <= 4:
    spaced = _evenly_spaced(name, bits)
    if spaced is not None:
      return spaced[0] + spaced[1] * codes.astype(jnp.float32)
    if value_lookup is not None:
      return value_lookup(codes)
    # 16 selects fuse into the surrounding elementwise work; a gather from a constant table can make XLA
    # constant-fold (and materialize) huge index arrays at compile time.
    values = jnp.zeros(codes.shape, jnp.float32)
    for code, value in enumerate(table):
      if value != 0.0:
        values = jnp.where(codes == code, value, values)
    return values
  return jnp.asarray(table)[codes.astype(jnp.int32)]


# ----------------------------------------------------------------------------------------------------------
# Nibble packing
# ----------------------------------------------------------------------------------------------------------
PAIRINGS = ("interleaved", "halves")
HALVES_SPAN = 128  # "halves" pairs column j with j + 64 within each 128 columns


def pack_nibbles(codes: jax.Array, pairing: str = "interleaved") -> jax.Array:
  """Packs 4-bit codes (uint8 < 16) along the last axis, two per byte.

  ``"interleaved"``: element 2j in the low nibble, 2j+1 in the high one; each row is padded to an even
  length on its own, so bytes never straddle rows. ``"halves"`` (rows of a multiple of 128): within each 128
  elements, element j in the low nibble and j + 64 in the high one — the fused Adam kernels then read and
  write both halves of a tile with contiguous accesses instead of stride-2 ones (faster: ``benchmarks/adam_kernel.py``).
  """
  if pairing == "halves":
    chunks = codes.reshape(*codes.shape[:-1], codes.shape[-1] // HALVES_SPAN, 2, HALVES_SPAN // 2)
    return (chunks[..., 0, :] | (chunks[..., 1, :] << 4)).reshape(*codes.shape[:-1], codes.shape[-1] // 2)
  if codes.shape[-1] % 2:
    codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)])
  return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: jax.Array, length: int, pairing: str = "interleaved") -> jax.Array:
  """Inverse of :func:`pack_nibbles`: the first ``length`` codes of every row."""
  # A broadcast and per-position shift rather than stacking the two nibbles: XLA fuses this into the
  # consumer, while a stack becomes a concatenate kernel that materializes the codes (measured on GPU).
  shifts = jnp.asarray([0, 4], jnp.uint8)
  if pairing == "halves":
    chunks = packed.reshape(*packed.shape[:-1], -1, 1, HALVES_SPAN // 2)
    codes = (chunks >> shifts[:, None]) & 0xF
    return codes.reshape(*packed.shape[:-1], 2 * packed.shape[-1])[..., :length]
  codes = (packed[..., None] >> shifts) & 0xF
  return codes.reshape(*packed.shape[:-1], 2 * packed.shape[-1])[..., :length]


# ----------------------------------------------------------------------------------------------------------
# The stored array
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QuantizationSpec:
  """What a :class:`QuantizedArray` holds, beyond its arrays (static, hashable pytree aux data)."""

  shape: Tuple[int, ...]
  codebook: str
  bits: int
  block_size: int
  normalization: str
  keep_diagonal: bool
  pairing: str = "interleaved"  # which two codes share a byte (see pack_nibbles)


class QuantizedArray:
  """A quantized tensor: codes, fp32 scales and (optionally) an fp32 diagonal.

  A pytree: ``codes``, ``scales`` (a tuple) and ``diagonal`` (or ``None``) are children; the
  :class:`QuantizationSpec` is auxiliary data. It therefore passes through ``jit``, ``vmap``, ``scan``,
  ``cond`` and ``jax.tree.map`` like any container of arrays, and checkpoints like one.

  For ``"block"`` and ``"triangular"`` normalizations the leading axes are read off ``codes``, so a
  QuantizedArray produced under ``vmap`` (or stacked with ``jax.tree.map``) decodes to the batched array.
  """

  def __init__(self, codes, scales, diagonal, spec: QuantizationSpec):
    self.codes = codes
    self.scales = tuple(scales)
    self.diagonal = diagonal
    self.spec = spec

  @property
  def shape(self) -> Tuple[int, ...]:
    codes_shape = getattr(self.codes, "shape", None)
    if self.spec.normalization == "rank1" or codes_shape is None:
      return self.spec.shape
    return tuple(codes_shape[:-1]) + (self.spec.shape[-1],)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes actually stored: codes + scales + diagonal."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(self))

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return dequantize(self, dtype)

  def map_stack(self, fn, length: int) -> "QuantizedArray":
    """``fn`` applied to every array of a stack (leading axis first), now ``length`` long."""
    spec = dataclasses.replace(self.spec, shape=(length,) + tuple(self.spec.shape[1:]))
    return QuantizedArray(fn(self.codes), tuple(fn(a) for a in self.scales),
                          None if self.diagonal is None else fn(self.diagonal), spec)

  def __repr__(self):
    s = self.spec
    return (f"QuantizedArray(shape={self.shape}, {s.bits}-bit {s.codebook}, {s.normalization}"
            f"{'/' + str(s.block_size) if s.normalization != 'rank1' else ''}"
            f"{', diagonal kept' if s.keep_diagonal else ''})")


# Registered as a dataclass-style node so that JAX flattens it in C++: a training step passes a few hundred
# QuantizedArrays in and out, and Python flatten/unflatten callbacks cost host time on every dispatch.
jax.tree_util.register_dataclass(QuantizedArray, data_fields=("codes", "scales", "diagonal"),
                                 meta_fields=("spec",))


# ----------------------------------------------------------------------------------------------------------
# Scales
# ----------------------------------------------------------------------------------------------------------
def _block_absmax(x: jax.Array, block_size: int) -> jax.Array:
  """Absolute maximum of each block of ``block_size`` along the last axis (last block may be short)."""
  n = x.shape[-1]
  blocks = -(-n // block_size)
  padded = jnp.pad(jnp.abs(x), [(0, 0)] * (x.ndim - 1) + [(0, blocks * block_size - n)])
  return padded.reshape(*x.shape[:-1], blocks, block_size).max(axis=-1)


def _expand_blocks(scales: jax.Array, block_size: int, n: int) -> jax.Array:
  # broadcast + reshape rather than jnp.repeat, whose constant index arrays XLA would constant-fold
  blocks = scales.shape[-1]
  expanded = jnp.broadcast_to(scales[..., None], scales.shape + (block_size,))
  return expanded.reshape(*scales.shape[:-1], blocks * block_size)[..., :n]


def _rank1_scales(x: jax.Array) -> Tuple[jax.Array, ...]:
  absx = jnp.abs(x)
  axes = range(x.ndim)
  return tuple(absx.max(axis=tuple(a for a in axes if a != d)) for d in axes)


def _expand_rank1(scales: Tuple[jax.Array, ...]) -> jax.Array:
  ndim = len(scales)
  expanded = None
  for d, vector in enumerate(scales):
    shaped = vector.reshape([-1 if a == d else 1 for a in range(ndim)])
    expanded = shaped if expanded is None else jnp.minimum(expanded, shaped)
  return expanded


def _triangle_masks(n: int):
  row = jnp.arange(n)[:, None]
  col = jnp.arange(n)[None, :]
  return row > col, row < col


# ----------------------------------------------------------------------------------------------------------
# Quantize / dequantize
# ----------------------------------------------------------------------------------------------------------
def validate_quantization_args(*, codebook: str, bits: int, block_size: int, normalization: str = "block",
                               argument_prefix: str = "") -> None:
  """Raises ``ValueError``/``TypeError`` naming the argument if a quantizer setting is invalid."""
  p = argument_prefix
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in BITS:
    raise ValueError(f"{p}bits must be one of {BITS} for a quantized state, got {bits!r}")
  if codebook not in CODEBOOKS:
    raise ValueError(f"{p}codebook must be one of {CODEBOOKS}, got {codebook!r}")
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"{p}normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
    raise TypeError(f"{p}block_size must be an int, got {type(block_size).__name__}")
  if block_size <= 0:
    raise ValueError(f"{p}block_size must be positive, got {block_size}")
  if bits == 4 and block_size % 2:
    raise ValueError(f"{p}block_size must be even for 4-bit codes (two codes per byte), got {block_size}")


def quantize(x: jax.Array, *, codebook: str = "linear2", bits: int = 4, block_size: int = 64,
             keep_diagonal: bool = False, normalization: str = "block",
             pairing: str = "interleaved") -> QuantizedArray:
  """Quantizes ``x`` (rank ≥ 1, any float dtype) to ``bits``-bit codes.

  Args:
    x: the array. Computation is in float32.
    codebook: one of :data:`CODEBOOKS` (see :func:`codebook`).
    bits: 4 (two codes per byte) or 8.
    block_size: elements per absmax block along the last axis (each row separately; the last block of a
      row may be shorter). Default 64, the Shampoo setting of [S4]; [A4] uses 128 for Adam moments.
    keep_diagonal: for square matrices (the last two axes equal): keep the diagonal exactly in float32 and
      zero it before the block scales are taken ("diag-real" of [S4]).
    normalization: ``"block"``; ``"rank1"`` (per-axis max vectors, elementwise min; 1-D input falls back
      to blocks of 128); or ``"triangular"`` (square matrices: separate block scales for the strictly
      lower and strictly upper triangles, diagonal kept exactly).
    pairing: how 4-bit codes share bytes (:func:`pack_nibbles`): ``"interleaved"`` (default) or
      ``"halves"`` (the last axis a multiple of 128; the format of the fused Adam kernels).

  Returns:
    A :class:`QuantizedArray`. Non-finite inputs: a NaN or ±inf element makes its own block's scale
    non-finite, so that block (only) decodes to non-finite values; other blocks are unaffected.
  """
  validate_quantization_args(codebook=codebook, bits=bits, block_size=block_size, normalization=normalization)
  x = jnp.asarray(x)
  if x.ndim < 1:
    raise ValueError(f"quantize needs an array of rank >= 1, got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"quantize needs a floating-point array, got dtype {x.dtype}")
  if pairing not in PAIRINGS:
    raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
  if pairing == "halves" and (bits != 4 or x.shape[-1] % HALVES_SPAN):
    raise ValueError(f"pairing='halves' needs 4-bit codes and a last axis that is a multiple of {HALVES_SPAN}, "
                     f"got bits={bits}, shape {x.shape}")
  if normalization == "rank1" and x.ndim == 1:
    normalization, block_size = "block", RANK1_FALLBACK_BLOCK_SIZE
  square = x.ndim >= 2 and x.shape[-1] == x.shape[-2]
  if normalization == "triangular":
    if not square:
      raise ValueError(f"normalization='triangular' needs square matrices, got shape {x.shape}")
    keep_diagonal = True
  if keep_diagonal and not square:
    raise ValueError(f"keep_diagonal=True needs square matrices in the last two axes, got shape {x.shape}")

  x = x.astype(jnp.float32)
  n = x.shape[-1]
  diagonal = None
  if keep_diagonal:
    diagonal = jnp.diagonal(x, axis1=-2, axis2=-1)
    x = jnp.where(jnp.eye(n, dtype=bool), 0.0, x)

  if normalization == "block":
    scales = (_block_absmax(x, block_size),)
    elementwise_scale = _expand_blocks(scales[0], block_size, n)
  elif normalization == "rank1":
    scales = _rank1_scales(x)
    elementwise_scale = _expand_rank1(scales)
  else:
    lower, upper = _triangle_masks(n)
    scales = (_block_absmax(jnp.where(lower, x, 0.0), block_size),
              _block_absmax(jnp.where(upper, x, 0.0), block_size))
    elementwise_scale = jnp.where(lower, _expand_blocks(scales[0], block_size, n),
                                  _expand_blocks(scales[1], block_size, n))

  codes = _encode_scaled(x, elementwise_scale, codebook, bits)
  if bits == 4:
    codes = pack_nibbles(codes, pairing)
  spec = QuantizationSpec(tuple(x.shape), codebook, bits, block_size, normalization, keep_diagonal, pairing)
  return QuantizedArray(codes, scales, diagonal, spec)


def dequantize(q: QuantizedArray, dtype=jnp.float32) -> jax.Array:
  """Decodes a :class:`QuantizedArray` to a dense array of ``dtype`` (computed in float32)."""
  if not isinstance(q, QuantizedArray):
    raise TypeError(f"dequantize expects a QuantizedArray, got {type(q).__name__}")
  spec = q.spec
  n = spec.shape[-1]
  codes = unpack_nibbles(q.codes, n, spec.pairing) if spec.bits == 4 else q.codes
  values = _decode(codes, spec.codebook, spec.bits)
  if spec.normalization == "block":
    out = values * _expand_blocks(q.scales[0], spec.block_size, n)
  elif spec.normalization == "rank1":
    out = values * _expand_rank1(q.scales)
  else:
    lower, _ = _triangle_masks(n)
    out = values * jnp.where(lower, _expand_blocks(q.scales[0], spec.block_size, n),
                             _expand_blocks(q.scales[1], spec.block_size, n))
  if spec.keep_diagonal:
    out = jnp.where(jnp.eye(n, dtype=bool), q.diagonal[..., None, :], out)
  return out.astype(dtype)


def fake_quantize(x: jax.Array, **kwargs) -> jax.Array:
  """``dequantize(quantize(x, **kwargs))`` in the dtype of ``x``: the value the stored state will have."""
  return dequantize(quantize(x, **kwargs), jnp.asarray(x).dtype)


def max_rounding_error(name: str, bits: int) -> float:
  """Half the widest gap of the codebook: bound on ``|x/scale − decode(encode(x/scale))|`` in the range."""
  return float(np.max(np.diff(_codebook64(name, bits))) / 2.0)

