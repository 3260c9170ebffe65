"""Adam with 4-bit (or 8-bit) moments, and 4-bit Factor, as Optax
transformations [A4].

The update is Adam's, computed in fp32 from the dequantized moments; only what
is stored between steps is quantized:

* first moment ``m``: blocks of 128, signed dynamic-tree codebook;
* second moment ``v``: rank-1 normalization and the linear codebook *without
  zero* (``(i + 1) / 16``) — a zero code makes ``1 / (√v + ε)`` explode [A4,
  §4.1]; or blocks of 128 with the same codebook (``second_moment="block"``); or
  Adafactor's fp32 row/column factorization for tensors of rank ≥ 2
  (``second_moment="factored"``, "4-bit Factor").

Tensors with at most ``min_quantized_size`` elements keep fp32 moments.

Reference: Li, Chen, Zhu. *Memory Efficient Optimizers with 4-bit States.*
  NeurIPS 2023.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_shampoo4 import _checks, adam_kernel, adam_update_kernel
from optax_shampoo4.config import AdamConfig
from optax_shampoo4.moments import (FactoredMoment, MomentLayout, PackedMoment,
                                    factored_estimate, pack_moment)
from optax_shampoo4.nonfinite import all_finite, step_counters, where_finite
from optax_shampoo4.quantization import QuantizedArray


class ScaleByAdam4bitState(NamedTuple):
  """State of :func:`scale_by_adam_4bit`: ``mu``/``nu`` are pytrees like the
  params whose leaves are fp32 arrays, :class:`~optax_shampoo4.QuantizedArray` s
  or :class:`FactoredMoment` s — or, with ``packed=True``, one
  :class:`PackedMoment` each."""

  count: jax.Array
  mu: Any
  nu: Any
  nonfinite_count: jax.Array


class ApplyStep(NamedTuple):
  """What a fused step needs to apply its updates itself (see
  :func:`adam_4bit_functions`)."""

  params: Any  # the params tree
  step_size: jax.Array  # −learning rate (fp32 scalar)
  # a tree like the params of per-leaf decoupled weight decays (0 where masked
  # off)
  weight_decay: Any


def _apply_update(update, param, step_size, weight_decay, finite):
  """``param + step_size · (update + weight_decay · param)`` —
  optax.add_decayed_weights, scale_by_learning_rate and apply_updates in their
  order — or ``param`` unless ``finite``."""
  new = param + step_size * (update + weight_decay * param)
  return jnp.where(finite, new.astype(param.dtype), param)


def xla_leaf_step(layout, b1, b2, eps, eps_root, g, stored_m, stored_v,
                  corrections, finite):
  """One leaf's Adam step with XLA ops: ``(update, new stored m, new stored
  v)``; the stored moments are the old ones unless ``finite``."""
  shape = g.shape
  g32 = g.astype(jnp.float32)
  m = b1 * layout.load_first(stored_m, shape) + (1.0 - b1) * g32
  if isinstance(stored_v, FactoredMoment):
    squared = g32 * g32
    factors = FactoredMoment(
        b2 * stored_v.row + (1.0 - b2) * jnp.mean(squared, axis=-1),
        b2 * stored_v.col + (1.0 - b2) * jnp.mean(squared, axis=-2))
    v = factored_estimate(factors)
    stored_v_new = factors
  else:
    v = b2 * layout.load_second(stored_v, shape) + (1.0 - b2) * g32 * g32
    stored_v_new = layout.store_second(v, shape)
  update = (m / corrections[0]) / (
      jnp.sqrt(v / corrections[1] + eps_root) + eps)
  return (update.astype(g.dtype),
          where_finite(finite, layout.store_first(m, shape),
                       stored_m), where_finite(finite, stored_v_new, stored_v))


def _kernel_operands(config, view, g, stored_m, stored_v):
  rows, cols = view
  blocks = cols // adam_kernel.COLUMNS
  second_scales = stored_v.scales if config.second_moment == "rank1" else (
      stored_v.scales[0].reshape(rows, blocks),)
  return (g.reshape(rows, cols), stored_m.codes.reshape(rows, cols // 2),
          stored_m.scales[0].reshape(rows, blocks),
          stored_v.codes.reshape(rows, cols // 2), second_scales)


def fused_leaf_maxima(config, view, constants, g, stored_v, *, interpret):
  """Phase 1 of the fused path: the new rank-1 scales (old scales for blocks)
  and whether ``g`` is finite (``None`` for blocks: no kernel reads ``g`` before
  the update, see :func:`~optax_shampoo4.nonfinite.all_finite`)."""
  if config.second_moment != "rank1":
    return stored_v.scales, None
  rows, cols = view
  row_max, col_max, nonfinite = adam_kernel.rank1_maxima(
      constants[2:4], g.reshape(rows, cols),
      stored_v.codes.reshape(rows, cols // 2), *stored_v.scales, config=config,
      interpret=interpret)
  return (row_max, col_max), nonfinite == 0


def _kernel_flags(corrections, constants, finite, apply):
  """``(flags, param)`` of :func:`adam_update_kernel.fused_update` for a leaf
  (``apply``: see fused_leaf_step)."""
  param, step_size, weight_decay = apply if apply is not None else (None, 0.0,
                                                                    0.0)
  flags = jnp.concatenate([
      corrections, constants,
      finite.astype(jnp.float32)[None],
      jnp.asarray([step_size, weight_decay], jnp.float32),
      jnp.zeros([5], jnp.float32)
  ])
  return flags, param


def fused_leaf_step(config, view, constants, g, stored_m, stored_v, corrections,
                    finite, new_second_scales, *, interpret, apply=None):
  """Phase 2 of the fused path: the step of the ``(rows, cols)`` view of the
  leaf in one kernel; with ``apply = (param, step_size, weight_decay)`` the
  kernel returns the new param instead of the update."""
  operands = _kernel_operands(config, view, g, stored_m, stored_v)
  grad, first_codes, first_scale, second_codes, second_scales = operands
  if config.second_moment == "rank1":
    new_second_scales = where_finite(finite, new_second_scales, stored_v.scales)
  else:
    new_second_scales = None
  flags, param = _kernel_flags(corrections, constants, finite, apply)
  outputs = adam_update_kernel.fused_update(
      flags, grad, first_codes, first_scale, second_codes, second_scales,
      new_second_scales, None if param is None else param.reshape(grad.shape),
      config=config, interpret=interpret)
  update, first_codes, first_scale, second_codes, second_scales = outputs
  new_m = QuantizedArray(
      first_codes.reshape(stored_m.codes.shape),
      (first_scale.reshape(stored_m.scales[0].shape),), None, stored_m.spec)
  new_v = QuantizedArray(
      second_codes.reshape(stored_v.codes.shape),
      tuple(
          s.reshape(old.shape)
          for s, old in zip(second_scales, stored_v.scales)), None,
      stored_v.spec)
  return update.reshape(g.shape), new_m, new_v


def _packed_step(layout, config, adam_constants, leaves, mu, nu, corrections,
                 constants, finite, applied, *, interpret):
  """The step of every leaf on packed moments: ``(updates or new params, new mu,
  new nu)``. The kernels rewrite their tensors' rows of the code and scale
  buffers in place, one tensor after another; the dense moments take one
  elementwise XLA step over all small tensors at once."""
  b1, b2, eps, eps_root = adam_constants
  out = [None] * len(leaves)
  buffers = (mu.codes, mu.scales, nu.codes, nu.scales)
  # the kernels' (size / 128, 128) view
  view = lambda x: x.reshape(-1, adam_kernel.COLUMNS)
  dense, others = [], []
  for k, (g, slot) in enumerate(zip(leaves, mu.slots)):
    if slot.kind == "codes":
      flags, param = _kernel_flags(corrections, constants, finite, applied[k])
      update, first_codes, first_scale, second_codes, (
          second_scale,) = adam_update_kernel.fused_update(
              flags, view(g), buffers[0], buffers[1], buffers[2], (buffers[3],),
              None, None if param is None else view(param), config=config,
              interpret=interpret, row_offset=slot.start)
      buffers = (first_codes, first_scale, second_codes, second_scale)
      out[k] = update.reshape(g.shape)
    else:
      (dense if slot.kind == "dense" else others).append(k)
  new_dense = (mu.dense, nu.dense)
  if dense:
    grads = jnp.concatenate(
        [leaves[k].astype(jnp.float32).reshape(-1) for k in dense])
    update, *new_dense = xla_leaf_step(
        dataclasses.replace(layout, bits=32), b1, b2, eps, eps_root, grads,
        mu.dense, nu.dense, corrections, finite)
    for k in dense:
      slot = mu.slots[k]
      leaf_update = update[slot.start:slot.start + leaves[k].size].reshape(
          slot.shape).astype(leaves[k].dtype)
      out[k] = leaf_update if applied[k] is None else _apply_update(
          leaf_update, *applied[k], finite)
  new_others = [list(mu.others), list(nu.others)]
  for k in others:
    index = mu.slots[k].start
    update, new_others[0][index], new_others[1][index] = xla_leaf_step(
        layout, b1, b2, eps, eps_root, leaves[k], mu.others[index],
        nu.others[index], corrections, finite)
    out[k] = update if applied[k] is None else _apply_update(
        update, *applied[k], finite)
  new_mu = dataclasses.replace(mu, codes=buffers[0], scales=buffers[1],
                               dense=new_dense[0], others=tuple(new_others[0]))
  new_nu = dataclasses.replace(nu, codes=buffers[2], scales=buffers[3],
                               dense=new_dense[1], others=tuple(new_others[1]))
  return out, new_mu, new_nu


def _finite_and_maxima(kernel_config, constants, leaves, nu_leaves, views,
                       interpret):
  """Phase 1 of a step: whether every gradient is finite (a non-finite step
  keeps the old moments) and, for the leaves the rank-1 kernels cover, the new
  second moment's maxima, which the encoding of every element needs."""
  maxima, finite_leaves, unchecked = [], [], []
  for g, stored_v, view in zip(leaves, nu_leaves, views):
    scales, leaf_finite = None, None
    if view is not None:
      scales, leaf_finite = fused_leaf_maxima(kernel_config, view, constants, g,
                                              stored_v, interpret=interpret)
    maxima.append(scales)
    if leaf_finite is None:
      unchecked.append(g)
    else:
      finite_leaves.append(leaf_finite)
  return jnp.all(jnp.stack(finite_leaves + [all_finite(unchecked)])), maxima


def _leaf_step(layout, kernel_config, adam_constants, constants, corrections,
               finite, leaf, interpret):
  """Phase 2 of a step for one leaf ``(g, m, v, view, maxima, apply)``:
  through the kernels where ``view`` is set, else XLA."""
  g, stored_m, stored_v, view, scales, leaf_apply = leaf
  if view is not None:
    return fused_leaf_step(kernel_config, view, constants, g, stored_m,
                           stored_v, corrections, finite, scales,
                           interpret=interpret, apply=leaf_apply)
  update, m, v = xla_leaf_step(layout, *adam_constants, g, stored_m, stored_v,
                               corrections, finite)
  if leaf_apply is not None:
    update = _apply_update(update, *leaf_apply, finite)
  return update, m, v


def _init_state(layout: MomentLayout, kernel_config, packed: bool,
                params) -> ScaleByAdam4bitState:
  """Zero moments for ``params``, stored as ``layout`` says (packed into a
  few arrays with ``packed``)."""
  mu, nu = layout.zeros(params)
  if packed:
    leaves, treedef = jax.tree.flatten(params)
    shapes = [p.shape for p in leaves]
    covered = [
        layout.kernel_view(shape, kernel_config) is not None for shape in shapes
    ]
    mu, nu = (
        pack_moment(
            treedef.flatten_up_to(moment), covered, shapes, treedef,
            kernel_config.rows_per_program) for moment in (mu, nu))
  return ScaleByAdam4bitState(
      jnp.zeros([], jnp.int32), mu, nu, jnp.zeros([], jnp.int32))


def _step_constants(hyper, count: jax.Array):
  """``(bias corrections, kernel constants)`` of step ``count`` for ``hyper =
  (b1, b2, eps, eps_root)``."""
  b1, b2, eps, eps_root = hyper
  corrections = jnp.stack([
      1.0 - b1**count.astype(jnp.float32), 1.0 - b2**count.astype(jnp.float32)
  ])
  # 1 − b is taken before rounding to fp32 (as the XLA path's Python-float
  # arithmetic does)
  constants = jnp.stack([
      jnp.asarray(c, jnp.float32)
      for c in (b1, 1.0 - b1, b2, 1.0 - b2, eps, eps_root)
  ])
  return corrections, constants


def _applied_leaves(apply: Optional[ApplyStep], treedef, count: int):
  """Per leaf, ``(param, step size, weight decay)`` to apply, or None."""
  if apply is None:
    return [None] * count
  return [(p, apply.step_size, wd) for p, wd in zip(
      treedef.flatten_up_to(apply.params),
      treedef.flatten_up_to(apply.weight_decay))]


def _leaf_steps(layout, kernel_config, hyper, treedef, state, leaves, step):
  """``(finite, outputs, mu, nu)`` of a per-tensor state, leaf by leaf;
  ``step = (corrections, constants, applied, interpret, implementation)``."""
  corrections, constants, applied, interpret, implementation = step
  nu_leaves = treedef.flatten_up_to(state.nu)
  views = [
      layout.kernel_view(g.shape, kernel_config)
      if implementation == "pallas" else None for g in leaves
  ]
  finite, maxima = _finite_and_maxima(kernel_config, constants, leaves,
                                      nu_leaves, views, interpret)
  out, new_mu, new_nu = [], [], []
  for leaf in zip(leaves, treedef.flatten_up_to(state.mu), nu_leaves, views,
                  maxima, applied):
    update, m, v = _leaf_step(layout, kernel_config, hyper, constants,
                              corrections, finite, leaf, interpret)
    out.append(update)
    new_mu.append(m)
    new_nu.append(v)
  return finite, out, treedef.unflatten(new_mu), treedef.unflatten(new_nu)


def adam_4bit_functions(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0,
                        config: AdamConfig = AdamConfig()):
  """``(init_fn, step_fn)`` of :func:`scale_by_adam_4bit` (same arguments):
  ``step_fn(updates, state, apply=None)`` is its update; with an
  :class:`ApplyStep` it returns the new params instead of the updates — the
  fused kernels then write the params themselves
  (:func:`optax_shampoo4.fused_step`), and a step with a non-finite gradient
  leaves the params unchanged too."""
  _checks.check_type("config", config, AdamConfig)
  _checks.check_adam_constants(b1, b2, eps)
  _checks.check_number("eps_root", eps_root, 0.0)
  hyper = (b1, b2, eps, eps_root)
  layout = MomentLayout.from_config(config)
  kernel_config = adam_kernel.MomentConfig(layout.first_codebook,
                                           layout.second_codebook,
                                           config.second_moment)
  init_fn = functools.partial(_init_state, layout, kernel_config, config.packed)

  def step_fn(updates, state, apply: Optional[ApplyStep] = None):
    leaves, treedef = jax.tree.flatten(updates)
    count = state.count + 1
    corrections, constants = _step_constants(hyper, count)
    applied = _applied_leaves(apply, treedef, len(leaves))
    # off GPU the kernels run in the Pallas interpreter
    interpret = adam_kernel.FORCE_INTERPRET or jax.default_backend() != "gpu"
    if config.packed:
      if not isinstance(state.mu, PackedMoment) or state.mu.treedef != treedef:
        raise ValueError(
            "packed=True: the state must come from this transformation's init "
            "on params with the "
            "structure of the updates")
      finite = all_finite(leaves)
      out, mu, nu = _packed_step(layout, kernel_config, hyper, leaves, state.mu,
                                 state.nu, corrections, constants, finite,
                                 applied, interpret=interpret)
    else:
      finite, out, mu, nu = _leaf_steps(
          layout, kernel_config, hyper, treedef, state, leaves,
          (corrections, constants, applied, interpret, config.implementation))
    # Updates keep the gradient's dtype (the Optax contract); with ``apply``
    # they are the params, already in the params' dtypes.
    if apply is None:
      out = [u.astype(g.dtype) for u, g in zip(out, leaves)]
    return treedef.unflatten(out), ScaleByAdam4bitState(
        mu=mu, nu=nu, **step_counters(state, count, finite))

  return init_fn, step_fn


def scale_by_adam_4bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    config: AdamConfig = AdamConfig(),
) -> optax.GradientTransformationExtraArgs:
  """Rescales updates by Adam's rule, storing both moments in 4 (or 8) bits
  [A4].

  Args:
    b1: decay of the first moment (default 0.9).
    b2: decay of the second moment (default 0.999).
    eps: added to ``√v̂`` in the denominator (default 1e-8).
    eps_root: added to ``v̂`` inside the square root (default 0).
    config: how the moments are stored (bits, second-moment layout, kernels);
      see :class:`~optax_shampoo4.config.AdamConfig`. The Pallas kernels
      (``implementation="pallas"``) are for one GPU or replicated params (GSPMD
      cannot split a kernel); they cover 4-bit moments with 128-element blocks,
      and other tensors take the XLA path, which stores the same format.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`ScaleByAdam4bitState`. Moments cost about 1.03–1.06 bytes per
    parameter at 4 bits (0.53 with ``"factored"``) instead of 8.

  A step whose gradient holds a NaN/Inf leaves the moments and ``count``
  untouched (``nonfinite_count`` is incremented) and returns the non-finite
  update, so ``optax.apply_if_finite`` can skip it.
  """
  init_fn, step_fn = adam_4bit_functions(b1, b2, eps, eps_root, config)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    with jax.named_scope("adam_4bit"):  # labels its kernels in profiles
      return step_fn(updates, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
