"""SOAP's rotations, block group by block group: Adam's step in the rotated
basis (``U_L G U_Rᵀ``, ``V``'s update, ``U_Lᵀ [M̂' / (√V̂ + ε)] U_R``), and
``V`` carried to new bases on a refresh (``docs/algorithms.md`` §7).

Each group runs as one batched program over its stack of blocks, in chunks
within the working set (:func:`optax_shampoo4.chunks.map_chunks`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax.numpy as jnp

from optax_shampoo4 import blocking, chunks, linalg
from optax_shampoo4.preconditioners import load_basis, make_codec
from optax_shampoo4.stacks import Stacks, linalg_numerics, stack_key

# fp32 buffers of one block's rotation: gradient, moments, both bases, rotated
# copies and the update.
ROTATION_FP32_COPIES = 10


def _rotate(left, matrix, right, precision: str):
  """``left @ matrix @ rightᵀ`` over a stack (``precision``: a
  ``preconditioning_precision`` name)."""
  return linalg.product(
      linalg.product(left, matrix, precision), linalg.transpose(right),
      precision)


def _project_second_moment(v, left_change, right_change, precision: str):
  """``V`` carried from the old rotated basis to the new one by the changes of
  basis ``P = U_new U_oldᵀ``: entry variances moved by ``P∘P``."""
  return _rotate(
      jnp.square(left_change), v, jnp.square(right_change), precision)


class Rotation(NamedTuple):
  """Adam's step in the rotated basis, block group by block group (chunked
  within the working set)."""

  stacks: Stacks
  precision: str  # of the rotations: a preconditioning_precision name

  def _loaders(self, group):
    """Loaders of the group's left and right bases for each step's rotations
    (a 4-bit basis rectified by ``bjorck_steps[1]`` Björck steps) and its chunk
    length."""
    config = self.stacks.config
    steps = config.bjorck_steps_of("soap")[1]
    numerics = linalg.Numerics(linalg.PRODUCT_PRECISIONS[self.precision])
    loader = lambda order: functools.partial(
        load_basis, make_codec(config, order), steps, numerics=numerics)
    return loader(group.rows), loader(group.cols), self._chunk(group)

  def _chunk(self, group):
    return self.stacks.chunk(
        max(group.rows, group.cols), ROTATION_FP32_COPIES, len(group.blocks))

  def _change_of_basis(self, order: int):
    """``(new rows, old rows) -> P = U_new U_oldᵀ`` of two stored bases of
    ``order``. Of 4-bit bases, ``P`` is formed from the decoded rows and then
    rectified by ``bjorck_steps[0]`` Björck steps: to first order in the
    quantization errors that equals the product of the rectified bases, and it
    takes one rectification per change of basis instead of one per basis."""
    config = self.stacks.config
    codec = make_codec(config, order)
    steps = config.bjorck_steps_of("soap")[0] if codec.quantized else 0
    numerics = linalg_numerics(config)

    def change(new, old):
      product = linalg.product(
          codec.load(new), linalg.transpose(codec.load(old)), self.precision)
      return linalg.bjorck(product, steps, numerics)

    return change

  def _slices(self, bases):
    plan = self.stacks.plan
    return blocking.group_slices(
        plan,
        {order: bases[stack_key(order)].eigenvectors for order in plan.orders})

  def apply(self, groups, bases, constants):
    """``(update blocks, new V blocks)`` of every group from its gradient, ``M``
    and ``V`` blocks."""
    b2, eps, corrections = constants
    updates, second_moments = [], []
    for group, (g, m, v), (left, right) in zip(self.stacks.plan.groups, groups,
                                               self._slices(bases)):
      load_left, load_right, chunk = self._loaders(group)

      def step(g, m, v, left, right):
        u_left, u_right = load_left(left), load_right(right)
        v = b2 * v + (1.0 - b2) * jnp.square(
            _rotate(u_left, g, u_right, self.precision))
        normalized = (_rotate(u_left, m, u_right, self.precision) /
                      corrections[0]) / (
                          jnp.sqrt(v / corrections[1]) + eps)
        update = linalg.product(
            linalg.product(
                linalg.transpose(u_left), normalized, self.precision), u_right,
            self.precision)
        return update, v

      update, v = chunks.map_chunks(step, chunk, g, m, v, left, right)
      updates.append(update)
      second_moments.append(v)
    return updates, second_moments

  def project(self, second_moments, new_bases, old_bases):
    """Every group's ``V`` blocks carried from the old bases to the new ones."""
    out = []
    for group, v, (left, right), (old_left,
                                  old_right) in zip(self.stacks.plan.groups,
                                                    second_moments,
                                                    self._slices(new_bases),
                                                    self._slices(old_bases)):
      left_change = self._change_of_basis(group.rows)
      right_change = self._change_of_basis(group.cols)

      def carry(v, left, right, old_left, old_right):
        return _project_second_moment(v, left_change(left, old_left),
                                      right_change(right, old_right),
                                      self.precision)

      out.append(
          chunks.map_chunks(carry, self._chunk(group), v, left, right, old_left,
                            old_right))
    return out
