"""The second pass of the fused 4-bit Adam step (Pallas / Triton): new moments,
the update, and both moments re-encoded, in one read of the gradient and the
old codes (see :mod:`optax_shampoo4.adam_kernel` for the first pass, the layout
and the helpers both passes share).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from optax_shampoo4 import adam_kernel
from optax_shampoo4 import codes as codebooks


def _pack(codes_even, codes_odd):
  return codes_even | (codes_odd << 4)


def _encode_block(values, codebook: str, midpoint_lookup=None):
  """Block absmax over the tile's columns (one block per row) and the codes of
  both halves."""
  scale = jnp.maximum(
      jnp.abs(values[0]).max(axis=1),
      jnp.abs(values[1]).max(axis=1))[:, None]
  codes = [
      codebooks.encode_scaled(x, scale, codebook, 4, midpoint_lookup)
      for x in values
  ]
  return scale, _pack(*codes)


def _adam_step(flags_ref, grads, first_old, second_old):
  """``(first moments, second moments, updates)`` of both halves of the tile;
  ``first_old`` and ``second_old`` are ``(decoded values, their scales)``."""
  # same operation order as the XLA path, so both agree to the rounding of fused
  # multiply-adds
  (correction1, correction2, b1, one_minus_b1, b2, one_minus_b2, eps,
   eps_root) = (
       flags_ref[k] for k in range(8))
  (first_values, first_scale), (second_values, second_scales) = (first_old,
                                                                 second_old)
  first = [
      b1 * (m * first_scale) + one_minus_b1 * g
      for m, g in zip(first_values, grads)
  ]
  second = [
      b2 * (v * s) + one_minus_b2 * g * g
      for v, s, g in zip(second_values, second_scales, grads)
  ]
  updates = [(m / correction1) / (jnp.sqrt(v / correction2 + eps_root) + eps)
             for m, v in zip(first, second)]
  return first, second, updates


def _apply_updates(config, flags_ref, params_ref, updates, finite):
  """The new params of both halves: optax.add_decayed_weights,
  scale_by_learning_rate and apply_updates, in their order; a non-finite step
  keeps the params."""
  step_size, weight_decay = flags_ref[9], flags_ref[10]
  params = adam_kernel.even_odd(config, params_ref)
  return [
      jnp.where(finite, p + step_size * (u + weight_decay * p), p)
      for u, p in zip(updates, params)
  ]


def _update_kernel(config: adam_kernel.MomentConfig, rows: int, apply: bool,
                   flags_ref, tables_ref, grad_ref, first_codes_ref,
                   first_scale_ref, second_codes_ref, *refs):
  if config.second_moment == "rank1":
    row_old_ref, col_old_ref, row_new_ref, col_new_ref, *refs = refs
    old_scales = adam_kernel.rank1_scale(config, row_old_ref, col_old_ref)
  else:
    second_scale_ref, *refs = refs
    old_scales = (second_scale_ref[...],) * 2
  params_ref, *refs = refs if apply else (None, *refs)
  out_ref, first_codes_out, first_scale_out, second_codes_out, *rest = refs
  second_scale_out = rest
  first_value, first_midpoint = adam_kernel.table_lookups(
      tables_ref, 0) if config.table_lookups else (None, None)
  second_value, second_midpoint = adam_kernel.table_lookups(
      tables_ref, 1) if config.table_lookups else (None, None)
  valid = adam_kernel.row_mask(config, rows)
  grads = [
      jnp.where(valid, g, 0.0) for g in adam_kernel.even_odd(config, grad_ref)
  ]
  first_old = adam_kernel.unpack_codes(first_codes_ref, config.first_codebook,
                                       first_value)
  second_old = adam_kernel.unpack_codes(second_codes_ref,
                                        config.second_codebook, second_value)
  # a non-finite step keeps the old codes and scales (and params)
  finite = flags_ref[8] > 0
  first, second, updates = _adam_step(flags_ref, grads,
                                      (first_old, first_scale_ref[...]),
                                      (second_old, old_scales))
  if apply:
    updates = _apply_updates(config, flags_ref, params_ref, updates, finite)
  for k in (0, 1):
    out_ref[:,
            adam_kernel.columns(config, k)] = updates[k].astype(out_ref.dtype)
  keep = lambda new, old_ref: jnp.where(finite, new, old_ref[...])
  scale, codes = _encode_block(first, config.first_codebook, first_midpoint)
  first_scale_out[...] = keep(scale, first_scale_ref)
  first_codes_out[...] = keep(codes, first_codes_ref)
  if config.second_moment == "rank1":
    new_scales = adam_kernel.rank1_scale(config, row_new_ref, col_new_ref)
    codes = [
        codebooks.encode_scaled(v, s, config.second_codebook, 4,
                                second_midpoint)
        for v, s in zip(second, new_scales)
    ]
    second_codes_out[...] = keep(_pack(*codes), second_codes_ref)
  else:
    scale, codes = _encode_block(second, config.second_codebook,
                                 second_midpoint)
    second_scale_out[0][...] = keep(scale, second_scale_ref)
    second_codes_out[...] = keep(codes, second_codes_ref)


@functools.partial(jax.jit,
                   static_argnames=("config", "interpret", "row_offset"))
def fused_update(flags, grad, first_codes, first_scale, second_codes,
                 second_scales, new_second_scales, params=None, *,
                 config: adam_kernel.MomentConfig, interpret: bool = False,
                 row_offset: int = 0):
  """One Adam step of a ``(rows, cols)`` tensor with 4-bit moments.

  Args:
    flags: ``[1 − b1^t, 1 − b2^t, b1, 1 − b1, b2, 1 − b2, eps, eps_root, finite,
      step_size, weight_decay, 0 …]`` (16 fp32): Adam's bias corrections and
      constants; 0 in ``finite`` keeps the old codes and scales (a non-finite
      step; the update is still computed) and the params; ``step_size``
      (−learning rate) and ``weight_decay`` are read only with ``params``.
    grad: the gradient, ``(rows, cols)``, any float dtype (the update has this
      dtype).
    first_codes, first_scale: packed first-moment codes ``(rows, cols / 2)`` and
      block scales ``(rows, cols / 128)``.
    second_codes, second_scales: packed second-moment codes and its scales:
      ``(row, col)`` maxima for rank-1, or the ``(rows, cols / 128)`` block
      scales.
    new_second_scales: rank-1 only: the new maxima from :func:`rank1_maxima`
      (``None`` for blocks).
    params: ``(rows, cols)``, any float dtype, or ``None``. Given, the kernel
      also applies the update — ``params + step_size · (update + weight_decay ·
      params)``, as ``optax.add_decayed_weights``,
      ``optax.scale_by_learning_rate`` and ``optax.apply_updates`` would — and
      returns the new params (written over ``params``, so a donated buffer is
      updated in place) instead of the update.
    row_offset: blocks only: the codes and block scales are rows ``row_offset
      …`` of larger buffers (a multiple of the row tile; the packed state of
      :func:`~optax_shampoo4.adam.adam_4bit_functions`), which are returned
      whole with only this tensor's rows rewritten. Rows up to the next whole
      tile past the tensor's belong to it (padding).

  Returns:
    ``(update or new params, first_codes, first_scale, second_codes,
    second_scales)``.
  """
  rows, cols = grad.shape
  tile_rows = config.rows_per_program
  if row_offset % tile_rows or (row_offset and config.second_moment != "block"):
    raise ValueError(
        f"row_offset must be a multiple of {tile_rows}, with block scales; got "
        f"{row_offset}")
  specs, operands, aliases = _call_specs(config, grad, first_codes, first_scale,
                                         second_codes, second_scales,
                                         new_second_scales, params,
                                         row_offset // tile_rows)
  tables = jnp.asarray(adam_kernel.lookup_tables(config))
  outputs = pl.pallas_call(
      functools.partial(_update_kernel, config, rows, params is not None),
      grid=adam_kernel.tile_grid(config, rows, cols),
      in_specs=specs[0],
      out_specs=specs[1],
      out_shape=specs[2],
      input_output_aliases=aliases,
      interpret=interpret,
      compiler_params=adam_kernel.compiler_params(config, interpret),
      name=adam_kernel.kernel_name(
          "adam4bit_apply" if params is not None else "adam4bit_update", config,
          grad),
  )(flags, tables, grad, first_codes, first_scale, second_codes, *operands)
  outputs = _with_rest_rows(outputs, flags, grad, first_codes, first_scale,
                            second_codes, second_scales, new_second_scales,
                            params, config, interpret, row_offset)
  out, first_codes, first_scale, second_codes = outputs[:4]
  second_scales = tuple(
      outputs[4:]) if config.second_moment == "block" else tuple(
          new_second_scales)
  return out, first_codes, first_scale, second_codes, second_scales


def _call_specs(config, grad, first_codes, first_scale, second_codes,
                second_scales, new_second_scales, params, first_tile):
  """``((in_specs, out_specs, out_shape), operands, aliases)`` of the update
  kernel's call; ``first_tile``: the row tile of the buffers the tensor
  starts at."""
  spec, tile_rows = pl.BlockSpec, config.rows_per_program
  tile = spec((tile_rows, adam_kernel.COLUMNS), lambda i, j: (i, j))
  packed = spec((tile_rows, adam_kernel.HALF), lambda i, j: (first_tile + i, j))
  block_scale = spec((tile_rows, 1), lambda i, j: (first_tile + i, j))
  row_vector = spec((tile_rows,), lambda i, j: (i,))
  col_vector = spec((adam_kernel.COLUMNS,), lambda i, j: (j,))
  whole = lambda size: spec((size,), lambda i, j: (0,))
  tables = adam_kernel.lookup_tables(config)
  in_specs = [
      whole(16),
      whole(tables.shape[0]), tile, packed, block_scale, packed
  ]
  out_specs = [tile, packed, block_scale, packed]
  out = grad if params is None else params
  out_shape = [
      jax.ShapeDtypeStruct(out.shape, out.dtype),
      jax.ShapeDtypeStruct(first_codes.shape, jnp.uint8),
      jax.ShapeDtypeStruct(first_scale.shape, jnp.float32),
      jax.ShapeDtypeStruct(second_codes.shape, jnp.uint8)
  ]
  if config.second_moment == "rank1":
    in_specs += [row_vector, col_vector, row_vector, col_vector]
    operands = (*second_scales, *new_second_scales)
  else:
    in_specs += [block_scale]
    out_specs += [block_scale]
    out_shape += [jax.ShapeDtypeStruct(second_scales[0].shape, jnp.float32)]
    operands = tuple(second_scales)
  # Codes, block scales and params are rewritten in place: every program reads
  # its tile before writing it, and the step's donated buffers need no copies.
  aliases = {3: 1, 4: 2, 5: 3}
  if config.second_moment == "block":
    aliases[6] = 4
  if params is not None:
    in_specs.append(tile)
    operands += (params,)
    aliases[6 + len(operands) - 1] = 0
  return (in_specs, out_specs, out_shape), operands, aliases


def _with_rest_rows(outputs, flags, grad, first_codes, first_scale,
                    second_codes, second_scales, new_second_scales, params,
                    config, interpret, row_offset):
  """The kernel's outputs with the rows past its grid's whole tiles stepped
  too: as one more zero-padded tile of the buffers where they have room for it
  (padding rows of a packed state), else written over the outputs."""
  rows = grad.shape[0]
  tile_rows = config.rows_per_program
  whole, pad_rest = adam_kernel.rest_tile(config, rows)
  if whole < rows and first_codes.shape[0] >= row_offset + whole + tile_rows:
    # the rest tile's codes and scales are rows of the buffers (padding past the
    # tensor's): no copies
    rest = fused_update(flags, pad_rest(grad), *outputs[1:4],
                        tuple(outputs[4:]), None,
                        None if params is None else pad_rest(params),
                        config=config, interpret=interpret,
                        row_offset=row_offset + whole)
    outputs = [
        outputs[0].at[whole:].set(rest[0][:rows - whole]), *rest[1:4], *rest[4]
    ]
  # the rows past the grid's tiles, written over the kernel's outputs
  elif whole < rows:
    rank1 = config.second_moment == "rank1"
    rest_scales = lambda scales: None if scales is None else (pad_rest(scales[
        0]), *scales[1:]) if rank1 else (tuple(pad_rest(x) for x in scales))
    rest = fused_update(flags, pad_rest(grad), pad_rest(first_codes),
                        pad_rest(first_scale), pad_rest(second_codes),
                        rest_scales(second_scales),
                        rest_scales(new_second_scales),
                        None if params is None else pad_rest(params),
                        config=config, interpret=interpret)
    outputs = [
        x.at[whole:].set(r[:rows - whole])
        for x, r in zip(outputs, rest[:4] + (rest[4] if not rank1 else ()))
    ]
  return outputs
