"""Shardings for optimizer states on a device mesh.

Shampoo's preconditioners live in per-order stacks ``(k, n, n)`` (see :mod:`optax_shampoo4.blocking`). Each
stack is sharded along its leading axis over one mesh axis, so every device stores and updates (statistics
and inverse roots, the expensive part) ``k / devices`` preconditioners: build the transformation with
``shard_blocks=mesh.shape[axis]`` so that every stack's length is a multiple of the device count. Quantized
stacks shard the same way; their block scales run along each row of each matrix, so no block ever
straddles two devices. Scalars (counters) are replicated.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optax_shampoo4.shampoo import ShampooState


def _stack_sharding(leaf, mesh: Mesh, axis: str):
  ndim = len(getattr(leaf, "shape", ()))
  devices = mesh.shape[axis]
  if ndim == 0 or leaf.shape[0] % devices:
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(mesh, PartitionSpec(axis, *([None] * (ndim - 1))))


def optimizer_state_sharding(state: Any, mesh: Mesh, axis: str, params_sharding: Any = None) -> Any:
  """A pytree of ``NamedSharding`` s matching ``state`` (concrete or from ``jax.eval_shape``).

  Every :class:`~optax_shampoo4.ShampooState` inside ``state`` (alone or within ``optax.chain``) gets its
  preconditioner stacks sharded over ``axis``; leaves of other states take ``params_sharding`` when their
  tree matches the params (e.g. fp32 Adam moments), else are replicated.

  Use it for ``jax.jit(update, out_shardings=...)``, ``jax.device_put`` and Orbax restore targets.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  is_shampoo = lambda x: isinstance(x, ShampooState)

  def assign(node):
    if is_shampoo(node):
      return ShampooState(
          count=replicated,
          preconditioners=jax.tree.map(lambda leaf: _stack_sharding(leaf, mesh, axis), node.preconditioners),
          nonfinite_count=replicated, failure_count=replicated)
    if params_sharding is not None:
      try:
        return jax.tree.map(lambda _, s: s, node, params_sharding)
      except (ValueError, TypeError):
        pass
    return jax.tree.map(lambda _: replicated, node)

  if is_shampoo(state):
    return assign(state)
  if isinstance(state, tuple) and not hasattr(state, "_fields"):  # optax.chain's tuple of states
    return tuple(optimizer_state_sharding(s, mesh, axis, params_sharding) for s in state)
  if hasattr(state, "_fields"):  # a NamedTuple wrapper (e.g. apply_if_finite, inject_hyperparams)
    return type(state)(*(optimizer_state_sharding(s, mesh, axis, params_sharding) for s in state))
  return assign(state)
