"""A moment of every tensor stored in the block groups' layout (SOAP's ``M``
and ``V``).

SOAP rotates each block group ``(k, rows, cols)`` as one stack
(:mod:`optax_shampoo4.blocking`). Stored like the params, its moments would be
cut into the groups and pasted back into the leaves on every step, and each
leaf would be quantized on its own: a third of the step on the byte-level LM of
``docs/benchmarks.md`` ("SOAP's moments in the block stacks' layout"). Stored
as the groups' stacks, a moment is quantized as one stack per group, each
block of the stack on its own (its own block-wise scales or rank-1 row and
column maxima, per :class:`~optax_shampoo4.moments.MomentLayout`); the tensors
without a preconditioner keep Adam's per-tensor layout.

:func:`moment_leaves` gives the params-shaped view.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from optax_shampoo4 import blocking
from optax_shampoo4.moments import MomentLayout
from optax_shampoo4.quantization import QuantizedArray, dequantize


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("groups", "plain"),
                   meta_fields=("plain_leaves",))
@dataclasses.dataclass(frozen=True)
class BlockMoment:
  """One moment of every tensor of a params tree.

  Attributes:
    groups: per block group of the blocking plan, its stored ``(k, rows,
      cols)`` stack (fp32, or the quantized stack whose arrays all have the
      ``k`` blocks first).
    plain: the stored moments of the tensors without a preconditioner, in the
      params' leaf order.
    plain_leaves: their indices among the params' leaves (static).
  """

  groups: Tuple[Any, ...]
  plain: Tuple[Any, ...]
  plain_leaves: Tuple[int, ...]


def _store_stack(store, stack: jax.Array):
  """``store`` (a ``MomentLayout`` method) applied to each block of a stack."""
  return jax.vmap(lambda block: store(block, block.shape))(stack)


def _decode(stored, shape) -> jax.Array:
  """An fp32 moment of ``shape`` from its stored form (every stored form
  describes itself)."""
  if isinstance(stored, QuantizedArray):
    return dequantize(stored).reshape(shape)
  return stored


def store(layout: MomentLayout, plan: blocking.Plan,
          groups: Sequence[jax.Array], leaves: Sequence[Optional[jax.Array]],
          second: bool) -> BlockMoment:
  """The stored moment from its fp32 group stacks and the fp32 moments of the
  tensors without a preconditioner (``leaves``, params-ordered; other entries
  are ignored); ``second`` picks the second moment's storage."""
  store_fn = layout.store_second if second else layout.store_first
  plain = plan.unpreconditioned_leaves
  return BlockMoment(
      tuple(_store_stack(store_fn, g) for g in groups),
      tuple(store_fn(leaves[i], plan.shapes[i]) for i in plain), plain)


def load(
    plan: blocking.Plan,
    moment: BlockMoment) -> Tuple[List[jax.Array], List[Optional[jax.Array]]]:
  """``(group stacks, leaves)`` in fp32: ``leaves`` is params-ordered, with
  ``None`` for the tensors in the groups."""
  groups = [
      jax.vmap(functools.partial(_decode,
                                 shape=(group.rows, group.cols)))(stored)
      for group, stored in zip(plan.groups, moment.groups)
  ]
  leaves: List[Optional[jax.Array]] = [None] * len(plan.shapes)
  for i, stored in zip(moment.plain_leaves, moment.plain):
    leaves[i] = _decode(stored, plan.shapes[i])
  return groups, leaves


def zeros(layout: MomentLayout, plan: blocking.Plan,
          second: bool) -> BlockMoment:
  """A zero moment for the tensors of ``plan``."""
  groups = [
      jnp.zeros((len(g.blocks), g.rows, g.cols), jnp.float32)
      for g in plan.groups
  ]
  leaves = [
      jnp.zeros(shape, jnp.float32) if matrices is None else None
      for shape, matrices in zip(plan.shapes, plan.layouts)
  ]
  return store(layout, plan, groups, leaves, second)


def fits(plan: blocking.Plan, moment: BlockMoment) -> bool:
  """Whether ``moment`` was stored for ``plan``'s blocking: the same tensors
  without a preconditioner, and as many groups of as many blocks each."""
  blocks = lambda stored: jax.tree.leaves(stored)[0].shape[0]
  return (moment.plain_leaves == plan.unpreconditioned_leaves and
          len(moment.groups) == len(plan.groups) and all(
              blocks(stored) == len(group.blocks)
              for group, stored in zip(plan.groups, moment.groups)))


def moment_leaves(plan: blocking.Plan, moment: BlockMoment) -> List[jax.Array]:
  """The moment as fp32 tensors shaped like the params, in leaf order."""
  groups, leaves = load(plan, moment)
  return blocking.to_leaves(plan, groups, leaves)


def block_shares(plan: blocking.Plan, moment: BlockMoment,
                 nbytes) -> List[float]:
  """Each params leaf's bytes of ``moment``: a group's bytes split evenly over
  its blocks (``nbytes``: bytes of a stored pytree)."""
  shares = [0.0] * len(plan.shapes)
  for group, stored in zip(plan.groups, moment.groups):
    per_block = nbytes(stored) / len(group.blocks)
    for block in group.blocks:
      shares[block.leaf] += per_block
  for i, stored in zip(moment.plain_leaves, moment.plain):
    shares[i] += nbytes(stored)
  return shares
