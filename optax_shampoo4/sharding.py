"""Shardings for optimizer states on a device mesh.

Shampoo's preconditioners live in per-order stacks ``(k, n, n)`` (see
:mod:`optax_shampoo4.blocking`). Each stack is sharded along its leading axis
over one mesh axis, so every device stores and updates (statistics and inverse
roots, the expensive part) ``k / devices`` preconditioners: build the
transformation with ``shard_blocks=mesh.shape[axis]`` so that every stack's
length is a multiple of the device count. Quantized stacks shard the same way;
their block scales run along each row of each matrix, so no block ever straddles
two devices. Scalars (counters) are replicated.

Adam moments (:func:`~optax_shampoo4.scale_by_adam_4bit`) follow the params
(FSDP): a moment of a param sharded along its first axis is sharded along the
leading axis of every stored array — fp32 moments like the param; 4-bit codes
and the row maxima of rank-1 scales along rows; flat block-quantized codes and
block scales in contiguous chunks, which is allowed only when every device's
chunk holds whole blocks (the param's rows per device × its other dims is a
multiple of the block size: both arrays' lengths divide by the device count);
4-bit Factor's row factors along rows. Column maxima of rank-1 scales and 4-bit
Factor's column factors (reductions over all rows) and anything that does not
divide are replicated.

SOAP's moments live in block stacks (:class:`~optax_shampoo4.BlockMoment`): a
group's stack is sharded along its blocks when the device count divides their
number, else each block's moment along its rows by the rule above; the moments
of tensors without a preconditioner follow the params like Adam's.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optax_shampoo4.adam import ScaleByAdam4bitState
from optax_shampoo4.block_moments import BlockMoment
from optax_shampoo4.moments import FactoredMoment
from optax_shampoo4.quantization import QuantizedArray
from optax_shampoo4.shampoo import ShampooState
from optax_shampoo4.soap import SoapState


def _stack_sharding(leaf, mesh: Mesh, axis: str):
  ndim = len(getattr(leaf, "shape", ()))
  devices = mesh.shape[axis]
  if ndim == 0 or leaf.shape[0] % devices:
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(mesh, PartitionSpec(axis, *([None] * (ndim - 1))))


def _leading_axis(sharding):
  spec = getattr(sharding, "spec", None)
  return spec[0] if spec else None


def _moment_sharding(moment, axis, mesh: Mesh, batch: int = 0):
  """The sharding of a moment whose tensor is sharded along its first axis
  over the mesh axis ``axis`` (``None``: replicated), under ``batch`` leading
  axes that stay whole (a stack of blocks' moments)."""
  replicated = NamedSharding(mesh, PartitionSpec())
  if axis is None:
    return jax.tree.map(lambda _: replicated, moment)
  devices = math.prod(
      mesh.shape[name]
      for name in (axis if isinstance(axis, tuple) else (axis,)))
  divides = lambda a: a.ndim > batch and a.shape[batch] % devices == 0
  along_rows = lambda a: NamedSharding(
      mesh,
      PartitionSpec(*([None] * batch), axis, *([None] * (a.ndim - 1 - batch))))
  if isinstance(moment, QuantizedArray):
    if not (divides(moment.codes) and
            divides(moment.scales[0])):  # a block would straddle two devices
      return jax.tree.map(lambda _: replicated, moment)
    scales = (along_rows(moment.scales[0]),) + (replicated,) * (
        len(moment.scales) - 1)
    diagonal = None if moment.diagonal is None else replicated
    return QuantizedArray(
        along_rows(moment.codes), scales, diagonal, moment.spec)
  if isinstance(moment,
                FactoredMoment):  # column factors are a mean over all rows
    return FactoredMoment(
        along_rows(moment.row) if divides(moment.row) else replicated,
        replicated)
  return along_rows(moment) if divides(moment) else replicated


def optimizer_state_sharding(state: Any, mesh: Mesh, axis: str,
                             params_sharding: Any = None,
                             replicate_roots: bool = False) -> Any:
  """A pytree of ``NamedSharding`` s matching ``state`` (concrete or from
  ``jax.eval_shape``).

  Every :class:`~optax_shampoo4.ShampooState` inside ``state`` (alone or within
  ``optax.chain``) gets its preconditioner stacks sharded over ``axis`` — with
  ``replicate_roots``, all but the (4-bit) inverse roots, which every device
  then holds whole: the statistics and inverse-root updates are still split over
  the devices (the new roots are gathered once per inverse-root update), and the
  per-step preconditioning ``L̂ G R̂`` of replicated gradients needs no
  communication, at the cost of the roots' bytes on every device (about half of
  the preconditioner state); the moments of a
  :class:`~optax_shampoo4.adam.ScaleByAdam4bitState` follow ``params_sharding``
  by the rule in this module's docstring; a :class:`~optax_shampoo4.SoapState`
  has its bases sharded like the stacks and its moments like Adam's; leaves of
  other states take ``params_sharding`` when their tree matches the params (e.g.
  ``optax.adam``'s moments), else are replicated.

  Use it for ``jax.jit(update, out_shardings=...)``, ``jax.device_put`` and
  Orbax restore targets.
  """
  return _state_sharding(state,
                         _Target(mesh, axis, params_sharding, replicate_roots))


class _Target(NamedTuple):
  """The arguments of :func:`optimizer_state_sharding`."""

  mesh: Mesh
  axis: str
  params_sharding: Any
  replicate_roots: bool

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def stacks(self, tree):
    return jax.tree.map(
        lambda leaf: _stack_sharding(leaf, self.mesh, self.axis), tree)

  def moments(self, tree):
    """Adam-style moments: along the params' rows, or replicated without
    params_sharding."""
    if self.params_sharding is None:
      return jax.tree.map(lambda _: self.replicated, tree)
    shardings, treedef = jax.tree.flatten(self.params_sharding)
    return treedef.unflatten([
        _moment_sharding(m, _leading_axis(s), self.mesh)
        for m, s in zip(treedef.flatten_up_to(tree), shardings)
    ])

  def block_moment(self, moment: BlockMoment) -> BlockMoment:
    """SOAP's moments: each group's stack along its blocks when the devices
    divide their count, else along each block's rows like a row-sharded
    param's moment; the other tensors' moments like Adam's."""
    devices = self.mesh.shape[self.axis]

    def group(stored):
      if all(a.shape[0] % devices == 0 for a in jax.tree.leaves(stored)):
        return self.stacks(stored)
      return _moment_sharding(stored, self.axis, self.mesh, batch=1)

    params = jax.tree.leaves(self.params_sharding)  # [] without params
    axis = lambda i: _leading_axis(params[i]) if params else None
    plain = tuple(
        _moment_sharding(m, axis(i), self.mesh)
        for i, m in zip(moment.plain_leaves, moment.plain))
    return BlockMoment(
        tuple(group(g) for g in moment.groups), plain, moment.plain_leaves)


def _shampoo_state_sharding(node: ShampooState, target: _Target):
  stacks = target.stacks(node.preconditioners)
  replicated = target.replicated
  if target.replicate_roots:
    stacks = {
        key:
            stack._replace(
                inverse_root=jax.tree.map(lambda _: replicated,
                                          stack.inverse_root))
        for key, stack in stacks.items()
    }
  return ShampooState(count=replicated, preconditioners=stacks,
                      nonfinite_count=replicated, failure_count=replicated)


def _leaf_state_sharding(node: Any, target: _Target):
  """The sharding of one transformation's state."""
  replicated = target.replicated
  if isinstance(node, ShampooState):
    return _shampoo_state_sharding(node, target)
  if isinstance(node, SoapState):  # bases like Shampoo's stacks
    return SoapState(replicated, target.stacks(node.bases),
                     target.block_moment(node.mu), target.block_moment(node.nu),
                     replicated, replicated)
  if isinstance(node, ScaleByAdam4bitState):
    return ScaleByAdam4bitState(replicated, target.moments(node.mu),
                                target.moments(node.nu), replicated)
  params = target.params_sharding
  if params is not None and jax.tree.structure(node) == jax.tree.structure(
      params):
    return jax.tree.map(lambda _, s: s, node, params)
  return jax.tree.map(lambda _: replicated, node)


def _state_sharding(state: Any, target: _Target):
  if isinstance(state, (ShampooState, SoapState, ScaleByAdam4bitState)):
    return _leaf_state_sharding(state, target)
  if isinstance(state, tuple) and not hasattr(state, "_fields"):
    # optax.chain's tuple of states
    return tuple(_state_sharding(s, target) for s in state)
  # a NamedTuple wrapper (e.g. skip_nonfinite's, inject_hyperparams')
  if hasattr(state, "_fields"):
    return type(state)(*(_state_sharding(s, target) for s in state))
  return _leaf_state_sharding(state, target)
