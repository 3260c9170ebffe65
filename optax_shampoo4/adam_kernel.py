"""Fused GPU kernels (Pallas / Triton) for the step of
:func:`~optax_shampoo4.scale_by_adam_4bit`.

XLA compiles the 4-bit Adam step of a tensor into several passes, each
re-reading the gradient and the codes and materializing fp32 moments between
them (measured 2.3× ``optax.adamw``'s step on GPU). These kernels do the step in
two passes over the tensor, viewed as a ``(rows, cols)`` matrix with ``cols`` a
multiple of 128 (one first-moment block per 128 columns of a row):

1. :func:`rank1_maxima` (rank-1 second moment only): the new second moment's row
   and column maxima — the rank-1 scales it is quantized with depend on every
   element — and the number of non-finite gradients.
2. :func:`~optax_shampoo4.adam_update_kernel.fused_update`: new moments in fp32,
   the update from them, the new block scales, and both moments re-encoded and
   nibble-packed — reading the gradient and the old codes once and writing the
   new codes and the update once; or, given the params
   (``optax_shampoo4.fused_step``), applying the update too and writing the new
   params instead of the update.

The stored state has the XLA path's format (fp32 scales; codes paired as
contiguous halves of each 128 columns,
``codebooks.pack_nibbles(pairing="halves")``), so a state written by one path
is read by the other. The two halves of a tile (low and high nibbles) are read
and written as two contiguous slices, so nothing is interleaved in registers;
the ``"interleaved"`` pairing (columns 2j, 2j+1: stride-2 accesses) was slower
(``benchmarks/adam_kernel.py``).

Opt-in (``scale_by_adam_4bit(implementation="pallas")``). On an H100
(``benchmarks/adam_step.py``, GPT-2 medium shapes, 3 steps) the Triton-compiled
kernels store exactly the XLA path's codes and scales and their updates differ
by 3e-7 relative (fused multiply-adds); the rows after a tensor's last whole row
tile run as one zero-padded tile (see :func:`covers`). Under GSPMD a kernel is
not partitioned, so FSDP-sharded moments would be
gathered: keep ``"xla"`` there. Off GPU the kernels run in the Pallas
  interpreter (tests).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from optax_shampoo4 import codes as codebooks

# Run the kernels through the Pallas interpreter even on GPU (diagnostics: tells
# a Triton miscompile from a kernel bug). Read when a step is traced.
FORCE_INTERPRET = False
# columns per program: one first-moment block of every row in the tile
COLUMNS = 128
HALF = COLUMNS // 2


class MomentConfig(NamedTuple):
  """Static description of one fused step (hashable: it parametrizes the
  kernels). Adam's constants are operands, so ``optax.inject_hyperparams`` can
  trace them."""

  first_codebook: str
  second_codebook: str
  second_moment: str  # "rank1" | "block"
  # 8 × 128 elements per program, 4 warps, contiguous halves: fastest measured
  # on an H100 (device time of the apply kernel,
  # benchmarks/results/adam_kernel_block_apply.json)
  rows_per_program: int = 8
  num_warps: int = 4
  # which two columns share a byte: "halves" (j, j+64) or "interleaved" (2j,
  # 2j+1)
  pairing: str = "halves"
  # decode / encode uneven codebooks by table loads (False: chains of selects)
  table_lookups: bool = True


def covers(shape: Tuple[int, ...],
           config: MomentConfig) -> Optional[Tuple[int, int]]:
  """The ``(rows, cols)`` view the kernels use for a tensor of this shape, or
  ``None`` if they do not apply: rank-1 scales need a matrix (rank 2) with a
  multiple of 128 columns; block scales only need the element count to be a
  multiple of 128, and the view is ``(size / 128, 128)`` — one block per row, so
  a row tile is 8 consecutive blocks (contiguous in memory) and a tensor's codes
  and scales are whole rows of a larger buffer (the packed state,
  ``fused_update(row_offset=...)``). The view needs one whole row tile. Compiled
  grids cover whole row tiles only: compiled by Triton on an H100, a masked
  ragged last tile (the 50257-row embedding) stored about 1e-4 of its tensor's
  codes differently from the XLA path, up to 15 code steps apart, while tensors
  without one agreed (``benchmarks/adam_step.py``); the rows after the last
  whole tile run as one zero-padded tile (:func:`rest_tile`)."""
  size = 1
  for d in shape:
    size *= d
  view = None
  if config.second_moment == "rank1" and len(
      shape) == 2 and shape[1] % COLUMNS == 0:
    view = tuple(shape)
  elif config.second_moment == "block" and size % COLUMNS == 0 and size > 0:
    view = (size // COLUMNS, COLUMNS)
  if view is None or view[0] < config.rows_per_program:
    return None
  return view


def row_mask(config, rows: int):
  index = pl.program_id(0) * config.rows_per_program + jnp.arange(
      config.rows_per_program)
  return (index < rows)[:, None]


def columns(config, k):
  """The columns of a 128-column tile whose codes sit in the low (k = 0) or high
  (k = 1) nibbles."""
  return pl.ds(k, HALF, stride=2) if config.pairing == "interleaved" else pl.ds(
      k * HALF, HALF)


def even_odd(config, ref):
  return tuple(ref[:, columns(config, k)].astype(jnp.float32) for k in (0, 1))


def unpack_codes(codes_ref, codebook: str, value_lookup=None):
  codes = codes_ref[...]
  return tuple(
      codebooks.decode(c, codebook, 4, value_lookup)
      for c in (codes & 0xF, codes >> 4))


def lookup_tables(config: MomentConfig) -> np.ndarray:
  """The update kernel's tables (fp32, 16 entries each): the values of the first
  and second moments' codebooks, then their decision midpoints. A codebook that
  is not evenly spaced (the first moment's dynamic tree) is decoded and encoded
  by loads from these (one per element and search level) instead of chains of
  selects: the selects made the kernel ALU-bound."""
  names = (config.first_codebook, config.second_codebook)
  values = [codebooks.codebook(name, 4) for name in names]
  midpoints = [
      np.append(codebooks.decision_boundaries(name, 4), np.float32(0))
      for name in names
  ]
  return np.concatenate(values + midpoints).astype(np.float32)


def table_lookups(tables_ref, moment: int):
  """``(value_lookup, midpoint_lookup)`` of moment 0 (first) or 1 (second) in
  :func:`lookup_tables`."""
  value = lambda codes: tables_ref[codes.astype(jnp.int32) + 16 * moment]
  midpoint = lambda index: tables_ref[index + 16 * (2 + moment)]
  return value, midpoint


def rank1_scale(config, row_ref, col_ref):
  rows = row_ref[...][:, None]
  return tuple(
      jnp.minimum(rows, col_ref[columns(config, k)][None, :]) for k in (0, 1))


def _maxima_kernel(config: MomentConfig, rows: int, b2_ref, grad_ref, codes_ref,
                   row_scale_ref, col_scale_ref, row_max_ref, col_max_ref,
                   nonfinite_ref):
  valid = row_mask(config, rows)
  b2, one_minus_b2 = b2_ref[0], b2_ref[1]
  grads = even_odd(config, grad_ref)
  decoded = unpack_codes(codes_ref, config.second_codebook)
  scales = rank1_scale(config, row_scale_ref, col_scale_ref)
  moments = [
      jnp.where(valid,
                b2 * (d * s) + one_minus_b2 * g * g, 0.0)
      for g, d, s in zip(grads, decoded, scales)
  ]
  row_max_ref[...] = jnp.maximum(moments[0].max(axis=1),
                                 moments[1].max(axis=1))[None, :]
  for k in (0, 1):
    col_max_ref[:, columns(config, k)] = moments[k].max(axis=0)[None, :]
  bad = sum(jnp.where(valid & ~jnp.isfinite(g), 1.0, 0.0).sum() for g in grads)
  nonfinite_ref[...] = jnp.full(nonfinite_ref.shape, bad, jnp.float32)


def kernel_name(kind: str, config, grad) -> str:
  # Shapes and strides are compiled into a Triton kernel: one name per
  # specialization, so that no two different kernels in a program share a name.
  rows, cols = grad.shape
  return (f"{kind}_{rows}x{cols}_{grad.dtype.name}_{config.second_moment}_"
          f"{config.rows_per_program}r{config.num_warps}w_{config.pairing}"
          f"{'' if config.table_lookups else '_selects'}")


def tile_grid(config, rows: int, cols: int):
  return (rows // config.rows_per_program, cols // COLUMNS)


def rest_tile(config, rows: int):
  """``(whole, pad_rest)``: the compiled grids cover the ``whole`` rows of full
  row tiles; ``pad_rest(x)`` is ``x``'s rows after them, zero-padded to one full
  tile, which the same compiled kernel then runs on. (Compiled by Triton, a
  masked partial tile stored wrong codes, see :func:`covers`; run through the
  Pallas interpreter instead, the rest became a while loop over its column
  tiles, whose host round trips per iteration stopped the host from running
  ahead of the device: every step then waited for the host.) Zero rows are
  harmless: rows are independent, and a zero row adds 0 to the rank-1 column
    maxima."""
  whole = rows - rows % config.rows_per_program

  def pad_rest(x):
    rest = x[whole:]
    return jnp.pad(rest, [(0, config.rows_per_program - rest.shape[0])] +
                   [(0, 0)] * (rest.ndim - 1))

  return whole, pad_rest


def compiler_params(config, interpret: bool):
  if interpret:
    return None
  from jax.experimental.pallas import triton as pallas_triton
  return pallas_triton.CompilerParams(num_warps=config.num_warps)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def rank1_maxima(b2, grad, codes, row_scale, col_scale, *, config: MomentConfig,
                 interpret: bool = False):
  """Row and column maxima of ``b2·v + (1 − b2)·g²`` (the new second moment,
  from its rank-1 codes) and the number of non-finite entries of ``grad``.
  ``b2`` is ``[b2, 1 − b2]`` (fp32), ``grad`` is ``(rows, cols)``, ``codes`` the
  packed ``(rows, cols / 2)`` codes, ``row_scale`` / ``col_scale`` the old
  rank-1 scales."""
  rows, cols = grad.shape
  grid = tile_grid(config, rows, cols)
  tile_rows = config.rows_per_program
  row_max, col_max, nonfinite = pl.pallas_call(
      functools.partial(_maxima_kernel, config, rows),
      grid=grid,
      in_specs=[
          pl.BlockSpec((2,), lambda i, j: (0,)),
          pl.BlockSpec((tile_rows, COLUMNS), lambda i, j: (i, j)),
          pl.BlockSpec((tile_rows, HALF), lambda i, j: (i, j)),
          pl.BlockSpec((tile_rows,), lambda i, j: (i,)),
          pl.BlockSpec((COLUMNS,), lambda i, j: (j,))
      ],
      out_specs=[
          pl.BlockSpec((1, tile_rows), lambda i, j: (j, i)),
          pl.BlockSpec((1, COLUMNS), lambda i, j: (i, j)),
          pl.BlockSpec((1, 1), lambda i, j: (i, j))
      ],
      out_shape=[
          jax.ShapeDtypeStruct((grid[1], rows), jnp.float32),
          jax.ShapeDtypeStruct((grid[0], cols), jnp.float32),
          jax.ShapeDtypeStruct(grid, jnp.float32)
      ],
      interpret=interpret,
      compiler_params=compiler_params(config, interpret),
      name=kernel_name("adam4bit_rank1_maxima", config, grad),
  )(b2, grad, codes, row_scale, col_scale)
  row_max, col_max, nonfinite = row_max.max(axis=0), col_max.max(
      axis=0), nonfinite.sum()
  whole, pad_rest = rest_tile(config, rows)
  # the rows past the grid's tiles (their row maxima above are unwritten)
  if whole < rows:
    rest = rank1_maxima(b2, pad_rest(grad), pad_rest(codes),
                        pad_rest(row_scale), col_scale, config=config,
                        interpret=interpret)
    row_max = row_max.at[whole:].set(rest[0][:rows - whole])
    col_max, nonfinite = jnp.maximum(col_max, rest[1]), nonfinite + rest[2]
  return row_max, col_max, nonfinite
