"""Fused GPU kernels (Pallas / Triton) for the step of :func:`~optax_shampoo4.scale_by_adam_4bit`.

XLA compiles the 4-bit Adam step of a tensor into several passes, each re-reading the gradient and the
codes and materializing fp32 moments between them (measured 2.3× ``optax.adamw``'s step on GPU). These
kernels do the step in two passes over the tensor, viewed as a ``(rows, cols)`` matrix with ``cols`` a
multiple of 128 (one first-moment block per 128 columns of a row):

1. :func:`rank1_maxima` (rank-1 second moment only): the new second moment's row and column maxima — the
   rank-1 scales it is quantized with depend on every element — and the number of non-finite gradients.
2. :func:`fused_update`: new moments in fp32, the update from them, the new block scales, and both
   moments re-encoded and nibble-packed — reading the gradient and the old codes once and writing the new
   codes and the update once; or, given the params (``optax_shampoo4.fused_step``), applying the update too and
   writing the new params instead of the update.

The stored state has the XLA path's format (fp32 scales; codes paired as contiguous halves of each
128 columns, ``quantization.pack_nibbles(pairing="halves")``), so a state written by one path is read by the
other. The two halves of a tile (low and high nibbles) are read and written as two contiguous slices, so
nothing is interleaved in registers; the ``"interleaved"`` pairing (columns 2j, 2j+1: stride-2 accesses) was
slower (``benchmarks/adam_kernel.py``).

Opt-in (``scale_by_adam_4bit(implementation="pallas")``). On an H100 (``benchmarks/adam_step.py``, GPT-2
medium shapes, 3 steps) the Triton-compiled kernels store exactly the XLA path's codes and scales and their
updates differ by 3e-7 relative (fused multiply-adds); the rows after a tensor's last whole row tile run
as one zero-padded tile (see :func:`covers`). Under GSPMD a kernel is not partitioned, so FSDP-sharded moments would be
gathered: keep ``"xla"`` there. Off GPU the kernels run in the Pallas interpreter (tests).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from optax_shampoo4 import quantization

# Run the kernels through the Pallas interpreter even on GPU (diagnostics: tells a Triton miscompile from
# a kernel bug). Read when a step is traced.
FORCE_INTERPRET = False
COLUMNS = 128  # columns per program: one first-moment block of every row in the tile
HALF = COLUMNS // 2


class MomentConfig(NamedTuple):
  """Static description of one fused step (hashable: it parametrizes the kernels). Adam's constants are
  operands, so ``optax.inject_hyperparams`` can trace them."""

  first_codebook: str
  second_codebook: str
  second_moment: str  # "rank1" | "block"
  # 8 × 128 elements per program, 4 warps, contiguous halves: fastest measured on an H100 (device time of
  # the apply kernel, benchmarks/results/adam_kernel_block_apply.json)
  rows_per_program: int = 8
  num_warps: int = 4
  pairing: str = "halves"  # which two columns share a byte: "halves" (j, j+64) or "interleaved" (2j, 2j+1)
  table_lookups: bool = True  # decode / encode uneven codebooks by table loads (False: chains of selects)


def covers(shape: Tuple[int, ...], config: MomentConfig) -> Optional[Tuple[int, int]]:
  """The ``(rows, cols)`` view the kernels use for a tensor of this shape, or ``None`` if they do not
  apply: rank-1 scales need a matrix (rank 2) with a multiple of 128 columns; block scales only need the
  element count to be a multiple of 128, and the view is ``(size / 128, 128)`` — one block per row, so a
  row tile is 8 consecutive blocks (contiguous in memory) and a tensor's codes and scales are whole rows of
  a larger buffer (the packed state, ``fused_update(row_offset=...)``). The view needs one whole row tile.
  Compiled grids cover whole row tiles only: compiled by Triton on an H100, a masked ragged last tile (the
  50257-row embedding) stored about 1e-4 of its tensor's codes differently from the XLA path, up to 15 code
  steps apart, while tensors without one agreed (``benchmarks/adam_step.py``); the rows after the last
  whole tile run as one zero-padded tile (:func:`_rest_tile`)."""
  size = 1
  for d in shape:
    size *= d
  view = None
  if config.second_moment == "rank1" and len(shape) == 2 and shape[1] % COLUMNS == 0:
    view = tuple(shape)
  elif config.second_moment == "block" and size % COLUMNS == 0 and size > 0:
    view = (size // COLUMNS, COLUMNS)
  if view is None or view[0] < config.rows_per_program:
    return None
  return view


def _row_mask(config, rows: int):
  index = pl.program_id(0) * config.rows_per_program + jnp.arange(config.rows_per_program)
  return (index < rows)[:, None]


def _columns(config, k):
  """The columns of a 128-column tile whose codes sit in the low (k = 0) or high (k = 1) nibbles."""
  return pl.ds(k, HALF, stride=2) if config.pairing == "interleaved" else pl.ds(k * HALF, HALF)


def _even_odd(config, ref):
  return tuple(ref[:, _columns(config, k)].astype(jnp.float32) for k in (0, 1))


def _unpack(codes_ref, codebook: str, value_lookup=None):
  codes = codes_ref[...]
  return tuple(quantization._decode(c, codebook, 4, value_lookup) for c in (codes & 0xF, codes >> 4))


def lookup_tables(config: MomentConfig) -> np.ndarray:
  """The update kernel's tables (fp32, 16 entries each): the values of the first and second moments'
  codebooks, then their decision midpoints. A codebook that is not evenly spaced (the first moment's
  dynamic tree) is decoded and encoded by loads from these (one per element and search level) instead of
  chains of selects: the selects made the kernel ALU-bound."""
  codebooks = (config.first_codebook, config.second_codebook)
  values = [quantization.codebook(name, 4) for name in codebooks]
  midpoints = [np.append(quantization._decision_boundaries(name, 4), np.float32(0)) for name in codebooks]
  return np.concatenate(values + midpoints).astype(np.float32)


def _table_lookups(tables_ref, moment: int):
  """``(value_lookup, midpoint_lookup)`` of moment 0 (first) or 1 (second) in :func:`lookup_tables`."""
  value = lambda codes: tables_ref[codes.astype(jnp.int32) + 16 * moment]
  midpoint = lambda index: tables_ref[index + 16 * (2 + moment)]
  return value, midpoint


def _rank1_scale(config, row_ref, col_ref):
  rows = row_ref[...][:, None]
  return tuple(jnp.minimum(rows, col_ref[_columns(config, k)][None, :]) for k in (0, 1))


def _maxima_kernel(config: MomentConfig, rows: int, b2_ref, grad_ref, codes_ref, row_scale_ref, col_scale_ref,
                   row_max_ref, col_max_ref, nonfinite_ref):
  valid = _row_mask(config, rows)
  b2, one_minus_b2 = b2_ref[0], b2_ref[1]
  grads = _even_odd(config, grad_ref)
  decoded = _unpack(codes_ref, config.second_codebook)
  scales = _rank1_scale(config, row_scale_ref, col_scale_ref)
  moments = [jnp.where(valid, b2 * (d * s) + one_minus_b2 * g * g, 0.0)
             for g, d, s in zip(grads, decoded, scales)]
  row_max_ref[...] = jnp.maximum(moments[0].max(axis=1), moments[1].max(axis=1))[None, :]
  for k in (0, 1):
    col_max_ref[:, _columns(config, k)] = moments[k].max(axis=0)[None, :]
  bad = sum(jnp.where(valid & ~jnp.isfinite(g), 1.0, 0.0).sum() for g in grads)
  nonfinite_ref[...] = jnp.full(nonfinite_ref.shape, bad, jnp.float32)


def _kernel_name(kind: str, config, grad) -> str:
  # Shapes and strides are compiled into a Triton kernel: one name per specialization, so that no two
  # different kernels in a program share a name.
  rows, cols = grad.shape
  return (f"{kind}_{rows}x{cols}_{grad.dtype.name}_{config.second_moment}_{config.rows_per_program}r"
          f"{config.num_warps}w_{config.pairing}{'' if config.table_lookups else '_selects'}")


def _grid(config, rows: int, cols: int):
  return (rows // config.rows_per_program, cols // COLUMNS)


def _rest_tile(config, rows: int):
  """``(whole, pad_rest)``: the compiled grids cover the ``whole`` rows of full row tiles; ``pad_rest(x)`` is
  ``x``'s rows after them, zero-padded to one full tile, which the same compiled kernel then runs on.
  (Compiled by Triton, a masked partial tile stored wrong codes, see :func:`covers`; run through the
  Pallas interpreter instead, the rest became a while loop over its column tiles, whose host round trips
  per iteration stopped the host from running ahead of the device: every step then waited for the host.)
  Zero rows are harmless: rows are independent, and a zero row adds 0 to the rank-1 column maxima."""
  whole = rows - rows % config.rows_per_program

  def pad_rest(x):
    rest = x[whole:]
    return jnp.pad(rest, [(0, config.rows_per_program - rest.shape[0])] + [(0, 0)] * (rest.ndim - 1))
  return whole, pad_rest


def _compiler_params(config, interpret: bool):
  if interpret:
    return None
  from jax.experimental.pallas import triton as pallas_triton
  return pallas_triton.CompilerParams(num_warps=config.num_warps)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def rank1_maxima(b2, grad, codes, row_scale, col_scale, *, config: MomentConfig, interpret: bool = False):
  """Row and column maxima of ``b2·v + (1 − b2)·g²`` (the new second moment, from its rank-1 codes) and
  the number of non-finite entries of ``grad``. ``b2`` is ``[b2, 1 − b2]`` (fp32),
  ``grad`` is ``(rows, cols)``, ``codes`` the packed ``(rows, cols / 2)`` codes, ``row_scale`` /
  ``col_scale`` the old rank-1 scales."""
  rows, cols = grad.shape
  grid = _grid(config, rows, cols)
  tile_rows = config.rows_per_program
  row_max, col_max, nonfinite = pl.pallas_call(
      functools.partial(_maxima_kernel, config, rows),
      grid=grid,
      in_specs=[pl.BlockSpec((2,), lambda i, j: (0,)),
                pl.BlockSpec((tile_rows, COLUMNS), lambda i, j: (i, j)),
                pl.BlockSpec((tile_rows, HALF), lambda i, j: (i, j)),
                pl.BlockSpec((tile_rows,), lambda i, j: (i,)),
                pl.BlockSpec((COLUMNS,), lambda i, j: (j,))],
      out_specs=[pl.BlockSpec((1, tile_rows), lambda i, j: (j, i)),
                 pl.BlockSpec((1, COLUMNS), lambda i, j: (i, j)),
                 pl.BlockSpec((1, 1), lambda i, j: (i, j))],
      out_shape=[jax.ShapeDtypeStruct((grid[1], rows), jnp.float32),
                 jax.ShapeDtypeStruct((grid[0], cols), jnp.float32),
                 jax.ShapeDtypeStruct(grid, jnp.float32)],
      interpret=interpret,
      compiler_params=_compiler_params(config, interpret),
      name=_kernel_name("adam4bit_rank1_maxima", config, grad),
  )(b2, grad, codes, row_scale, col_scale)
  row_max, col_max, nonfinite = row_max.max(axis=0), col_max.max(axis=0), nonfinite.sum()
  whole, pad_rest = _rest_tile(config, rows)
  if whole < rows:  # the rows past the grid's tiles (their row maxima above are unwritten)
    rest = rank1_maxima(b2, pad_rest(grad), pad_rest(codes), pad_rest(row_scale), col_scale, config=config,
                        interpret=interpret)
    row_max = row_max.at[whole:].set(rest[0][:rows - whole])
    col_max, nonfinite = jnp.maximum(col_max, rest[1]), nonfinite + rest[2]
  return row_max, col_max, nonfinite


def _pack(codes_even, codes_odd):
  return codes_even | (codes_odd << 4)


def _encode_block(values, codebook: str, midpoint_lookup=None):
  """Block absmax over the tile's columns (one block per row) and the codes of both halves."""
  scale = jnp.maximum(jnp.abs(values[0]).max(axis=1), jnp.abs(values[1]).max(axis=1))[:, None]
  codes = [quantization._encode_scaled(x, scale, codebook, 4, midpoint_lookup) for x in values]
  return scale, _pack(*codes)


def _update_kernel(config: MomentConfig, rows: int, apply: bool, flags_ref, tables_ref, grad_ref,
                   first_codes_ref, first_scale_ref, second_codes_ref, *refs):
  if config.second_moment == "rank1":
    row_old_ref, col_old_ref, row_new_ref, col_new_ref, *refs = refs
    old_scales = _rank1_scale(config, row_old_ref, col_old_ref)
  else:
    second_scale_ref, *refs = refs
    old_scales = (second_scale_ref[...],) * 2
  params_ref, *refs = refs if apply else (None, *refs)
  out_ref, first_codes_out, first_scale_out, second_codes_out, *second_scale_out = refs
  first_value, first_midpoint = _table_lookups(tables_ref, 0) if config.table_lookups else (None, None)
  second_value, second_midpoint = _table_lookups(tables_ref, 1) if config.table_lookups else (None, None)
  valid = _row_mask(config, rows)
  grads = [jnp.where(valid, g, 0.0) for g in _even_odd(config, grad_ref)]
  first_old = _unpack(first_codes_ref, config.first_codebook, first_value)
  second_old = _unpack(second_codes_ref, config.second_codebook, second_value)
  first_scale = first_scale_ref[...]
  # same operation order as the XLA path, so both agree to the rounding of fused multiply-adds
  correction1, correction2, b1, one_minus_b1, b2, one_minus_b2, eps, eps_root = (flags_ref[k] for k in range(8))
  finite = flags_ref[8] > 0  # a non-finite step keeps the old codes and scales (and params)
  first = [b1 * (m * first_scale) + one_minus_b1 * g for m, g in zip(first_old, grads)]
  second = [b2 * (v * s) + one_minus_b2 * g * g for v, s, g in zip(second_old, old_scales, grads)]
  updates = [(m / correction1) / (jnp.sqrt(v / correction2 + eps_root) + eps)
             for m, v in zip(first, second)]
  if apply:  # optax.add_decayed_weights, scale_by_learning_rate and apply_updates, in their order
    step_size, weight_decay = flags_ref[9], flags_ref[10]
    params = _even_odd(config, params_ref)
    updates = [jnp.where(finite, p + step_size * (u + weight_decay * p), p) for u, p in zip(updates, params)]
  for k in (0, 1):
    out_ref[:, _columns(config, k)] = updates[k].astype(out_ref.dtype)
  keep = lambda new, old_ref: jnp.where(finite, new, old_ref[...])
  scale, codes = _encode_block(first, config.first_codebook, first_midpoint)
  first_scale_out[...] = keep(scale, first_scale_ref)
  first_codes_out[...] = keep(codes, first_codes_ref)
  if config.second_moment == "rank1":
    new_scales = _rank1_scale(config, row_new_ref, col_new_ref)
    codes = [quantization._encode_scaled(v, s, config.second_codebook, 4, second_midpoint)
             for v, s in zip(second, new_scales)]
    second_codes_out[...] = keep(_pack(*codes), second_codes_ref)
  else:
    scale, codes = _encode_block(second, config.second_codebook, second_midpoint)
    second_scale_out[0][...] = keep(scale, second_scale_ref)
    second_codes_out[...] = keep(codes, second_codes_ref)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "row_offset"))
def fused_update(flags, grad, first_codes, first_scale, second_codes, second_scales, new_second_scales,
                 params=None, *, config: MomentConfig, interpret: bool = False, row_offset: int = 0):
  """One Adam step of a ``(rows, cols)`` tensor with 4-bit moments.

  Args:
    flags: ``[1 − b1^t, 1 − b2^t, b1, 1 − b1, b2, 1 − b2, eps, eps_root, finite, step_size, weight_decay,
      0 …]`` (16 fp32): Adam's bias corrections and constants; 0 in ``finite`` keeps the old codes and
      scales (a non-finite step; the update is still computed) and the params; ``step_size`` (−learning
      rate) and ``weight_decay`` are read only with ``params``.
    grad: the gradient, ``(rows, cols)``, any float dtype (the update has this dtype).
    first_codes, first_scale: packed first-moment codes ``(rows, cols / 2)`` and block scales
      ``(rows, cols / 128)``.
    second_codes, second_scales: packed second-moment codes and its scales: ``(row, col)`` maxima for
      rank-1, or the ``(rows, cols / 128)`` block scales.
    new_second_scales: rank-1 only: the new maxima from :func:`rank1_maxima` (``None`` for blocks).
    params: ``(rows, cols)``, any float dtype, or ``None``. Given, the kernel also applies the update —
      ``params + step_size · (update + weight_decay · params)``, as ``optax.add_decayed_weights``,
      ``optax.scale_by_learning_rate`` and ``optax.apply_updates`` would — and returns the new params
      (written over ``params``, so a donated buffer is updated in place) instead of the update.
    row_offset: blocks only: the codes and block scales are rows ``row_offset …`` of larger buffers (a
      multiple of the row tile; the packed state of :func:`~optax_shampoo4.adam.adam_4bit_functions`), which
      are returned whole with only this tensor's rows rewritten. Rows up to the next whole tile past the
      tensor's belong to it (padding).

  Returns:
    ``(update or new params, first_codes, first_scale, second_codes, second_scales)``.
  """
  rows, cols = grad.shape
  grid = _grid(config, rows, cols)
  spec = pl.BlockSpec
  tile_rows = config.rows_per_program
  if row_offset % tile_rows or (row_offset and config.second_moment != "block"):
    raise ValueError(f"row_offset must be a multiple of {tile_rows}, with block scales; got {row_offset}")
  first_tile = row_offset // tile_rows
  tile = spec((tile_rows, COLUMNS), lambda i, j: (i, j))
  packed = spec((tile_rows, HALF), lambda i, j: (first_tile + i, j))
  block_scale = spec((tile_rows, 1), lambda i, j: (first_tile + i, j))
  row_vector = spec((tile_rows,), lambda i, j: (i,))
  col_vector = spec((COLUMNS,), lambda i, j: (j,))
  tables = jnp.asarray(lookup_tables(config))
  whole = lambda size: spec((size,), lambda i, j: (0,))
  in_specs = [whole(16), whole(tables.shape[0]), tile, packed, block_scale, packed]
  out_specs = [tile, packed, block_scale, packed]
  out = grad if params is None else params
  out_shape = [jax.ShapeDtypeStruct(out.shape, out.dtype), jax.ShapeDtypeStruct(first_codes.shape, jnp.uint8),
               jax.ShapeDtypeStruct(first_scale.shape, jnp.float32),
               jax.ShapeDtypeStruct(second_codes.shape, jnp.uint8)]
  if config.second_moment == "rank1":
    in_specs += [row_vector, col_vector, row_vector, col_vector]
    operands = (*second_scales, *new_second_scales)
  else:
    in_specs += [block_scale]
    out_specs += [block_scale]
    out_shape += [jax.ShapeDtypeStruct(second_scales[0].shape, jnp.float32)]
    operands = tuple(second_scales)
  # Codes, block scales and params are rewritten in place: every program reads its tile before writing it,
  # and the step's donated buffers need no copies.
  aliases = {3: 1, 4: 2, 5: 3, **({6: 4} if config.second_moment == "block" else {})}
  if params is not None:
    in_specs.append(tile)
    operands += (params,)
    aliases[6 + len(operands) - 1] = 0
  outputs = pl.pallas_call(
      functools.partial(_update_kernel, config, rows, params is not None),
      grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, input_output_aliases=aliases,
      interpret=interpret, compiler_params=_compiler_params(config, interpret),
      name=_kernel_name("adam4bit_apply" if params is not None else "adam4bit_update", config, grad),
  )(flags, tables, grad, first_codes, first_scale, second_codes, *operands)
  whole, pad_rest = _rest_tile(config, rows)
  if whole < rows and first_codes.shape[0] >= row_offset + whole + tile_rows:
    # the rest tile's codes and scales are rows of the buffers (padding past the tensor's): no copies
    rest = fused_update(flags, pad_rest(grad), *outputs[1:4], tuple(outputs[4:]), None,
                        None if params is None else pad_rest(params), config=config, interpret=interpret,
                        row_offset=row_offset + whole)
    outputs = [outputs[0].at[whole:].set(rest[0][:rows - whole]), *rest[1:4], *rest[4]]
  elif whole < rows:  # the rows past the grid's tiles, written over the kernel's outputs
    rank1 = config.second_moment == "rank1"
    rest_scales = lambda scales: None if scales is None else (pad_rest(scales[0]), *scales[1:]) if rank1 else (
        tuple(pad_rest(x) for x in scales))
    rest = fused_update(flags, pad_rest(grad), pad_rest(first_codes), pad_rest(first_scale), pad_rest(second_codes),
                        rest_scales(second_scales), rest_scales(new_second_scales),
                        None if params is None else pad_rest(params), config=config, interpret=interpret)
    outputs = [x.at[whole:].set(r[:rows - whole]) for x, r in zip(outputs, rest[:4] + (rest[4] if not rank1 else ()))]
  out, first_codes, first_scale, second_codes = outputs[:4]
  second_scales = tuple(outputs[4:]) if config.second_moment == "block" else tuple(new_second_scales)
  return out, first_codes, first_scale, second_codes, second_scales
