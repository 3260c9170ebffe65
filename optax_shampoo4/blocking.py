"""Reshaping tensors into preconditioner blocks and grouping the blocks by size.

The rule (``docs/algorithms.md``, "Shapes"):

* a tensor with fewer than two axes of size > 1 (bias, norm scale, scalar) or no
  elements gets no
  preconditioner: its gradient passes through to the base optimizer;
* a tensor with exactly two such axes is that matrix: a Dense kernel ``(in,
  out)`` or an embedding ``(vocab, d)``;
* a tensor with more is split between two contiguous groups of axes, rows and
  columns, at the split that needs the fewest preconditioner entries once long
  sides are cut (below). This fits every Flax layout: attention ``(d_model,
  heads, head_dim) → (d_model, heads·head_dim)`` and ``(heads, head_dim,
  d_model) → (heads·head_dim, d_model)``, a conv kernel ``(kh, kw, Cin, Cout) →
  (kh·kw·Cin, Cout)``;
* :class:`~optax_shampoo4.config.DimensionNumbers` override the rule per leaf
  (row axes, column axes, and batch axes whose every index is a matrix of its
  own);
* each side longer than ``max_order`` is cut into chunks of ``max_order`` (3072
  → 1200, 1200, 672); every 2-D block gets a left preconditioner (order = its
  rows) and a right one (order = its columns).

Preconditioners of equal order live in one stack ``(count, order, order)`` so
that each *order class* compiles to one batched program; blocks of equal shape
are preconditioned together. Everything here is static Python computed from
shapes, so it is free at run time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_shampoo4.config import DimensionNumbers


def chunk_sizes(dimension: int, max_order: int) -> Tuple[int, ...]:
  """Sizes of the chunks ``dimension`` is cut into (all ``max_order`` but
  possibly the last)."""
  full, rest = divmod(dimension, max_order)
  return (max_order,) * full + ((rest,) if rest else ())


def preconditioner_entries(rows: int, cols: int, max_order: int) -> int:
  """Entries ``Σ order²`` of the preconditioners of a ``(rows, cols)`` matrix
  cut at ``max_order``."""
  row_chunks, col_chunks = chunk_sizes(rows,
                                       max_order), chunk_sizes(cols, max_order)
  return (len(col_chunks) * sum(r * r for r in row_chunks) +
          len(row_chunks) * sum(c * c for c in col_chunks))


@dataclasses.dataclass(frozen=True)
class MatrixLayout:
  """How a tensor is viewed as a stack of matrices:
  ``x.transpose(perm).reshape(batch, rows, cols)``."""

  perm: Tuple[int, ...]
  batch: int
  rows: int
  cols: int

  def to_matrices(self, x: jax.Array) -> jax.Array:
    return jnp.transpose(x, self.perm).reshape(self.batch, self.rows, self.cols)

  def from_matrices(self, m: jax.Array, shape: Sequence[int]) -> jax.Array:
    permuted = tuple(shape[a] for a in self.perm)
    return jnp.transpose(m.reshape(permuted), np.argsort(self.perm))


def matrix_layout(
    shape: Sequence[int], max_order: int = 1200,
    dimension_numbers: Optional[DimensionNumbers] = None
) -> Optional[MatrixLayout]:
  """The matrices a tensor of ``shape`` is preconditioned as, or ``None`` when
  it gets no preconditioner."""
  shape = tuple(shape)
  if 0 in shape:
    return None
  if dimension_numbers is not None:
    batch, rows, cols = dimension_numbers.resolve(len(shape))
    size = lambda axes: math.prod(shape[a] for a in axes)
    # NO_PRECONDITIONER's empty groups have size 1 too
    if size(rows) == 1 or size(cols) == 1:
      return None
    return MatrixLayout(batch + rows + cols, size(batch), size(rows),
                        size(cols))
  kept = [a for a, d in enumerate(shape) if d != 1]
  if len(kept) < 2:
    return None
  sizes = [shape[a] for a in kept]
  splits = [
      (math.prod(sizes[:s]), math.prod(sizes[s:])) for s in range(1, len(kept))
  ]
  rows, cols = min(splits,
                   key=lambda rc: preconditioner_entries(*rc, max_order))
  unit = tuple(a for a, d in enumerate(shape) if d == 1)
  return MatrixLayout(unit + tuple(kept), 1, rows, cols)


def matrix_shape(shape: Sequence[int],
                 max_order: int = 1200) -> Optional[Tuple[int, int]]:
  """The 2-D shape a tensor is preconditioned as under the default rule, or
  ``None``."""
  layout = matrix_layout(shape, max_order)
  return None if layout is None else (layout.rows, layout.cols)


@dataclasses.dataclass(frozen=True)
class Block:
  """One block of one tensor, and where its two preconditioners sit in their
  stacks."""

  leaf: int
  batch: int
  row_start: int
  rows: int
  col_start: int
  cols: int


@dataclasses.dataclass(frozen=True)
class BlockGroup:
  """Blocks of one shape ``(rows, cols)``, preconditioned in one batched
  product.

  Their left preconditioners are ``stacks[rows][left_offset : left_offset +
  len(blocks)]`` and their right ones ``stacks[cols][right_offset : right_offset
  + len(blocks)]``.
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
  layouts: Tuple[Optional[MatrixLayout], ...]
  groups: Tuple[BlockGroup, ...]
  stack_sizes: Tuple[Tuple[
      int, int], ...]  # (order, number of preconditioners), increasing order
  padding: int  # every stack's length is padded up to a multiple of this

  @property
  def orders(self) -> Tuple[int, ...]:
    return tuple(order for order, _ in self.stack_sizes)

  def stack_length(self, order: int) -> int:
    count = dict(self.stack_sizes)[order]
    return -(-count // self.padding) * self.padding

  @property
  def preconditioned_leaves(self) -> Tuple[int, ...]:
    return tuple(i for i, s in enumerate(self.layouts) if s is not None)

  @property
  def unpreconditioned_leaves(self) -> Tuple[int, ...]:
    return tuple(i for i, s in enumerate(self.layouts) if s is None)


@functools.lru_cache(maxsize=256)
def make_plan(
    shapes: Tuple[Tuple[int, ...], ...], max_order: int, padding: int = 1,
    dimension_numbers: Optional[Tuple[Optional[DimensionNumbers], ...]] = None
) -> Plan:
  """Blocks every tensor of ``shapes`` and assigns stack slots group by group
  (left side first)."""
  dimension_numbers = dimension_numbers or (None,) * len(shapes)
  layouts = tuple(
      matrix_layout(s, max_order, d) for s, d in zip(shapes, dimension_numbers))
  by_shape: Dict[Tuple[int, int], List[Block]] = {}
  for leaf, layout in enumerate(layouts):
    if layout is None:
      continue
    for batch in range(layout.batch):
      row_start = 0
      for rows in chunk_sizes(layout.rows, max_order):
        col_start = 0
        for cols in chunk_sizes(layout.cols, max_order):
          by_shape.setdefault(
              (rows, cols),
              []).append(Block(leaf, batch, row_start, rows, col_start, cols))
          col_start += cols
        row_start += rows

  used: Dict[int, int] = {}
  groups = []
  for (rows, cols), blocks in sorted(by_shape.items()):
    left_offset = used.get(rows, 0)
    used[rows] = left_offset + len(blocks)
    right_offset = used.get(cols, 0)
    used[cols] = right_offset + len(blocks)
    groups.append(
        BlockGroup(rows, cols, tuple(blocks), left_offset, right_offset))
  return Plan(
      tuple(tuple(s) for s in shapes), layouts, tuple(groups),
      tuple(sorted(used.items())), padding)


def gather_blocks(plan: Plan,
                  matrices: Sequence[Optional[jax.Array]]) -> List[jax.Array]:
  """For each group, the stack ``(len(blocks), rows, cols)`` of its blocks cut
  from the ``(batch, rows, cols)`` ``matrices`` of the leaves (see
  :meth:`MatrixLayout.to_matrices`)."""
  out = []
  for group in plan.groups:
    out.append(
        jnp.stack([
            matrices[b.leaf][b.batch, b.row_start:b.row_start + b.rows,
                             b.col_start:b.col_start + b.cols]
            for b in group.blocks
        ]))
  return out


def scatter_blocks(plan: Plan,
                   group_values: Sequence[jax.Array]) -> Dict[int, jax.Array]:
  """Inverse of :func:`gather_blocks`: the ``(batch, rows, cols)`` matrices of
  every preconditioned leaf."""
  pieces: Dict[int, Dict[Tuple[int, int, int], jax.Array]] = {}
  for group, values in zip(plan.groups, group_values):
    for block, value in zip(group.blocks, values):
      pieces.setdefault(block.leaf, {})[(block.batch, block.row_start,
                                         block.col_start)] = value
  matrices = {}
  for leaf, blocks in pieces.items():
    batches = sorted({b for b, _, _ in blocks})
    row_starts = sorted({r for _, r, _ in blocks})
    col_starts = sorted({c for _, _, c in blocks})
    matrices[leaf] = jnp.stack([
        jnp.concatenate([
            jnp.concatenate([blocks[(b, r, c)]
                             for c in col_starts], axis=1)
            for r in row_starts
        ], axis=0)
        for b in batches
    ])
  return matrices


def to_groups(plan: Plan, leaves: Sequence[jax.Array]) -> List[jax.Array]:
  """The block groups (:func:`gather_blocks`) of params-shaped ``leaves``."""
  return gather_blocks(plan, [
      None if layout is None else layout.to_matrices(x)
      for x, layout in zip(leaves, plan.layouts)
  ])


def to_leaves(plan: Plan, group_values: Sequence[jax.Array],
              others: Sequence[Any]) -> List[Any]:
  """Params-shaped leaves from block groups (the inverse of :func:`to_groups`);
  ``others`` gives the leaves without a preconditioner (its entries for
  preconditioned leaves are ignored)."""
  out = list(others)
  for index, matrix in scatter_blocks(plan, group_values).items():
    out[index] = plan.layouts[index].from_matrices(matrix, plan.shapes[index])
  return out


def assemble_stack(plan: Plan, order: int, left: Sequence[jax.Array],
                   right: Sequence[jax.Array], fill: jax.Array) -> jax.Array:
  """The stack ``(stack_length, order, …)`` of per-group left and right
  matrices, in slot order.

  ``left[g]`` / ``right[g]`` are group ``g``'s per-block matrices; ``fill`` (one
  slot's matrix, e.g. ``(order, order)``) fills the padding slots.
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


def oriented_blocks(plan: Plan, order: int,
                    group_blocks: Sequence[jax.Array]) -> jax.Array:
  """The ``(stack_length, order, width)`` stack whose slot ``i`` holds the block
  of the preconditioner in slot ``i``, oriented so that its Gram ``x xᵀ`` is
  that preconditioner's statistic (the block itself for a left preconditioner,
  its transpose for a right one) and zero-padded to the widest block; padding
  slots are zeros.

  A stack like this can be sharded slot-wise before the Grams are taken, so that
  each device computes the Grams of its own slots only (zero columns leave a
  Gram unchanged).
  """
  width = max([g.cols for g in plan.groups if g.rows == order] +
              [g.rows for g in plan.groups if g.cols == order])
  widen = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, width - a.shape[-1])))
  left = [
      widen(b) if g.rows == order else b
      for g, b in zip(plan.groups, group_blocks)
  ]
  right = [
      widen(jnp.swapaxes(b, -1, -2)) if g.cols == order else b
      for g, b in zip(plan.groups, group_blocks)
  ]
  return assemble_stack(plan, order, left, right, fill=jnp.zeros(
      (order, width), group_blocks[0].dtype))


def padding_slots(plan: Plan, order: int):
  """Boolean mask ``(stack_length,)`` of the slots past the stack's
  preconditioners (numpy, static)."""
  return np.arange(plan.stack_length(order)) >= dict(plan.stack_sizes)[order]


def group_slices(plan: Plan, stacks: Dict[int, Any]):
  """For each group, its ``(left, right)`` slices of the per-order ``stacks``
  (arrays, or pytrees such as ``QuantizedArray`` s whose leaves all have the
  stack axis first)."""
  cut = lambda stack, start, k: jax.tree.map(lambda a: a[start:start + k], stack
                                            )
  out = []
  for group in plan.groups:
    k = len(group.blocks)
    out.append((cut(stacks[group.rows], group.left_offset,
                    k), cut(stacks[group.cols], group.right_offset, k)))
  return out
