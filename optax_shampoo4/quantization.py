"""Block-wise and rank-1 quantization of optimizer states to 4 or 8 bits.

A quantizer is a *normalization* followed by a *mapping*
(``docs/algorithms.md``, Quantizer; after [A4] and [S4]):

* normalization divides every element by a scale: the absolute maximum of its
  block of ``block_size`` consecutive elements along the last axis
  (``"block"``), the smaller of its row and column maxima (``"rank1"``, [A4]),
  or the block maxima of the strictly lower and strictly upper triangles taken
  separately (``"triangular"``, used to store a Cholesky factor and its error in
  one array, [CQ]);
* mapping replaces the normalized value by the index of the nearest entry of a
  sorted codebook, ties going to the lower index.

Codes are stored in ``uint8``; at 4 bits two codes share a byte (even element in
the low nibble), and every row is padded to an even length so that no byte holds
elements of two rows.

References:
  [S4] Wang et al., *4-bit Shampoo for Memory-Efficient Network Training*,
  NeurIPS 2024. [A4] Li, Chen, Zhu, *Memory Efficient Optimizers with 4-bit
  States*, NeurIPS 2023. [CQ] Li et al., *Memory-Efficient 4-bit Preconditioned
  Stochastic Optimization*, arXiv 2412.10663.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_shampoo4.codes import (BITS, CODEBOOKS, HALVES_SPAN, PAIRINGS,
                                  decode, encode_scaled, pack_nibbles,
                                  unpack_nibbles)

NORMALIZATIONS = ("block", "rank1", "triangular")
# Rank-1 normalization has no second axis for 1-D tensors; [A4] falls back to
# blocks of this size.
RANK1_FALLBACK_BLOCK_SIZE = 128


# ------------------------------------------------------------------------------
# The stored array
# ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QuantizationSpec:
  """What a :class:`QuantizedArray` holds, beyond its arrays (static, hashable
  pytree aux data)."""

  shape: Tuple[int, ...]
  codebook: str
  bits: int
  block_size: int
  normalization: str
  keep_diagonal: bool
  # which two codes share a byte (see pack_nibbles)
  pairing: str = "interleaved"


class QuantizedArray:
  """A quantized tensor: codes, fp32 scales and (optionally) an fp32 diagonal.

  A pytree: ``codes``, ``scales`` (a tuple) and ``diagonal`` (or ``None``) are
  children; the :class:`QuantizationSpec` is auxiliary data. It therefore passes
  through ``jit``, ``vmap``, ``scan``, ``cond`` and ``jax.tree.map`` like any
  container of arrays, and checkpoints like one.

  For ``"block"`` and ``"triangular"`` normalizations the leading axes are read
  off ``codes``, so a QuantizedArray produced under ``vmap`` (or stacked with
  ``jax.tree.map``) decodes to the batched array.
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
    return sum(
        int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
        for a in jax.tree.leaves(self))

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return dequantize(self, dtype)

  def map_stack(self, fn, length: int) -> "QuantizedArray":
    """``fn`` applied to every array of a stack (leading axis first), now
    ``length`` long."""
    spec = dataclasses.replace(self.spec,
                               shape=(length,) + tuple(self.spec.shape[1:]))
    return QuantizedArray(
        fn(self.codes), tuple(fn(a) for a in self.scales),
        None if self.diagonal is None else fn(self.diagonal), spec)

  def __repr__(self):
    s = self.spec
    return (f"QuantizedArray(shape={self.shape}, {s.bits}-bit {s.codebook}, "
            f"{s.normalization}"
            f"{'/' + str(s.block_size) if s.normalization != 'rank1' else ''}"
            f"{', diagonal kept' if s.keep_diagonal else ''})")


# Registered as a dataclass-style node so that JAX flattens it in C++: a
# training step passes a few hundred QuantizedArrays in and out, and Python
# flatten/unflatten callbacks cost host time on every dispatch.
jax.tree_util.register_dataclass(QuantizedArray,
                                 data_fields=("codes", "scales", "diagonal"),
                                 meta_fields=("spec",))


# ------------------------------------------------------------------------------
# Scales
# ------------------------------------------------------------------------------
def _block_absmax(x: jax.Array, block_size: int) -> jax.Array:
  """Absolute maximum of each block of ``block_size`` along the last axis (last
  block may be short)."""
  n = x.shape[-1]
  blocks = -(-n // block_size)
  padded = jnp.pad(
      jnp.abs(x), [(0, 0)] * (x.ndim - 1) + [(0, blocks * block_size - n)])
  return padded.reshape(*x.shape[:-1], blocks, block_size).max(axis=-1)


def _expand_blocks(scales: jax.Array, block_size: int, n: int) -> jax.Array:
  # broadcast + reshape rather than jnp.repeat, whose constant index arrays XLA
  # would constant-fold
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


# ------------------------------------------------------------------------------
# Quantize / dequantize
# ------------------------------------------------------------------------------
def validate_quantization_args(*, codebook: str, bits: int, block_size: int,
                               normalization: str = "block",
                               argument_prefix: str = "") -> None:
  """Raises ``ValueError``/``TypeError`` naming the argument if a quantizer
  setting is invalid."""
  p = argument_prefix
  if isinstance(bits,
                bool) or not isinstance(bits,
                                        (int, np.integer)) or bits not in BITS:
    raise ValueError(
        f"{p}bits must be one of {BITS} for a quantized state, got {bits!r}")
  if codebook not in CODEBOOKS:
    raise ValueError(
        f"{p}codebook must be one of {CODEBOOKS}, got {codebook!r}")
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"{p}normalization must be one of {NORMALIZATIONS}, got "
                     f"{normalization!r}")
  if isinstance(block_size, bool) or not isinstance(block_size,
                                                    (int, np.integer)):
    raise TypeError(
        f"{p}block_size must be an int, got {type(block_size).__name__}")
  if block_size <= 0:
    raise ValueError(f"{p}block_size must be positive, got {block_size}")
  if bits == 4 and block_size % 2:
    raise ValueError(
        f"{p}block_size must be even for 4-bit codes (two codes per byte), got "
        f"{block_size}")


def quantize(x: jax.Array, *, codebook: str = "linear2", bits: int = 4,
             block_size: int = 64, keep_diagonal: bool = False,
             normalization: str = "block",
             pairing: str = "interleaved") -> QuantizedArray:
  """Quantizes ``x`` (rank ≥ 1, any float dtype) to ``bits``-bit codes.

  Args:
    x: the array. Computation is in float32.
    codebook: one of :data:`CODEBOOKS` (see :func:`codebook`).
    bits: 4 (two codes per byte) or 8.
    block_size: elements per absmax block along the last axis (each row
      separately; the last block of a row may be shorter). Default 64, the
      Shampoo setting of [S4]; [A4] uses 128 for Adam moments.
    keep_diagonal: for square matrices (the last two axes equal): keep the
      diagonal exactly in float32 and zero it before the block scales are taken
      ("diag-real" of [S4]).
    normalization: ``"block"``; ``"rank1"`` (per-axis max vectors, elementwise
      min; 1-D input falls back to blocks of 128); or ``"triangular"`` (square
      matrices: separate block scales for the strictly lower and strictly upper
        triangles, diagonal kept exactly).
    pairing: how 4-bit codes share bytes (:func:`pack_nibbles`):
      ``"interleaved"`` (default) or ``"halves"`` (the last axis a multiple of
      128; the format of the fused Adam kernels).

  Returns:
    A :class:`QuantizedArray`. Non-finite inputs: a NaN or ±inf element makes
    its own block's scale non-finite, so that block (only) decodes to non-finite
    values; other blocks are unaffected.
  """
  validate_quantization_args(codebook=codebook, bits=bits,
                             block_size=block_size, normalization=normalization)
  x = jnp.asarray(x)
  normalization, block_size, keep_diagonal = _settle_layout(
      x, bits, block_size, keep_diagonal, normalization, pairing)
  x = x.astype(jnp.float32)
  n = x.shape[-1]
  diagonal = None
  if keep_diagonal:
    diagonal = jnp.diagonal(x, axis1=-2, axis2=-1)
    x = jnp.where(jnp.eye(n, dtype=bool), 0.0, x)
  take_scales, expand = _SCALINGS[normalization]
  scales = take_scales(x, block_size)
  codes = encode_scaled(x, expand(scales, block_size, n), codebook, bits)
  if bits == 4:
    codes = pack_nibbles(codes, pairing)
  spec = QuantizationSpec(
      tuple(x.shape), codebook, bits, block_size, normalization, keep_diagonal,
      pairing)
  return QuantizedArray(codes, scales, diagonal, spec)


def _settle_layout(x: jax.Array, bits: int, block_size: int,
                   keep_diagonal: bool, normalization: str, pairing: str):
  """``(normalization, block_size, keep_diagonal)`` as :func:`quantize` applies
  them to ``x``; raises naming the argument that ``x`` does not fit."""
  if x.ndim < 1:
    raise ValueError(
        f"quantize needs an array of rank >= 1, got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"quantize needs a floating-point array, got dtype {x.dtype}")
  if pairing not in PAIRINGS:
    raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
  if pairing == "halves" and (bits != 4 or x.shape[-1] % HALVES_SPAN):
    raise ValueError(
        f"pairing='halves' needs 4-bit codes and a last axis that is a "
        f"multiple of {HALVES_SPAN}, "
        f"got bits={bits}, shape {x.shape}")
  if normalization == "rank1" and x.ndim == 1:
    normalization, block_size = "block", RANK1_FALLBACK_BLOCK_SIZE
  square = x.ndim >= 2 and x.shape[-1] == x.shape[-2]
  if normalization == "triangular":
    if not square:
      raise ValueError(
          f"normalization='triangular' needs square matrices, got shape "
          f"{x.shape}")
    keep_diagonal = True
  if keep_diagonal and not square:
    raise ValueError(
        f"keep_diagonal=True needs square matrices in the last two axes, got "
        f"shape {x.shape}")
  return normalization, block_size, keep_diagonal


def _triangle_scales(x: jax.Array, block_size: int):
  lower, upper = _triangle_masks(x.shape[-1])
  return (_block_absmax(jnp.where(lower, x, 0.0), block_size),
          _block_absmax(jnp.where(upper, x, 0.0), block_size))


def _expand_triangle_scales(scales, block_size: int, n: int) -> jax.Array:
  lower, _ = _triangle_masks(n)
  return jnp.where(lower, _expand_blocks(scales[0], block_size, n),
                   _expand_blocks(scales[1], block_size, n))


# normalization -> (the scales of x, given the block size; each element's scale,
# given the scales, the block size and the last axis's length)
_SCALINGS = {
    "block": (lambda x, block: (_block_absmax(x, block),),
              lambda scales, block, n: _expand_blocks(scales[0], block, n)),
    "rank1": (lambda x, _: _rank1_scales(x),
              lambda scales, _, __: _expand_rank1(scales)),
    "triangular": (_triangle_scales, _expand_triangle_scales),
}


def dequantize(q: QuantizedArray, dtype=jnp.float32) -> jax.Array:
  """Decodes a :class:`QuantizedArray` to a dense array of ``dtype`` (computed
  in float32)."""
  if not isinstance(q, QuantizedArray):
    raise TypeError(
        f"dequantize expects a QuantizedArray, got {type(q).__name__}")
  spec = q.spec
  n = spec.shape[-1]
  codes = unpack_nibbles(q.codes, n,
                         spec.pairing) if spec.bits == 4 else q.codes
  expand = _SCALINGS[spec.normalization][1]
  out = decode(codes, spec.codebook, spec.bits) * expand(
      q.scales, spec.block_size, n)
  if spec.keep_diagonal:
    out = jnp.where(jnp.eye(n, dtype=bool), q.diagonal[..., None, :], out)
  return out.astype(dtype)


def fake_quantize(x: jax.Array, **kwargs) -> jax.Array:
  """``dequantize(quantize(x, **kwargs))`` in the dtype of ``x``: the value the
  stored state will have."""
  return dequantize(quantize(x, **kwargs), jnp.asarray(x).dtype)
