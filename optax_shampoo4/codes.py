"""Codebooks and codes: the value of each 4- or 8-bit code, the mapping of
normalized values to codes (nearest entry, ties to the lower code), decoding,
and the packing of two 4-bit codes into a byte.

``docs/algorithms.md`` (Quantizer) gives the codebooks: linear-2 [S4] and the
dynamic tree of [A4], signed and unsigned, and linear without a zero code [A4].

References:
  [S4] Wang et al., *4-bit Shampoo for Memory-Efficient Network Training*,
  NeurIPS 2024. [A4] Li, Chen, Zhu, *Memory Efficient Optimizers with 4-bit
  States*, NeurIPS 2023.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

CODEBOOKS = ("linear2", "dynamic_tree", "dynamic_tree_unsigned",
             "linear_nozero")
BITS = (4, 8)


# ------------------------------------------------------------------------------
# Codebooks
# ------------------------------------------------------------------------------
def _dynamic_tree(bits: int, signed: bool) -> np.ndarray:
  """Dynamic-tree (dynamic exponent) map of Dettmers et al., as built by
  bitsandbytes."""
  exponent_levels = bits - 1
  values = [0.0, 1.0]
  for level in range(exponent_levels):
    items = 2**level + 1 if signed else 2**(level + 1) + 1
    boundaries = np.linspace(0.1, 1.0, items)
    means = (boundaries[:-1] + boundaries[1:]) / 2.0
    scale = 10.0**(level - (exponent_levels - 1))
    values.extend(scale * means)
    if signed:
      values.extend(-scale * means)
  return np.sort(np.asarray(values, np.float64))


def _linear2_values(codes, bits: int):
  """Linear-2 values of integer ``codes`` (numpy or jax): ``n·|n| / (L − 1)²``
  with ``n = 2·code − (L − 1)``, ``L = 2**bits``, and 0 at ``L/2 − 1``.

  ``n·|n|`` is an exact integer in fp32, so the one rounding is the product by
  the fp32 reciprocal: numpy and every XLA backend give the same bits (XLA turns
  a division by a constant into that product anyway). A handful of
  elementwise operations instead of a select per code.
  """
  xp = np if isinstance(codes, np.ndarray) else jnp
  top = 2**bits - 1
  n = 2 * codes.astype(xp.int32) - top
  values = (n * xp.abs(n)).astype(xp.float32) * np.float32(1.0 / top**2)
  return xp.where(codes == top // 2, np.float32(0.0), values)


@functools.lru_cache(maxsize=None)
def _codebook64(name: str, bits: int) -> np.ndarray:
  if bits not in BITS:
    raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
  levels = 2**bits
  if name == "linear2":
    # sign(x)·x² of x = linspace(-1, 1, levels) with an exact zero, as the one
    # fp32 product per code that decode() computes
    table = _linear2_values(np.arange(levels), bits).astype(np.float64)
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
  """Returns the sorted values of a codebook (index order = code value), as
  float32.

  Args:
    name: ``"linear2"`` (signed, ``sign(x)·x²`` of a linear grid with an exact
      zero; Shampoo states), ``"dynamic_tree"`` (signed dynamic exponent; Adam
      first moment), ``"dynamic_tree_unsigned"`` (ablation, and 8-bit Adam
      second moment) or ``"linear_nozero"`` (``(i + 1) / 2**bits``; 4-bit Adam
      second moment: no zero, so ``1 / (sqrt(v) + eps)`` cannot explode).
    bits: 4 or 8.
  """
  return _codebook64(name, bits).astype(np.float32)


@functools.lru_cache(maxsize=None)
def decision_boundaries(name: str, bits: int) -> np.ndarray:
  table = _codebook64(name, bits)
  return ((table[:-1] + table[1:]) / 2.0).astype(np.float32)


def _dynamic_tree_lower_code(x: jax.Array, bits: int,
                             signed: bool) -> jax.Array:
  """A dynamic-tree code ``k`` with ``k ≤ code(x) ≤ k + 1``.

  Exponent level ``e`` holds ``(2K + 18j + 9) · 10^(e + 1 − bits) / (2K)``, the
  ``K`` bucket means of one decade (:func:`_dynamic_tree`), and the decades'
  edges fall in the gaps between levels: ``log10`` gives the level, and the
  bucket ``j`` follows by arithmetic, taken as the lower entry until 0.4 of a
  bucket past their midpoint (far wider than the arithmetic's error, so the
  code is never overshot). Below the level's first entry the guess is the
  entry under it.
  """
  shift, top = 0 if signed else 1, 2**bits - 1
  y = jnp.abs(x) if signed else jnp.maximum(x, 0.0)
  level = jnp.clip(jnp.floor(jnp.log10(y)) + (bits - 1), 0,
                   bits - 2).astype(jnp.int32)
  size = jnp.left_shift(1, level + shift).astype(jnp.float32)
  n = y * (2 * size) * jnp.exp(np.log(10.0) * (bits - 1 - level))
  bucket = (n - (2 * size + 9)) / 18
  p = size - shift + jnp.where(bucket < 0, -1.0,
                               jnp.floor(jnp.minimum(bucket, size - 1) + 0.1))
  p = p.astype(jnp.int32)  # index among the entries ≥ 0
  if not signed:
    return p
  middle = top // 2
  return jnp.where(x < 0, middle - 1 - p, middle + p)


def _linear2_lower_code(x: jax.Array, bits: int) -> jax.Array:
  """A linear-2 code ``k`` with ``k ≤ code(x) ≤ k + 1``: entry ``q`` is ``n·|n|
  / (L − 1)²`` with ``n = 2q − (L − 1)``, so ``sign(x)·√|x|`` is linear in
  ``q``; a midpoint sits up to 0.35 of a code past ``q + ½`` there."""
  top = 2**bits - 1
  q = (jnp.sign(x) * jnp.sqrt(jnp.abs(x)) * top + top) / 2
  return jnp.floor(q + 0.1).astype(jnp.int32)


def _linear_nozero_lower_code(x: jax.Array, bits: int) -> jax.Array:
  """An evenly spaced codebook's entry ``q`` is ``first + q·spacing``."""
  first, spacing = _evenly_spaced("linear_nozero", bits)
  return jnp.floor((x - first) / spacing + 0.1).astype(jnp.int32)


# name -> a code k with k ≤ code(x) ≤ k + 1, by the codebook's formula
_LOWER_CODES = {
    "linear2":
        _linear2_lower_code,
    "dynamic_tree":
        functools.partial(_dynamic_tree_lower_code, signed=True),
    "dynamic_tree_unsigned":
        functools.partial(_dynamic_tree_lower_code, signed=False),
    "linear_nozero":
        _linear_nozero_lower_code,
}


def encode(normalized: jax.Array, name: str, bits: int) -> jax.Array:
  """Index of the nearest codebook entry, ties to the lower one: #{k :
  normalized > midpoint_k}. NaN gets code 0. (4-bit codes:
  :func:`encode_scaled`.)

  The codebook's formula gives a code ``k`` with ``k ≤ code ≤ k + 1``, and one
  comparison against ``midpoint_k``, looked up, settles it: one gather per
  element, where a binary search of looked-up midpoints takes eight dependent
  ones.
  """
  top = 2**bits - 1
  lower = jnp.clip(_LOWER_CODES[name](normalized, bits), 0, top - 1)
  midpoints = jnp.asarray(decision_boundaries(name, bits))
  code = lower + (normalized > midpoints[lower]).astype(jnp.int32)
  return jnp.where(jnp.isnan(normalized), 0, code).astype(jnp.uint8)


def _evenly_spaced(name: str, bits: int):
  """``(first value, spacing)`` in fp32 when the codebook is an arithmetic
  sequence whose values and midpoints that formula reproduces exactly
  (``linear_nozero``: ``(i + 1) / 16``), else ``None``."""
  table = codebook(name, bits)
  first, spacing = np.float32(table[0]), np.float32(table[1] - table[0])
  index = np.arange(len(table), dtype=np.float32)
  if (np.array_equal(first + spacing * index, table) and
      np.array_equal(first + spacing * (index[1:] - np.float32(0.5)),
                     decision_boundaries(name, bits))):
    return float(first), float(spacing)
  return None


def encode_scaled(x: jax.Array, scale: jax.Array, name: str, bits: int,
                  midpoint_lookup=None) -> jax.Array:
  """Codes of ``x / scale`` (``scale`` ≥ 0, broadcastable to ``x``); where the
  scale is 0 or NaN, the code nearest 0 (the block decodes to 0 × scale: zeros,
  or NaN that stays visible in the stored scale).

  At 4 bits the code is ``#{k : x > midpoint_k · scale}``, found by a branchless
  binary search (4 comparisons; the midpoint each needs is computed for an
  evenly spaced codebook, else picked by a few selects, or by
  ``midpoint_lookup(index)`` — a kernel's load from a table of the midpoints)
  instead of dividing: a product is correctly rounded by every backend, while
  fp32 division is not (Triton emits an approximate divide), so the XLA path and
  the fused Pallas kernels give the same code for the same value. The search is
  this elementwise step's largest cost (it runs in the memory-bound Adam step).
  """
  positive = scale > 0
  if bits > 4:
    return encode(
        jnp.where(positive, x / jnp.where(positive, scale, 1.0), 0.0), name,
        bits)
  safe_scale = jnp.where(positive, scale, 1.0)
  x = jnp.where(positive, x, 0.0)
  boundaries = decision_boundaries(name, bits)
  spaced = _evenly_spaced(name, bits)
  index = jnp.zeros(jnp.broadcast_shapes(x.shape, jnp.shape(scale)), jnp.int32)
  half = 2**(bits - 1)
  while half >= 1:
    # x above midpoint_{candidate − 1} means code ≥ candidate
    candidate = index + half
    if spaced is not None:
      # exact in fp32
      midpoint = spaced[0] + spaced[1] * (candidate.astype(jnp.float32) - 0.5)
    elif midpoint_lookup is not None and half < 2**(
        bits - 1):  # the first level's midpoint is a constant
      midpoint = midpoint_lookup(candidate - 1)
    else:  # the candidates of this level are half − 1 + 2·half·j
      midpoint = jnp.full(index.shape, boundaries[half - 1])
      for k in range(3 * half - 1, len(boundaries), 2 * half):
        midpoint = jnp.where(candidate == k + 1, boundaries[k], midpoint)
    index = jnp.where(x > midpoint * safe_scale, candidate, index)
    half //= 2
  return index.astype(jnp.uint8)


def decode(codes: jax.Array, name: str, bits: int,
           value_lookup=None) -> jax.Array:
  """Codebook values of ``codes``; ``value_lookup(codes)`` (a kernel's load from
  a table of the codebook) replaces the selects a 4-bit codebook that is not
  evenly spaced otherwise takes. Linear-2 is computed from the code (a few
  operations, no look-up), at both widths."""
  if name == "linear2":
    return _linear2_values(codes, bits)
  table = codebook(name, bits)
  if bits <= 4:
    spaced = _evenly_spaced(name, bits)
    if spaced is not None:
      return spaced[0] + spaced[1] * codes.astype(jnp.float32)
    if value_lookup is not None:
      return value_lookup(codes)
    # 16 selects fuse into the surrounding elementwise work; a gather from a
    # constant table can make XLA constant-fold (and materialize) huge index
    # arrays at compile time.
    values = jnp.zeros(codes.shape, jnp.float32)
    for code, value in enumerate(table):
      if value != 0.0:
        values = jnp.where(codes == code, value, values)
    return values
  return jnp.asarray(table)[codes.astype(jnp.int32)]


# ------------------------------------------------------------------------------
# Nibble packing
# ------------------------------------------------------------------------------
PAIRINGS = ("interleaved", "halves")
HALVES_SPAN = 128  # "halves" pairs column j with j + 64 within each 128 columns


def pack_nibbles(codes: jax.Array, pairing: str = "interleaved") -> jax.Array:
  """Packs 4-bit codes (uint8 < 16) along the last axis, two per byte.

  ``"interleaved"``: element 2j in the low nibble, 2j+1 in the high one; each
  row is padded to an even length on its own, so bytes never straddle rows.
  ``"halves"`` (rows of a multiple of 128): within each 128 elements, element j
  in the low nibble and j + 64 in the high one — the fused Adam kernels then
  read and write both halves of a tile with contiguous accesses instead of
  stride-2 ones (faster: ``benchmarks/adam_kernel.py``).
  """
  if pairing == "halves":
    chunks = codes.reshape(*codes.shape[:-1], codes.shape[-1] // HALVES_SPAN, 2,
                           HALVES_SPAN // 2)
    return (chunks[..., 0, :] | (chunks[..., 1, :] << 4)).reshape(
        *codes.shape[:-1], codes.shape[-1] // 2)
  if codes.shape[-1] % 2:
    codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)])
  return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: jax.Array, length: int,
                   pairing: str = "interleaved") -> jax.Array:
  """Inverse of :func:`pack_nibbles`: the first ``length`` codes of every
  row."""
  # A broadcast and per-position shift rather than stacking the two nibbles: XLA
  # fuses this into the consumer, while a stack becomes a concatenate kernel
  # that materializes the codes (measured on GPU).
  shifts = jnp.asarray([0, 4], jnp.uint8)
  if pairing == "halves":
    chunks = packed.reshape(*packed.shape[:-1], -1, 1, HALVES_SPAN // 2)
    codes = (chunks >> shifts[:, None]) & 0xF
    return codes.reshape(*packed.shape[:-1], 2 * packed.shape[-1])[..., :length]
  codes = (packed[..., None] >> shifts) & 0xF
  return codes.reshape(*packed.shape[:-1], 2 * packed.shape[-1])[..., :length]


def max_rounding_error(name: str, bits: int) -> float:
  """Half the widest gap of the codebook: bound on ``|x/scale −
  decode(encode(x/scale))|`` in the range."""
  return float(np.max(np.diff(_codebook64(name, bits))) / 2.0)
