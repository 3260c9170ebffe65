"""Tile configurations of the fused 4-bit Adam kernels: time per tensor and
agreement with the XLA path.

Run: ``PYTHONPATH=. python benchmarks/adam_kernel.py`` (GPU). For each shape and
each configuration (rows per program, warps, nibble pairing, table loads)
measures the device time of one leaf's kernels — rank-1 maxima + fused update,
or with ``--apply`` the kernel that also applies it — and XLA's step of the same
leaf, from the same state (after three XLA steps, so the codes are not trivial),
and reports the update difference, where it is largest, and the fraction of
differing stored bytes. The "interleaved" pairing (columns 2j and 2j + 1 in one
byte, stride-2 accesses) is timed to measure the cost of strided access; it is
not the stored format ("halves": columns j and j + 64 of each 128).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from optax_shampoo4 import adam, adam_kernel, moments


def leaf_programs(config, shape, second_moment):
  layout = moments.MomentLayout(4, 128, second_moment, 4096)
  b1, b2, eps, eps_root = 0.9, 0.999, 1e-8, 0.0
  constants = jnp.asarray([b1, 1.0 - b1, b2, 1.0 - b2, eps, eps_root],
                          jnp.float32)
  view = adam_kernel.covers(shape, config)

  @jax.jit
  def xla(g, m, v, corrections):
    return adam.xla_leaf_step(layout, b1, b2, eps, eps_root, g, m, v,
                              corrections, jnp.asarray(True))

  @jax.jit
  def fused(g, m, v, corrections, params=None):
    scales, finite = adam.fused_leaf_maxima(config, view, constants, g, v,
                                            interpret=False)
    finite = jnp.all(jnp.isfinite(g)) if finite is None else finite
    apply = None if params is None else (params, -1e-3, 1e-4)
    return adam.fused_leaf_step(config, view, constants, g, m, v, corrections,
                                finite, scales, interpret=False, apply=apply)

  return layout, xla, fused


def kernel_device_ms(fn, *args):
  """Device time of the fused kernels alone (profiler), ms per call: wall-clock
  timing of one leaf's step is dominated by its dispatch."""
  from benchmarks.profile import device_times
  per_op, _ = device_times(fn, *args)
  return sum(
      ns for name, ns in per_op.items() if name.startswith("adam4bit")) / 1e6


def copy_rates(shape=(50304, 1024)):
  """GB/s of a Pallas kernel that only reads a tile and writes it back scaled,
  at several tile shapes: what a kernel with this grid can reach, beside the
  fused kernels' rates."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as pallas_triton
  x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32)
  rows = []
  for tile_rows, tile_cols, warps, strided in ((16, 128, 8, False), (16, 128, 8,
                                                                     True),
                                               (32, 128, 8, False), (64, 128, 8,
                                                                     False),
                                               (16, 512, 8, False), (32, 512,
                                                                     16, False),
                                               (8, 1024, 8, False)):

    def kernel(x_ref, o_ref):
      # even and odd columns separately, as the fused kernels read them
      if strided:
        for k in (0, 1):
          o_ref[:,
                pl.ds(k, tile_cols // 2, stride=2
                     )] = 2.0 * x_ref[:, pl.ds(k, tile_cols // 2, stride=2)]
      else:
        o_ref[...] = 2.0 * x_ref[...]

    spec = pl.BlockSpec((tile_rows, tile_cols), lambda i, j: (i, j))
    fn = jax.jit(
        pl.pallas_call(
            kernel, grid=(shape[0] // tile_rows, shape[1] // tile_cols),
            in_specs=[spec], out_specs=spec,
            out_shape=jax.ShapeDtypeStruct(shape, jnp.float32),
            compiler_params=pallas_triton.CompilerParams(num_warps=warps)))
    seconds = common.time_call(fn, x)
    rows.append([
        f"{tile_rows}x{tile_cols}", warps, strided, seconds * 1e3,
        8 * x.size / seconds / 1e9
    ])
  xla_seconds = common.time_call(jax.jit(lambda a: 2.0 * a), x)
  rows.append(
      ["XLA", "-", False, xla_seconds * 1e3, 8 * x.size / xla_seconds / 1e9])
  return rows


def parse_args(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--second-moment", default="rank1")
  parser.add_argument("--copy-rates", action="store_true",
                      help="also time a copy kernel at several tiles")
  parser.add_argument("--shapes", default="50304x1024,1024x4096,4096x1024")
  parser.add_argument(
      "--configs", default="8:4,8:4:interleaved,8:4:selects,16:8,32:8",
      help="rows:warps[:interleaved][:selects] (selects: no table lookups)")
  parser.add_argument("--apply", action="store_true",
                      help="time the kernels that also apply the update")
  return parser.parse_args(argv)


def kernel_configs(text: str):
  """``(rows per program, warps, pairing, table lookups)`` of each
  ``rows:warps[:interleaved][:selects]``."""
  configs = []
  for item in text.split(","):
    fields = item.split(":")
    configs.append(
        (int(fields[0]), int(fields[1]),
         "interleaved" if "interleaved" in fields else "halves", "selects"
         not in fields))
  return configs


def warm_leaf(base, shape, second_moment):
  """``(xla program, inputs)``: the moments after three XLA steps, and a
  fourth step's gradient and bias corrections."""
  g = 1e-2 * jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32)
  layout, xla, _ = leaf_programs(base, shape, second_moment)
  m = layout.store_first(jnp.zeros(shape), shape)
  v = layout.store_second(jnp.zeros(shape), shape)
  for t in range(3):
    corrections = jnp.asarray([1 - 0.9**(t + 1), 1 - 0.999**(t + 1)],
                              jnp.float32)
    _, m, v = xla(g * (1 + t), m, v, corrections)
  corrections = jnp.asarray([1 - 0.9**4, 1 - 0.999**4], jnp.float32)
  g = g * jax.random.uniform(
      jax.random.PRNGKey(1), shape, minval=0.5, maxval=2.0)
  return xla, (g, m, v, corrections)


def compare(result, reference, same_format: bool):
  """``(max |Δ update| / max |update|, worst index, fraction of differing
  state bytes or "-")`` of a kernel's step against the XLA path's."""
  difference = np.abs(np.asarray(result[0]) - np.asarray(reference[0]))
  worst = np.unravel_index(np.argmax(difference), difference.shape)
  scale = float(np.max(np.abs(np.asarray(reference[0]))))
  fraction = "-"
  # the stored format: its codes compare with the XLA path's
  if same_format:
    states = zip(jax.tree.leaves(result[1:]), jax.tree.leaves(reference[1:]))
    differing = sum(
        int(np.sum(np.asarray(a) != np.asarray(b))) for a, b in states)
    fraction = differing / sum(a.size for a in jax.tree.leaves(reference[1:]))
  return (float(difference.max()) / scale, str(tuple(int(i) for i in worst)),
          fraction)


def shape_rows(shape, configs, args):
  """One row per kernel configuration on a leaf of ``shape``."""
  base = adam_kernel.MomentConfig("dynamic_tree", "linear_nozero",
                                  args.second_moment)
  xla, inputs = warm_leaf(base, shape, args.second_moment)
  reference = xla(*inputs)
  xla_ms = common.time_call(xla, *inputs) * 1e3
  size = inputs[0].size
  # read g, write update, read + write the 4-bit codes of two moments; with
  # apply, params read and written instead of the update written
  nbytes = size * (4 + 4 + 2) + (8 * size if args.apply else 0)
  params = jnp.ones(shape, jnp.float32) if args.apply else None
  rows = []
  for rows_per_program, warps, pairing, lookups in configs:
    config = base._replace(rows_per_program=rows_per_program, num_warps=warps,
                           pairing=pairing, table_lookups=lookups)
    label = pairing + ("" if lookups else ", selects")
    _, _, fused = leaf_programs(config, shape, args.second_moment)
    try:
      result = fused(*inputs)
      ms = kernel_device_ms(fused, *inputs, params)
    except Exception as e:  # a configuration Triton rejects
      rows.append([
          str(shape), rows_per_program, warps, label, "failed",
          str(e)[:80], "-", "-", "-", "-"
      ])
      continue
    rows.append([
        str(shape), rows_per_program, warps, label, ms, xla_ms,
        nbytes / ms / 1e9,
        *compare(result, reference, config.pairing == base.pairing)
    ])
    print(rows[-1], flush=True)
  return rows


def main(argv=None):
  args = parse_args(argv)
  tables = []
  if args.copy_rates:
    tables.append(
        common.print_table(
            f"Pallas copy kernel (read + scaled write), (50304, 1024) fp32, "
            f"{common.machine()}",
            ["tile", "warps", "strided halves", "ms", "GB/s"], copy_rates()))
  # vocabulary padded to a multiple of 128 rows
  shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
  configs = kernel_configs(args.configs)
  rows = [row for shape in shapes for row in shape_rows(shape, configs, args)]
  table = common.print_table(
      f"Fused 4-bit Adam leaf step ({args.second_moment}) vs XLA, "
      f"{common.machine()}", [
          "shape", "rows/program", "warps", "pairing", "kernel device ms",
          "XLA wall ms", "kernel TB/s", "max |Δ update| / max |update|",
          "worst at", "differing state bytes"
      ], rows)
  common.write_json(f"adam_kernel_{args.second_moment}", {
      "rows": rows,
      "tables": tables + [table]
  })


if __name__ == "__main__":
  main()
