"""Fused GPU kernels (Pallas / Triton) for the step of :func:`~optax_shampoo4.scale_by_adam_4bit`.

XLA compiles the 4-bit Adam step of a tensor into several passes, each re-reading the gradient and the
codes and materializing fp32 moments between them (measured 2.3× ``optax.adamw``'s step on GPU). These
kernels do the step in two passes over the tensor, viewed as a ``(rows, cols)`` matrix with ``cols`` a
multiple of 128 (one first-moment block per 128 columns of a row):

1. :func:`rank1_maxima` (rank-1 second moment only): the new second moment's row and column maxima — the
   rank-1 scales it is quantized with depend on every element — and the number of non-finite gradients.
2. :func:`fused_update`: new moments in fp32, the update from them, the new block scales, and both
   moments re-encoded and nibble-packed — reading the gradient and the old codes once and writing the new
   codes and the update once.

The stored state has the XLA path's format (interleaved nibbles, fp32 scales), so a state written by one
path is read by the other. Even and odd columns (low and high nibbles) are read and written with strided
accesses, so nothing is interleaved in registers.

Opt-in (``scale_by_adam_4bit(implementation="pallas")``). On an H100 (``benchmarks/adam_step.py``, GPT-2
medium shapes, 3 steps) the Triton-compiled kernels store exactly the XLA path's codes and scales and their
updates differ by 3e-7 relative (fused multiply-adds); tensors whose rows leave a partial row tile are
left to XLA (see :func:`covers`). Under GSPMD a kernel is not partitioned, so FSDP-sharded moments would be
gathered: keep ``"xla"`` there. Off GPU the kernels run in the Pallas interpreter (tests).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
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
  rows_per_program: int = 16  # 16 × 128 elements per program, 8 warps: fastest measured on H100
  num_warps: int = 8
  pairing: str = "interleaved"  # which two columns share a byte: (2j, 2j+1), or "halves" (j, j+64)


def covers(shape: Tuple[int, ...], config: MomentConfig) -> Optional[Tuple[int, int]]:
  """The ``(rows, cols)`` view the kernels use for a tensor of this shape, or ``None`` if they do not
  apply: rank-1 scales need a matrix (rank 2) with a multiple of 128 columns; block scales only need the
  element count to be a multiple of 128 (blocks never straddle rows of the view). The view's rows must
  fill whole row tiles: compiled by Triton on an H100, tensors with a ragged last tile (the 50257-row
  embedding) stored about 1e-4 of their codes differently from the XLA path, up to 15 code steps apart —
  not a rounding difference — while tensors without one agreed (``benchmarks/adam_step.py``)."""
  size = 1
  for d in shape:
    size *= d
  view = None
  if config.second_moment == "rank1" and len(shape) == 2 and shape[1] % COLUMNS == 0:
    view = tuple(shape)
  elif config.second_moment == "block" and size % COLUMNS == 0 and size > 0:
    cols = shape[-1] if len(shape) >= 2 and shape[-1] % COLUMNS == 0 else COLUMNS
    view = (size // cols, cols)
  if view is None or view[0] % config.rows_per_program:
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


def _unpack(codes_ref, codebook: str):
  codes = codes_ref[...]
  return (quantization._decode(codes & 0xF, codebook, 4), quantization._decode(codes >> 4, codebook, 4))


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
          f"{config.num_warps}w_{config.pairing}")


def _grid(config, rows: int, cols: int):
  return (pl.cdiv(rows, config.rows_per_program), cols // COLUMNS)


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
  return row_max.max(axis=0), col_max.max(axis=0), nonfinite.sum()


def _pack(codes_even, codes_odd):
  return codes_even | (codes_odd << 4)


def _encode_block(values, codebook: str):
  """Block absmax over the tile's columns (one block per row) and the codes of both halves."""
  scale = jnp.maximum(jnp.abs(values[0]).max(axis=1), jnp.abs(values[1]).max(axis=1))[:, None]
  codes = [quantization._encode_scaled(x, scale, codebook, 4) for x in values]
  return scale, _pack(*codes)


def _update_kernel(config: MomentConfig, rows: int, flags_ref, grad_ref, first_codes_ref,
                   first_scale_ref, second_codes_ref, *refs):
  if config.second_moment == "rank1":
    (row_old_ref, col_old_ref, row_new_ref, col_new_ref,
     update_ref, first_codes_out, first_scale_out, second_codes_out) = refs
    old_scales = _rank1_scale(config, row_old_ref, col_old_ref)
  else:
    second_scale_ref, update_ref, first_codes_out, first_scale_out, second_codes_out, second_scale_out = refs
    old_scales = (second_scale_ref[...],) * 2
  valid = _row_mask(config, rows)
  grads = [jnp.where(valid, g, 0.0) for g in _even_odd(config, grad_ref)]
  first_old = _unpack(first_codes_ref, config.first_codebook)
  second_old = _unpack(second_codes_ref, config.second_codebook)
  first_scale = first_scale_ref[...]
  # same operation order as the XLA path, so both agree to the rounding of fused multiply-adds
  correction1, correction2, b1, one_minus_b1, b2, one_minus_b2, eps, eps_root = (flags_ref[k] for k in range(8))
  finite = flags_ref[8] > 0  # a non-finite step keeps the old codes and scales
  first = [b1 * (m * first_scale) + one_minus_b1 * g for m, g in zip(first_old, grads)]
  second = [b2 * (v * s) + one_minus_b2 * g * g for v, s, g in zip(second_old, old_scales, grads)]
  updates = [(m / correction1) / (jnp.sqrt(v / correction2 + eps_root) + eps)
             for m, v in zip(first, second)]
  for k in (0, 1):
    update_ref[:, _columns(config, k)] = updates[k].astype(update_ref.dtype)
  keep = lambda new, old_ref: jnp.where(finite, new, old_ref[...])
  scale, codes = _encode_block(first, config.first_codebook)
  first_scale_out[...] = keep(scale, first_scale_ref)
  first_codes_out[...] = keep(codes, first_codes_ref)
  if config.second_moment == "rank1":
    new_scales = _rank1_scale(config, row_new_ref, col_new_ref)
    codes = [quantization._encode_scaled(v, s, config.second_codebook, 4) for v, s in zip(second, new_scales)]
    second_codes_out[...] = keep(_pack(*codes), second_codes_ref)
  else:
    scale, codes = _encode_block(second, config.second_codebook)
    second_scale_out[...] = keep(scale, second_scale_ref)
    second_codes_out[...] = keep(codes, second_codes_ref)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def fused_update(flags, grad, first_codes, first_scale, second_codes, second_scales, new_second_scales,
                 *, config: MomentConfig, interpret: bool = False):
  """One Adam step of a ``(rows, cols)`` tensor with 4-bit moments.

  Args:
    flags: ``[1 − b1^t, 1 − b2^t, b1, 1 − b1, b2, 1 − b2, eps, eps_root, finite, 0 …]`` (16 fp32): Adam's
      bias corrections and constants, and 0 in ``finite`` to keep the old codes and scales (a non-finite
      step; the update is still computed).
    grad: the gradient, ``(rows, cols)``, any float dtype (the update has this dtype).
    first_codes, first_scale: packed first-moment codes ``(rows, cols / 2)`` and block scales
      ``(rows, cols / 128)``.
    second_codes, second_scales: packed second-moment codes and its scales: ``(row, col)`` maxima for
      rank-1, or the ``(rows, cols / 128)`` block scales.
    new_second_scales: rank-1 only: the new maxima from :func:`rank1_maxima` (``None`` for blocks).

  Returns:
    ``(update, first_codes, first_scale, second_codes, second_scales)``.
  """
  rows, cols = grad.shape
  grid = _grid(config, rows, cols)
  tile_rows = config.rows_per_program
  tile = pl.BlockSpec((tile_rows, COLUMNS), lambda i, j: (i, j))
  packed = pl.BlockSpec((tile_rows, HALF), lambda i, j: (i, j))
  block_scale = pl.BlockSpec((tile_rows, 1), lambda i, j: (i, j))
  row_vector = pl.BlockSpec((tile_rows,), lambda i, j: (i,))
  col_vector = pl.BlockSpec((COLUMNS,), lambda i, j: (j,))
  in_specs = [pl.BlockSpec((16,), lambda i, j: (0,)), tile, packed, block_scale, packed]
  out_specs = [tile, packed, block_scale, packed]
  out_shape = [jax.ShapeDtypeStruct(grad.shape, grad.dtype), jax.ShapeDtypeStruct(first_codes.shape, jnp.uint8),
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
  # Codes and block scales are rewritten in place: every program reads its tile before writing it, and the
  # step's donated state buffers need no copies.
  aliases = {2: 1, 3: 2, 4: 3, **({5: 4} if config.second_moment == "block" else {})}
  outputs = pl.pallas_call(
      functools.partial(_update_kernel, config, rows),
      grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, input_output_aliases=aliases,
      interpret=interpret, compiler_params=_compiler_params(config, interpret),
      name=_kernel_name("adam4bit_update", config, grad),
  )(flags, grad, first_codes, first_scale, second_codes, *operands)
  update, first_codes, first_scale, second_codes = outputs[:4]
  second_scales = tuple(outputs[4:]) if config.second_moment == "block" else tuple(new_second_scales)
  return update, first_codes, first_scale, second_codes, second_scales
