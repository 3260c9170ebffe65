"""The bounded working set: a function mapped over the leading (stack) axis of
stacks of matrices a chunk at a time, so that only one chunk's fp32
temporaries are live (``ShampooConfig.working_set_bytes``)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax


def chunk_length(order: int, length: int, working_set_bytes: Optional[int],
                 fp32_copies: int) -> int:
  """How many of a stack's ``length`` order-``order`` matrices fit in
  ``working_set_bytes`` when each needs ``fp32_copies`` fp32 ``order × order``
  buffers at once (the whole stack when the budget is ``None``)."""
  if working_set_bytes is None:
    return length
  return int(
      min(length, max(1,
                      working_set_bytes // (fp32_copies * 4 * order * order))))


def map_chunks(fn: Callable[..., Any], chunk: int, *stacks: Any) -> Any:
  """``fn`` over the leading (stack) axis of every array in ``stacks``, at most
  ``chunk`` entries at a time.

  ``fn`` takes and returns batched pytrees (stack axis first) and must treat
  the entries of a batch independently. Chunks run one after another in a loop
  (not ``vmap``: the conditionals inside ``fn`` stay conditionals), so only one
  chunk's temporaries are live. The chunks are of equal size; the last one
  starts early enough to end at the stack's end, so it may redo a few entries
  of the one before, instead of padding the stack (a copy of every input) and
  cutting the padding off the outputs (another).

  When the chunks tile the stack, an output shaped like an input array is
  written over that input, chunk by chunk, after the chunk is read: the loop
  then starts from no zero-filled output stack, written every call, and XLA
  updates the input in place when nothing else reads it.
  """
  length = jax.tree.leaves(stacks)[0].shape[0]
  if chunk >= length:
    return fn(*stacks)
  count = -(-length // chunk)
  size = -(-length // count)
  inputs, input_tree = jax.tree.flatten(stacks, is_leaf=_is_stack)

  def take(start, inputs):
    return _restack(
        input_tree.unflatten(inputs),
        lambda a: lax.dynamic_slice_in_dim(a, start, size), size)

  chunk_shapes = jax.eval_shape(lambda: fn(*take(0, inputs)))
  stack_shapes = _restack(
      chunk_shapes, lambda s: jax.ShapeDtypeStruct(
          (length,) + s.shape[1:], s.dtype), length)
  outputs, treedef = jax.tree.flatten(stack_shapes)
  overwritten = _overwritable_inputs(inputs,
                                     outputs) if count * size == length else {}
  initial = [
      inputs[overwritten[j]] if j in overwritten else jnp.zeros(
          o.shape, o.dtype) for j, o in enumerate(outputs)
  ]

  def body(index, out):
    start = jnp.minimum(index * size, length - size)
    current = list(inputs)
    for j, i in overwritten.items():
      current[i] = out[j]
    pieces = jax.tree.leaves(fn(*take(start, current)))
    return [
        lax.dynamic_update_slice_in_dim(o, p, start, 0)
        for o, p in zip(out, pieces)
    ]

  return treedef.unflatten(lax.fori_loop(0, count, body, initial))


def _is_stack(x) -> bool:
  return hasattr(x, "map_stack")


def _overwritable_inputs(inputs, outputs) -> dict:
  """``{output index: input index}``: each output paired with a distinct plain
  input array (not one inside a ``map_stack`` container, whose arrays may be
  sliced differently) of its shape and dtype."""
  pairs, taken = {}, set()
  for j, out in enumerate(outputs):
    for i, x in enumerate(inputs):
      if (i not in taken and not _is_stack(x) and
          getattr(x, "shape", None) == out.shape and
          getattr(x, "dtype", None) == out.dtype):
        pairs[j] = i
        taken.add(i)
        break
  return pairs


def _restack(tree: Any, fn: Callable[[jax.Array], jax.Array],
             length: int) -> Any:
  """``fn`` on every array of ``tree``; containers with static stack metadata
  (``map_stack``) are told the new stack length."""
  return jax.tree.map(
      lambda x: x.map_stack(fn, length)
      if _is_stack(x) else fn(x), tree, is_leaf=_is_stack)
