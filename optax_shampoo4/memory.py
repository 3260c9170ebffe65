"""Memory accounting for optimizer states (any pytree, quantized or not)."""

from __future__ import annotations

import dataclasses
from typing import Any, List

import jax
import numpy as np

from optax_shampoo4.quantization import QuantizedArray


def _leaf_nbytes(leaf: Any) -> int:
  if isinstance(leaf, QuantizedArray):
    return leaf.nbytes
  shape = getattr(leaf, "shape", None)
  dtype = getattr(leaf, "dtype", None)
  if shape is None or dtype is None:  # Python scalars and the like
    return np.asarray(leaf).nbytes if leaf is not None else 0
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _leaf_device_nbytes(leaf: Any) -> int:
  """Bytes one device holds of a leaf: its largest addressable shard (replicated leaves count whole)."""
  shards = getattr(leaf, "addressable_shards", None)
  if not shards:
    return _leaf_nbytes(leaf)
  return max(int(np.prod(s.data.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize for s in shards)


def state_nbytes(tree: Any, *, per_device: bool = False) -> int:
  """Bytes stored by every array in ``tree`` (e.g. an optimizer state).

  A :class:`~optax_shampoo4.QuantizedArray` counts what it really stores (packed codes, fp32 scales, fp32
  diagonal). Leaves may be concrete arrays or ``jax.ShapeDtypeStruct`` s, so
  ``state_nbytes(jax.eval_shape(opt.init, params))`` measures a state without allocating it.

  Args:
    tree: any pytree.
    per_device: count, for each leaf, only the largest shard that one device holds (for sharded states;
      abstract leaves count whole).
  """
  count = _leaf_device_nbytes if per_device else _leaf_nbytes
  return int(sum(count(leaf) for leaf in jax.tree.leaves(tree)))


@dataclasses.dataclass(frozen=True)
class MemoryEntry:
  """One row of :func:`memory_report`."""

  path: str
  shape: tuple
  kind: str
  nbytes: int


def memory_report(tree: Any) -> List[MemoryEntry]:
  """One :class:`MemoryEntry` per array of ``tree``, a QuantizedArray counted as one entry."""
  is_quantized = lambda x: isinstance(x, QuantizedArray)
  rows = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]:
    if is_quantized(leaf):
      spec = leaf.spec
      kind = f"{spec.bits}-bit {spec.codebook}/{spec.normalization}"
    else:
      kind = str(np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype)))
    rows.append(MemoryEntry(jax.tree_util.keystr(path), tuple(getattr(leaf, "shape", ())), kind,
                            _leaf_nbytes(leaf)))
  return rows


def format_memory_report(tree: Any, *, min_nbytes: int = 0) -> str:
  """A printable table of :func:`memory_report`, largest entries first, with the total."""
  rows = sorted(memory_report(tree), key=lambda r: -r.nbytes)
  total = sum(r.nbytes for r in rows)
  shown = [r for r in rows if r.nbytes >= min_nbytes]
  width = max([len(r.path) for r in shown] + [4])
  lines = [f"{'path':<{width}}  {'shape':>18}  {'storage':<28}  {'bytes':>14}"]
  for r in shown:
    lines.append(f"{r.path:<{width}}  {str(r.shape):>18}  {r.kind:<28}  {r.nbytes:>14,}")
  lines.append(f"{'total':<{width}}  {'':>18}  {'':<28}  {total:>14,}")
  return "\n".join(lines)
