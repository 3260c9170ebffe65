"""How 4-bit Adam's moments are stored: quantized per tensor, factored
(4-bit Factor), or packed for the whole model into a few arrays.

:class:`MomentLayout` turns an ``AdamConfig`` into the store and load functions
of the first and second moments (``docs/algorithms.md``, 4-bit AdamW);
:class:`PackedMoment` holds every covered tensor's codes in shared arrays, so
that a step hands the host a handful of buffers instead of several per tensor.

Reference: Li, Chen, Zhu. *Memory Efficient Optimizers with 4-bit States.*
  NeurIPS 2023.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_shampoo4 import adam_kernel
from optax_shampoo4.config import AdamConfig
from optax_shampoo4.quantization import (HALVES_SPAN, QuantizationSpec,
                                         QuantizedArray, dequantize, quantize)


class FactoredMoment(NamedTuple):
  """Adafactor factors of a second moment over the last two axes (fp32)."""

  row: jax.Array  # EMA of mean(g², axis=-1), shape[:-1]
  col: jax.Array  # EMA of mean(g², axis=-2), shape[:-2] + shape[-1:]


class PackedSlot(NamedTuple):
  """Where one tensor's moment lives in a :class:`PackedMoment`."""

  # "codes" (rows of codes and scales), "dense" (entries of dense) or "other"
  # (an entry of others)
  kind: str
  # its first row of codes and scales (a multiple of 8), first entry of dense,
  # or index in others
  start: int
  shape: Tuple[int, ...]  # the tensor's shape
  spec: Optional[
      # "codes": the spec of the tensor's QuantizedArray
      QuantizationSpec] = None


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("codes", "scales", "dense", "others"),
                   meta_fields=("slots", "treedef"))
@dataclasses.dataclass(frozen=True)
class PackedMoment:
  """One moment of every tensor of a model in a few arrays
  (``scale_by_adam_4bit(packed=True)``).

  A jitted step costs the host time per array passed in and out, and a
  per-tensor state has four arrays per quantized tensor; packed, the state of
  any model is a handful of arrays. Each tensor's bytes are those of its
  :class:`~optax_shampoo4.QuantizedArray` in the per-tensor layout
  (:meth:`unpack` slices them out):

  * ``codes`` (uint8, ``(rows, 64)``) and ``scales`` (fp32, ``(rows, 1)``): the
    4-bit codes and block scales of the tensors the fused kernels cover, 128
    elements per row, each tensor's rows starting at a multiple of 8 (a kernel
    row tile) and padded to one;
  * ``dense``: the fp32 moments of the tensors below the quantization threshold,
    flattened and concatenated;
  * ``others``: the stored moments of any other tensor (a tuple, per-tensor
    layout).
  """

  codes: jax.Array
  scales: jax.Array
  dense: jax.Array
  others: Tuple[Any, ...]
  slots: Tuple[PackedSlot, ...]
  treedef: Any  # of the params

  def leaves(self) -> list:
    """The stored moment of every tensor, in the per-tensor layout, in the
    params' leaf order."""
    out = []
    for slot in self.slots:
      size = int(np.prod(slot.shape, dtype=np.int64))
      if slot.kind == "codes":
        rows = slice(slot.start, slot.start + size // adam_kernel.COLUMNS)
        out.append(
            QuantizedArray(self.codes[rows].reshape(-1),
                           (self.scales[rows].reshape(-1),), None, slot.spec))
      elif slot.kind == "dense":
        out.append(self.dense[slot.start:slot.start + size].reshape(slot.shape))
      else:
        out.append(self.others[slot.start])
    return out

  def unpack(self) -> Any:
    """This moment as a pytree like the params (the per-tensor layout of
    ``packed=False``)."""
    return self.treedef.unflatten(self.leaves())


def unpack_moments(state: Any) -> Any:
  """``state`` (any optimizer state) with every :class:`PackedMoment` replaced
  by its per-tensor pytree: the state ``packed=False`` would hold, e.g. to
  compare the two layouts or inspect one tensor's moments."""
  is_packed = lambda x: isinstance(x, PackedMoment)
  return jax.tree.map(lambda x: x.unpack()
                      if is_packed(x) else x, state, is_leaf=is_packed)


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pack_moment(stored, covered, shapes, treedef,
                tile_rows: int) -> PackedMoment:
  """The :class:`PackedMoment` holding ``stored`` (per-tensor stored moments in
  leaf order; ``covered``: whether the fused kernels take each tensor)."""
  slots, codes, scales, dense, others = [], [], [], [], []
  rows = dense_size = 0
  for x, kernel, shape in zip(stored, covered, shapes):
    if kernel:
      n = x.codes.size // adam_kernel.HALF
      padded = round_up(n, tile_rows)
      codes.append(
          jnp.pad(
              x.codes.reshape(n, adam_kernel.HALF), [(0, padded - n), (0, 0)]))
      scales.append(
          jnp.pad(x.scales[0].reshape(n, 1), [(0, padded - n), (0, 0)]))
      slots.append(PackedSlot("codes", rows, tuple(shape), x.spec))
      rows += padded
    elif isinstance(x, (QuantizedArray, FactoredMoment)):
      slots.append(PackedSlot("other", len(others), tuple(shape)))
      others.append(x)
    else:  # an fp32 moment
      dense.append(x.reshape(-1))
      slots.append(PackedSlot("dense", dense_size, tuple(shape)))
      dense_size += x.size
  join = lambda parts, empty: jnp.concatenate(parts) if parts else empty
  return PackedMoment(
      join(codes, jnp.zeros((0, adam_kernel.HALF), jnp.uint8)),
      join(scales, jnp.zeros((0, 1), jnp.float32)),
      join(dense, jnp.zeros((0,), jnp.float32)), tuple(others), tuple(slots),
      treedef)


@dataclasses.dataclass(frozen=True)
class MomentLayout:
  """How the two moments of one tensor are stored (``store_*`` / ``load_*`` per
  tensor shape)."""

  bits: int
  block_size: int
  second_moment: str
  min_quantized_size: int
  second_moment_codebook_override: Optional[str] = None

  @classmethod
  def from_config(cls, config: AdamConfig) -> "MomentLayout":
    return cls(config.bits, config.block_size, config.second_moment,
               config.min_quantized_size, config.second_moment_codebook)

  def quantized(self, shape) -> bool:
    size = 1
    for d in shape:
      size *= d
    return self.bits != 32 and size > self.min_quantized_size

  def factored(self, shape) -> bool:
    return self.second_moment == "factored" and len(
        shape) >= 2 and self.quantized(shape)

  @property
  def first_codebook(self) -> str:
    return "dynamic_tree"

  @property
  def second_codebook(self) -> str:
    if self.second_moment_codebook_override is not None:
      return self.second_moment_codebook_override
    return "linear_nozero" if self.bits == 4 else "dynamic_tree_unsigned"

  def pairing(self, length: int) -> str:
    """Contiguous halves (the fused kernels' format) wherever a row is a
    multiple of 128 codes."""
    halves = self.bits == 4 and length % HALVES_SPAN == 0
    return "halves" if halves else "interleaved"

  def _store_blocks(self, x, codebook: str):
    """``x`` flattened and quantized block-wise with ``codebook``."""
    flat = x.reshape(-1)
    return quantize(flat, codebook=codebook, bits=self.bits,
                    block_size=self.block_size,
                    pairing=self.pairing(flat.shape[0]))

  def store_first(self, m, shape):
    if not self.quantized(shape):
      return m
    return self._store_blocks(m, self.first_codebook)

  def load_first(self, stored, shape):
    return dequantize(stored).reshape(shape) if isinstance(
        stored, QuantizedArray) else stored

  def store_second(self, v, shape):
    if not self.quantized(shape):
      return v
    if self.factored(shape):
      raise AssertionError("factored moments are updated in place")
    if self.second_moment == "rank1":
      return quantize(v, codebook=self.second_codebook, bits=self.bits,
                      block_size=self.block_size, normalization="rank1",
                      pairing=self.pairing(v.shape[-1]))
    return self._store_blocks(v, self.second_codebook)

  # both moments are stored the same way once quantized
  load_second = load_first

  def zeros(self, params):
    """Zero ``(mu, nu)`` like ``params``, stored per this layout (a factored
    second moment as its fp32 row and column factors)."""

    def first(p):
      shape = jnp.shape(p)
      return self.store_first(jnp.zeros(shape, jnp.float32), shape)

    def second(p):
      shape = jnp.shape(p)
      if self.factored(shape):
        return FactoredMoment(
            jnp.zeros(shape[:-1], jnp.float32),
            jnp.zeros(shape[:-2] + shape[-1:], jnp.float32))
      return self.store_second(jnp.zeros(shape, jnp.float32), shape)

    return jax.tree.map(first, params), jax.tree.map(second, params)

  def kernel_view(self, shape, config):
    """The ``(rows, cols)`` view of the fused kernels for this tensor, or
    ``None`` (XLA path)."""
    if not self.quantized(
        shape) or self.bits != 4 or self.block_size != adam_kernel.COLUMNS:
      return None
    return adam_kernel.covers(tuple(shape), config)


def factored_estimate(factors: FactoredMoment) -> jax.Array:
  row_mean = jnp.mean(factors.row, axis=-1, keepdims=True)
  safe_mean = jnp.where(row_mean > 0, row_mean, 1.0)
  return (factors.row / safe_mean)[..., :, None] * factors.col[..., None, :]
