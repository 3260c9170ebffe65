"""Memory accounting for optimizer states (any pytree, quantized or not), whole
or per parameter."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import jax
import numpy as np

from optax_shampoo4.config import ShampooConfig
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
  """Bytes one device holds of a leaf: its largest addressable shard (replicated
  leaves count whole)."""
  shards = getattr(leaf, "addressable_shards", None)
  if not shards:
    return _leaf_nbytes(leaf)
  return max(
      int(np.prod(s.data.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
      for s in shards)


def state_nbytes(tree: Any, *, per_device: bool = False) -> int:
  """Bytes stored by every array in ``tree`` (e.g. an optimizer state).

  A :class:`~optax_shampoo4.QuantizedArray` counts what it really stores (packed
  codes, fp32 scales, fp32 diagonal). Leaves may be concrete arrays or
  ``jax.ShapeDtypeStruct`` s, so ``state_nbytes(jax.eval_shape(opt.init,
  params))`` measures a state without allocating it.

  Args:
    tree: any pytree.
    per_device: count, for each leaf, only the largest shard that one device
      holds (for sharded states; abstract leaves count whole).
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
  """One :class:`MemoryEntry` per array of ``tree``, a QuantizedArray counted as
  one entry."""
  is_quantized = lambda x: isinstance(x, QuantizedArray)
  rows = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=is_quantized)[0]:
    if is_quantized(leaf):
      spec = leaf.spec
      kind = f"{spec.bits}-bit {spec.codebook}/{spec.normalization}"
    else:
      kind = str(np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype)))
    rows.append(
        MemoryEntry(
            jax.tree_util.keystr(path), tuple(getattr(leaf, "shape", ())), kind,
            _leaf_nbytes(leaf)))
  return rows


def format_memory_report(tree: Any, *, min_nbytes: int = 0) -> str:
  """A printable table of :func:`memory_report`, largest entries first, with the
  total."""
  rows = sorted(memory_report(tree), key=lambda r: -r.nbytes)
  total = sum(r.nbytes for r in rows)
  shown = [r for r in rows if r.nbytes >= min_nbytes]
  width = max([len(r.path) for r in shown] + [4])
  lines = [f"{'path':<{width}}  {'shape':>18}  {'storage':<28}  {'bytes':>14}"]
  for r in shown:
    lines.append(
        f"{r.path:<{width}}  {str(r.shape):>18}  {r.kind:<28}  {r.nbytes:>14,}")
  lines.append(f"{'total':<{width}}  {'':>18}  {'':<28}  {total:>14,}")
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class ParameterShare:
  """One row of :func:`parameter_memory`: the optimizer-state bytes that serve
  one parameter."""

  path: str
  shape: tuple
  # its entries in every params-shaped part of the state (Adam's or SOAP's
  # moments)
  moment_bytes: int
  preconditioner_bytes: int  # its blocks' slots in Shampoo's or SOAP's stacks

  @property
  def nbytes(self) -> int:
    return self.moment_bytes + self.preconditioner_bytes


def _params_shaped_parts(node: Any, treedef) -> Optional[list]:
  if isinstance(node, (QuantizedArray, jax.Array, np.ndarray,
                       jax.ShapeDtypeStruct)) and treedef.num_nodes > 1:
    return None
  try:
    return treedef.flatten_up_to(node)
  except (ValueError, TypeError):
    return None


def _stacks_of(state: Any) -> List[Dict[str, Any]]:
  """The stack dicts of every Shampoo and SOAP state inside ``state``."""
  # memory accounting sits above the transformations
  from optax_shampoo4.shampoo import ShampooState
  from optax_shampoo4.soap import SoapState
  kinds = (ShampooState, SoapState)
  found = [
      s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kinds))
      if isinstance(s, kinds)
  ]
  return [
      s.preconditioners if isinstance(s, ShampooState) else s.bases
      for s in found
  ]


def parameter_memory(
    opt_state: Any, params: Any,
    config: ShampooConfig = ShampooConfig()) -> List[ParameterShare]:
  """Each parameter's share of ``opt_state``'s bytes.

  Moments: every part of the state shaped like ``params`` (Adam's ``mu``/``nu``,
    4-bit or not), and SOAP's block-stacked moments (a group's bytes split
    evenly over its blocks).
  Preconditioners: the two stack slots of each of the parameter's blocks (a
    stack's bytes split evenly over
  its slots, padding slots left out), with the blocking of ``config`` (the one
  the optimizer was built with). Counters, packed moments
  (``AdamConfig(packed=True)``) and padding are in no row; their bytes are
  :func:`state_nbytes` minus the rows' sum.
  """
  from optax_shampoo4.block_moments import BlockMoment, block_shares
  from optax_shampoo4.stacks import make_plan, stack_key
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  plan, _, _ = make_plan(config, params)
  moments = [0.0] * len(leaves_with_paths)
  is_moment = lambda x: isinstance(x, BlockMoment) or _params_shaped_parts(
      x, treedef) is not None
  for node in jax.tree.leaves(opt_state, is_leaf=is_moment):
    if isinstance(node, BlockMoment):
      parts = block_shares(plan, node, state_nbytes)
    else:
      parts = [
          state_nbytes(p) for p in _params_shaped_parts(node, treedef) or ()
      ]
    moments = [m + p for m, p in zip(moments, parts)] if parts else moments
  preconditioners = [0.0] * len(leaves_with_paths)
  for stacks in _stacks_of(opt_state):
    per_slot = {
        order: state_nbytes(stacks[stack_key(order)]) / plan.stack_length(order)
        for order in plan.orders
    }
    for group in plan.groups:
      for block in group.blocks:
        preconditioners[
            block.leaf] += per_slot[group.rows] + per_slot[group.cols]
  return [
      ParameterShare(
          jax.tree_util.keystr(path), tuple(np.shape(leaf)),
          int(round(moments[i])), int(round(preconditioners[i])))
      for i, (path, leaf) in enumerate(leaves_with_paths)
  ]


def format_parameter_memory(
    opt_state: Any, params: Any,
    config: ShampooConfig = ShampooConfig()) -> str:
  """A printable table of :func:`parameter_memory`, largest first, with bytes
  per parameter entry."""
  rows = sorted(
      parameter_memory(opt_state, params, config), key=lambda r: -r.nbytes)
  width = max([len(r.path) for r in rows] + [9])
  lines = [
      f"{'parameter':<{width}}  {'shape':>18}  {'moments':>12}  "
      f"{'preconditioners':>15}  {'B/entry':>7}"
  ]
  for r in rows:
    entries = max(int(np.prod(r.shape, dtype=np.int64)), 1)
    lines.append(
        f"{r.path:<{width}}  {str(r.shape):>18}  {r.moment_bytes:>12,}  "
        f"{r.preconditioner_bytes:>15,}  "
        f"{r.nbytes / entries:>7.2f}")
  other = state_nbytes(opt_state) - sum(r.nbytes for r in rows)
  lines.append(
      f"{'counters, packed moments, padding':<{width}}  {'':>18}  {other:>12,}")
  return "\n".join(lines)
