"""Reshaping tensors into preconditioner blocks and grouping the blocks by size.

The rule (SPEC §2, adapted to Flax's layouts, where the *last* axis is the output axis):

* size-1 axes are dropped;
* a tensor that has fewer than two axes left (bias, norm scale, scalar) or no elements gets no
  preconditioner: its gradient passes through to the base optimizer;
* otherwise all axes but the last are merged: a Dense kernel ``(in, out)`` stays ``(in, out)``, an
  embedding ``(vocab, d)`` stays ``(vocab, d)``, a Flax conv kernel ``(kh, kw, Cin, Cout)`` becomes
  ``(kh·kw·Cin, Cout)``, keeping the output dimension whole;
* each dimension larger than ``max_order`` is cut into chunks of ``max_order`` (3072 → 1200, 1200, 672);
  every 2-D block gets a left preconditioner (order = its rows) and a right one (order = its columns).

Preconditioners of equal order live in one stack ``(count, order, order)`` so that each *order class*
compiles to one batched program; blocks of equal shape are preconditioned together. Everything here is
static Python computed from shapes, so it is free at run time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def chunk_sizes(dimension: int, max_order: int) -> Tuple[int, ...]:
  """Sizes of the chunks ``dimension`` is cut into (all ``max_order`` but possibly the last)."""
  full, rest = divmod(dimension, max_order)
  return (max_order,) * full + ((rest,) if rest else ())


def matrix_shape(shape: Sequence[int]) -> Optional[Tuple[int, int]]:
  """The 2-D shape a tensor is preconditioned as, or ``None`` when it gets no preconditioner."""
  kept = [d for d in shape if d != 1]
  if len(kept) < 2 or 0 in kept:
    return None
  return (math.prod(kept[:-1]), kept[-1])


@dataclasses.dataclass(frozen=True)
class Block:
  """One block of one tensor, and where its two preconditioners sit in their stacks."""

  leaf: int
  row_start: int
  rows: int
  col_start: int
  cols: int


@dataclasses.dataclass(frozen=True)
class BlockGroup:
  """Blocks of one shape ``(rows, cols)``, preconditioned in one batched product.

  Their left preconditioners are ``stacks[rows][left_offset : left_offset + len(blocks)]`` and their right
  ones ``stacks[cols][right_offset : right_offset + len(blocks)]``.
  """

  rows: int
  cols: int
  blocks: Tuple[Block, ...]
  left_offset: int
  right_offset: int


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static blocking of a whole pytree of tensors."""

  shapes: Tuple[Tuple[int, ...], ...]
  matrix_shapes: Tuple[Optional[Tuple[int, int]], ...]
  groups: Tuple[BlockGroup, ...]
  stack_sizes: Tuple[Tuple[int, int], ...]  # (order, number of preconditioners), increasing order
  padding: int  # every stack's length is padded up to a multiple of this

  @property
  def orders(self) -> Tuple[int, ...]:
    return tuple(order for order, _ in self.stack_sizes)

  def stack_length(self, order: int) -> int:
    count = dict(self.stack_sizes)[order]
    return -(-count // self.padding) * self.padding

  @property
  def preconditioned_leaves(self) -> Tuple[int, ...]:
    return tuple(i for i, s in enumerate(self.matrix_shapes) if s is not None)


@functools.lru_cache(maxsize=256)
def make_plan(shapes: Tuple[Tuple[int, ...], ...], max_order: int, padding: int = 1) -> Plan:
  """Blocks every tensor of ``shapes`` and assigns stack slots group by group (left side first)."""
  matrix_shapes = tuple(matrix_shape(s) for s in shapes)
  by_shape: Dict[Tuple[int, int], List[Block]] = {}
  for leaf, mshape in enumerate(matrix_shapes):
    if mshape is None:
      continue
    row_start = 0
    for rows in chunk_sizes(mshape[0], max_order):
      col_start = 0
      for cols in chunk_sizes(mshape[1], max_order):
        by_shape.setdefault((rows, cols), []).append(Block(leaf, row_start, rows, col_start, cols))
        col_start += cols
      row_start += rows

  used: Dict[int, int] = {}
  groups = []
  for (rows, cols), blocks in sorted(by_shape.items()):
    left_offset = used.get(rows, 0)
    used[rows] = left_offset + len(blocks)
    right_offset = used.get(cols, 0)
    used[cols] = right_offset + len(blocks)
    groups.append(BlockGroup(rows, cols, tuple(blocks), left_offset, right_offset))
  return Plan(tuple(tuple(s) for s in shapes), matrix_shapes, tuple(groups), tuple(sorted(used.items())),
              padding)


def gather_blocks(plan: Plan, matrices: Sequence[Optional[jax.Array]]) -> List[jax.Array]:
  """For each group, the stack ``(len(blocks), rows, cols)`` of its blocks cut from the 2-D ``matrices``."""
  out = []
  for group in plan.groups:
    out.append(jnp.stack([
        matrices[b.leaf][b.row_start:b.row_start + b.rows, b.col_start:b.col_start + b.cols]
        for b in group.blocks]))
  return out


def scatter_blocks(plan: Plan, group_values: Sequence[jax.Array]) -> Dict[int, jax.Array]:
  """Inverse of :func:`gather_blocks`: the 2-D matrix of every preconditioned leaf, from its blocks."""
  pieces: Dict[int, Dict[Tuple[int, int], jax.Array]] = {}
  for group, values in zip(plan.groups, group_values):
    for block, value in zip(group.blocks, values):
      pieces.setdefault(block.leaf, {})[(block.row_start, block.col_start)] = value
  matrices = {}
  for leaf, blocks in pieces.items():
    row_starts = sorted({r for r, _ in blocks})
    col_starts = sorted({c for _, c in blocks})
    rows = [jnp.concatenate([blocks[(r, c)] for c in col_starts], axis=1) for r in row_starts]
    matrices[leaf] = jnp.concatenate(rows, axis=0)
  return matrices


def assemble_stack(plan: Plan, order: int, left: Sequence[jax.Array], right: Sequence[jax.Array],
                   fill: jax.Array) -> jax.Array:
  """The stack ``(stack_length, order, …)`` of per-group left and right matrices, in slot order.

  ``left[g]`` / ``right[g]`` are group ``g``'s per-block matrices; ``fill`` (one slot's matrix, e.g.
  ``(order, order)``) fills the padding slots.
  """
  pieces = []
  for group, lhs, rhs in zip(plan.groups, left, right):
    if group.rows == order:
      pieces.append((group.left_offset, lhs))
    if group.cols == order:
      pieces.append((group.right_offset, rhs))
  pieces.sort(key=lambda p: p[0])
  arrays = [p[1] for p in pieces]
  padding = plan.stack_length(order) - sum(a.shape[0] for a in arrays)
  if padding:
    arrays.append(jnp.broadcast_to(fill, (padding, *fill.shape)))
  return jnp.concatenate(arrays, axis=0)


def oriented_blocks(plan: Plan, order: int, group_blocks: Sequence[jax.Array]) -> jax.Array:
  """The ``(stack_length, order, width)`` stack whose slot ``i`` holds the block of the preconditioner in
  slot ``i``, oriented so that its Gram ``x xᵀ`` is that preconditioner's statistic (the block itself for a
  left preconditioner, its transpose for a right one) and zero-padded to the widest block; padding slots
  are zeros.

  A stack like this can be sharded slot-wise before the Grams are taken, so that each device computes the
  Grams of its own slots only (zero columns leave a Gram unchanged).
  """
  width = max([g.cols for g in plan.groups if g.rows == order] + [g.rows for g in plan.groups if g.cols == order])
  widen = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, width - a.shape[-1])))
  left = [widen(b) if g.rows == order else b for g, b in zip(plan.groups, group_blocks)]
  right = [widen(jnp.swapaxes(b, -1, -2)) if g.cols == order else b for g, b in zip(plan.groups, group_blocks)]
  return assemble_stack(plan, order, left, right, fill=jnp.zeros((order, width), group_blocks[0].dtype))


def padding_slots(plan: Plan, order: int):
  """Boolean mask ``(stack_length,)`` of the slots past the stack's preconditioners (numpy, static)."""
  return np.arange(plan.stack_length(order)) >= dict(plan.stack_sizes)[order]


def group_slices(plan: Plan, stacks: Dict[int, Any]):
  """For each group, its ``(left, right)`` slices of the per-order ``stacks`` (arrays, or pytrees such as
  ``QuantizedArray`` s whose leaves all have the stack axis first)."""
  cut = lambda stack, start, k: jax.tree.map(lambda a: a[start:start + k], stack)
  out = []
  for group in plan.groups:
    k = len(group.blocks)
    out.append((cut(stacks[group.rows], group.left_offset, k), cut(stacks[group.cols], group.right_offset, k)))
  return out
