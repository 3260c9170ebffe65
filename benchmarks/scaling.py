"""Shampoo's preconditioner work on one device and spread over all devices of
the machine (GPT-2 small shapes).

Run: ``PYTHONPATH=. python benchmarks/scaling.py [--bits 4] [--model gpt2_small]
  [--devices 1,2] [--profile]``.

For each device count d, the preconditioner stacks are sharded over a 1-D mesh
of d devices (``shard_blocks=NamedSharding(mesh, P("blocks"))`` +
:func:`optax_shampoo4.sharding.optimizer_state_sharding`;
``--propagation-only``: ``shard_blocks=d``, no constraints inside the updates);
gradients and updates are replicated (data parallelism). Timed, each as its own
jitted program: the plain step, the statistics step and the inverse-root step of
``scale_by_shampoo``. The preconditioner work of a step kind is its time minus
the plain step's; the speed-up is that work on one device over the work on d
devices. Also printed: the preconditioner bytes per device.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from benchmarks import common
from benchmarks.shampoo_step import NEVER
import optax_shampoo4 as o4
from optax_shampoo4 import scale_by_shampoo, state_nbytes
from optax_shampoo4.sharding import optimizer_state_sharding


def time_kinds(shapes, bits, devices, repeats, profile=False, dump_hlo=False,
               propagation_only=False, replicate_roots=False):
  mesh = Mesh(np.array(jax.devices()[:devices]), ("blocks",))
  replicated = NamedSharding(mesh, PartitionSpec())
  shard_blocks = devices if propagation_only else NamedSharding(
      mesh, PartitionSpec("blocks"))
  grads = jax.device_put(common.random_tree(shapes, seed=2), replicated)
  times, per_device_bytes = {}, None
  for kind, (t1, t2) in {
      "plain": (NEVER, NEVER),
      "statistics": (1, NEVER),
      "inverse_root": (NEVER, 1)
  }.items():
    tx = scale_by_shampoo(
        o4.ShampooConfig(bits=bits, shard_blocks=shard_blocks,
                         replicate_roots=replicate_roots), statistics_every=t1,
        inverse_root_every=t2)
    abstract = jax.eval_shape(tx.init, grads)
    state_sharding = optimizer_state_sharding(abstract, mesh, "blocks",
                                              replicate_roots=replicate_roots)
    state = jax.jit(tx.init, out_shardings=state_sharding)(grads)
    update = jax.jit(lambda g, s, tx=tx: tx.update(g, s),
                     out_shardings=(replicated, state_sharding),
                     donate_argnums=1)
    carry = [state]

    def run():
      _, carry[0] = update(grads, carry[0])
      return carry[0]

    times[kind] = common.time_call(run, repeats=repeats)
    if dump_hlo:
      with open(
          common.output_path(f"hlo_scaling_{kind}_{devices}dev.txt"), "w") as f:
        f.write(update.lower(grads, carry[0]).compile().as_text())
    per_device_bytes = state_nbytes(carry[0], per_device=True)
    if profile:  # device time of every kernel, summed over the devices
      from benchmarks.profile import device_times, summarize
      summarize(f"{kind} step on {devices} device(s)", device_times(run)[0], 12)
  return times, per_device_bytes


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--bits", type=int, default=4)
  parser.add_argument("--model", default="gpt2_small")
  parser.add_argument("--devices", default=None,
                      help="comma-separated device counts (default: 1 and all)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--profile", action="store_true",
                      help="also print the slowest kernels of each step kind")
  parser.add_argument("--dump-hlo", action="store_true",
                      help="write each program's optimized HLO")
  parser.add_argument(
      "--replicate-roots", action="store_true",
      help="replicate_roots=True: roots whole on every device, statistics "
          "sharded"
  )
  parser.add_argument(
      "--propagation-only", action="store_true",
      help="shard_blocks=<device count>: no sharding constraints inside the "
          "updates"
  )
  args = parser.parse_args()
  shapes = {
      "gpt2_small": common.gpt2_small_shapes(),
      "vit_s16": common.vit_s16_shapes()
  }[args.model]
  counts = [int(c) for c in args.devices.split(",")
           ] if args.devices else sorted({1, jax.device_count()})
  results, rows = {}, []
  for devices in counts:
    times, per_device = time_kinds(shapes, args.bits, devices, args.repeats,
                                   args.profile, args.dump_hlo,
                                   args.propagation_only, args.replicate_roots)
    work = {k: times[k] - times["plain"]
            for k in ("statistics", "inverse_root")}
    results[devices] = {
        "step_s": times,
        "work_s": work,
        "preconditioner_bytes_per_device": per_device
    }
    rows.append([
        devices, times["plain"] * 1e3, times["statistics"] * 1e3,
        times["inverse_root"] * 1e3, work["statistics"] * 1e3,
        work["inverse_root"] * 1e3, per_device / 2**20
    ])
  base = results[counts[0]]["work_s"]
  for devices in counts:
    results[devices]["speedup"] = {
        k: base[k] / results[devices]["work_s"][k] for k in base
    }
  for row, devices in zip(rows, counts):
    row += [
        results[devices]["speedup"]["statistics"],
        results[devices]["speedup"]["inverse_root"]
    ]
  table = common.print_table(
      f"{args.model}, scale_by_shampoo(o4.ShampooConfig(bits={args.bits})) "
      "sharded over d devices"
      f"{' (propagation only)' if args.propagation_only else ''}"
      f"{', roots replicated' if args.replicate_roots else ''} "
      f"({common.machine()})",
      [
          "d", "plain ms", "statistics step ms", "inverse-root step ms",
          "statistics work ms", "root work ms", "precond. MiB/device",
          "statistics speed-up", "root speed-up"
      ], rows)
  suffix = ("_replicated_roots" if args.replicate_roots else
            "_propagation_only" if args.propagation_only else "")
  common.write_json(f"scaling_{args.model}_{args.bits}bit{suffix}", {
      "results": {
          str(k): v for k, v in results.items()
      },
      "tables": [table]
  })


if __name__ == "__main__":
  main()
