"""The per-order preconditioner stacks of a params tree, shared by Shampoo and
SOAP: the blocking plan, the per-step context (blocks, step number,
finiteness), and the stacks' sharding, chunking and numerics.

Every parameter with two non-unit axes is cut into blocks
(:mod:`optax_shampoo4.blocking`); all blocks' preconditioners of one order sit
in one stack ``(k, order, order)``, stored under :func:`stack_key`.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from optax_shampoo4 import blocking, chunks, linalg
from optax_shampoo4.config import ShampooConfig, dimension_numbers_leaves
from optax_shampoo4.nonfinite import all_finite

_BF16_3X = lax.DotAlgorithmPreset.BF16_BF16_F32_X3
# (products, orthonormalization) of the statistics / root updates: fp32; three
# bf16 passes (≈1e-5 relative error, about twice the fp32 rate on GPUs); or
# "high", one TF32 pass on GPUs (≈5e-4, about three times bf16_3x's rate on an
# H100) except in the orthonormalization, whose shift is sized for fp32-level
# rounding. XLA's CPU backend has no faster path for these algorithms: CPUs use
# fp32.
LINALG_PRECISIONS = {
    "highest": (lax.Precision.HIGHEST, None),
    "bf16_3x": (_BF16_3X, None),
    "high": (lax.Precision.HIGH, _BF16_3X),
}


class _NotParams:
  """Marks, for ``optax.tree.map_params``, state that is not shaped like the
  parameters."""

  def __repr__(self):
    return "NOT_PARAMS"


NOT_PARAMS = _NotParams()


def stack_key(order: int) -> str:
  return f"order_{order}"


def leaf_dimension_numbers(config: ShampooConfig, tree: Any, count: int):
  """The per-leaf :class:`DimensionNumbers` (or ``None``) of
  ``config.dimension_numbers`` for ``tree``."""
  spec = config.dimension_numbers
  if spec is None:
    return None
  if callable(spec):
    spec = spec(tree)
  leaves = dimension_numbers_leaves(spec)
  if len(leaves) != count:
    raise ValueError(
        f"dimension_numbers has {len(leaves)} leaves for {count} parameters; "
        "give one "
        "DimensionNumbers or None per parameter")
  return tuple(leaves)


def make_plan(config: ShampooConfig, tree: Any):
  """``(plan, treedef, leaves)`` of a params-shaped ``tree``."""
  leaves, treedef = jax.tree.flatten(tree)
  dims = leaf_dimension_numbers(config, tree, len(leaves))
  plan = blocking.make_plan(
      tuple(tuple(jnp.shape(x)) for x in leaves), config.max_order,
      config.stack_multiple, dims)
  return plan, treedef, leaves


class UpdateContext(NamedTuple):
  """What every update of a blocked transformation starts from
  (:func:`update_context`)."""

  plan: blocking.Plan
  treedef: Any
  leaves: Sequence[jax.Array]
  stacks: "Stacks"
  step: jax.Array  # this step's number (the state's count + 1)
  finite: jax.Array  # whether every gradient leaf is finite


def update_context(config: ShampooConfig, updates: Any,
                   count: jax.Array) -> UpdateContext:
  plan, treedef, leaves = make_plan(config, updates)
  finite = all_finite(leaves)
  return UpdateContext(plan, treedef, leaves, Stacks(config, plan), count + 1,
                       finite)


def is_params_placeholder(params: Any) -> bool:
  """Whether ``init`` was given the placeholder with which
  ``optax.tree.map_params`` probes a state for the whole params tree; the
  stacks are not params-shaped, so they are then one :data:`NOT_PARAMS`
  leaf."""
  return type(params).__name__ == "_ParamsPlaceholder"


class Stacks:
  """Sharding of the per-order stacks under ``config.shard_blocks`` (a no-op
  without a NamedSharding)."""

  def __init__(self, config: ShampooConfig, plan: blocking.Plan):
    self.config, self.plan = config, plan
    sharding = config.block_sharding
    self.whole = None if sharding is None else jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec())

  def constraint(self, order: int):
    """Keeps arrays whose leading axis is the order's stack sharded along
    ``shard_blocks``."""
    sharding, length = self.config.block_sharding, self.plan.stack_length(order)
    if sharding is None:
      # spread by propagation alone: nothing to constrain, but linalg must not
      # loop over the stack
      return (lambda x: x) if self.config.stacks_spread else None

    def constrain(x):
      if getattr(x, "ndim", 0) < 1 or x.shape[0] != length:
        return x
      spec = jax.sharding.PartitionSpec(self.config.block_axes,
                                        *([None] * (x.ndim - 1)))
      return lax.with_sharding_constraint(
          x, jax.sharding.NamedSharding(sharding.mesh, spec))

    # for linalg.per_matrix
    constrain.mesh, constrain.axes = sharding.mesh, self.config.block_axes
    return constrain

  def numerics(self, order: int) -> linalg.Numerics:
    """The precision and sharding constraint of the order's statistics and
    root updates."""
    return linalg_numerics(
        self.config)._replace(constraint=self.constraint(order))

  def constrain(self, stack, order: int):
    """The statistics of a stack stay sharded; the stored root is replicated
    with ``replicate_roots``."""
    constraint = self.constraint(order)
    if constraint is None:
      return stack
    if not hasattr(stack, "inverse_root"):
      return jax.tree.map(constraint, stack)
    stack = stack._replace(
        **{
            name: jax.tree.map(constraint, getattr(stack, name))
            for name in stack._fields
            if name != "inverse_root"
        })
    if self.config.replicate_roots:
      stack = stack._replace(
          inverse_root=jax.tree.map(
              lambda x: lax.with_sharding_constraint(x, self.whole),
              stack.inverse_root))
    return stack

  def constrain_all(self, stacks: Dict[str, Any]) -> Dict[str, Any]:
    """:meth:`constrain` on every order's stack (keyed by :func:`stack_key`)."""
    return {
        stack_key(order): self.constrain(stacks[stack_key(order)], order)
        for order in self.plan.orders
    }

  def chunk(self, order: int, copies: int, length: Optional[int] = None) -> int:
    """How many of ``length`` (default: the order's whole stack) matrices one
    chunk processes."""
    length = self.plan.stack_length(order) if length is None else length
    if self.config.stacks_spread:  # a loop over a sharded axis would gather it
      return length
    return chunks.chunk_length(order, length, self.config.working_set_bytes,
                               copies)

  def oriented(self, order: int, group_blocks):
    """The stack of oriented gradient blocks whose Grams are this step's
    statistics (see :func:`blocking.oriented_blocks`). Sharded, it is
    constrained whole then slot-wise: each device slices its slots from its
    replicated gradient (constrained sharded only, the concatenation became
    all-to-alls; left to propagation, the sharding reached back into the
    per-step product)."""
    if self.whole is None:
      return blocking.oriented_blocks(self.plan, order, group_blocks)
    blocks = [lax.with_sharding_constraint(g, self.whole) for g in group_blocks]
    oriented = lax.with_sharding_constraint(
        blocking.oriented_blocks(self.plan, order, blocks), self.whole)
    return self.constraint(order)(oriented)


def linalg_numerics(config: ShampooConfig) -> linalg.Numerics:
  """The precisions of the statistics and root updates on this backend (CPUs
  always use fp32), without a sharding constraint."""
  if jax.default_backend() == "cpu":
    return linalg.FP32
  precision, orthonormalization = LINALG_PRECISIONS[
      config.linalg_precision_name]
  rectification, _ = LINALG_PRECISIONS[config.rectification_precision_name]
  return linalg.Numerics(precision, orthonormalization=orthonormalization,
                         rectification=rectification)
