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
from benchmarks.shampoo_step import STEP_KINDS
import optax_shampoo4 as o4
from optax_shampoo4 import scale_by_shampoo, state_nbytes
from optax_shampoo4.sharding import optimizer_state_sharding


def time_kinds(shapes, devices: int, args):
  """``(seconds per step kind, preconditioner bytes per device)`` with the
  stacks spread over ``devices``, as ``args`` (the command line) says."""
  mesh = Mesh(np.array(jax.devices()[:devices]), ("blocks",))
  replicated = NamedSharding(mesh, PartitionSpec())
  shard_blocks = devices if args.propagation_only else NamedSharding(
      mesh, PartitionSpec("blocks"))
  grads = jax.device_put(common.random_tree(shapes, seed=2), replicated)
  times, per_device_bytes = {}, None
  for kind, (t1, t2) in STEP_KINDS.items():
    tx = scale_by_shampoo(
        o4.ShampooConfig(bits=args.bits, shard_blocks=shard_blocks,
                         replicate_roots=args.replicate_roots),
        statistics_every=t1, inverse_root_every=t2)
    abstract = jax.eval_shape(tx.init, grads)
    state_sharding = optimizer_state_sharding(
        abstract, mesh, "blocks", replicate_roots=args.replicate_roots)
    state = jax.jit(tx.init, out_shardings=state_sharding)(grads)
    update = jax.jit(lambda g, s, tx=tx: tx.update(g, s),
                     out_shardings=(replicated, state_sharding),
                     donate_argnums=1)
    carry = [state]

    def run():
      _, carry[0] = update(grads, carry[0])
      return carry[0]

    times[kind] = common.time_call(run, repeats=args.repeats)
    if args.dump_hlo:
      with open(
          common.output_path(f"hlo_scaling_{kind}_{devices}dev.txt"), "w") as f:
        f.write(update.lower(grads, carry[0]).compile().as_text())
    per_device_bytes = state_nbytes(carry[0], per_device=True)
    if args.profile:  # device time of every kernel, summed over the devices
      from benchmarks.profile import device_times, summarize
      summarize(f"{kind} step on {devices} device(s)", device_times(run)[0], 12)
  return times, per_device_bytes


def parse_args(argv=None):
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
      "sharded")
  parser.add_argument(
      "--propagation-only", action="store_true",
      help="shard_blocks=<device count>: no sharding constraints inside the "
      "updates")
  return parser.parse_args(argv)


def measure(shapes, counts, args):
  """device count -> step seconds, preconditioner work seconds (a step kind's
  time minus the plain step's), bytes per device, and the work's speed-up over
  ``counts[0]`` devices."""
  results = {}
  for devices in counts:
    times, per_device = time_kinds(shapes, devices, args)
    results[devices] = {
        "step_s": times,
        "work_s": {
            k: times[k] - times["plain"] for k in ("statistics", "inverse_root")
        },
        "preconditioner_bytes_per_device": per_device
    }
  base = results[counts[0]]["work_s"]
  for r in results.values():
    r["speedup"] = {k: base[k] / r["work_s"][k] for k in base}
  return results


def main(argv=None):
  args = parse_args(argv)
  shapes = common.model_shapes(args.model)
  counts = [int(c) for c in args.devices.split(",")
           ] if args.devices else sorted({1, jax.device_count()})
  results = measure(shapes, counts, args)
  rows = [[
      d, r["step_s"]["plain"] * 1e3, r["step_s"]["statistics"] * 1e3,
      r["step_s"]["inverse_root"] * 1e3, r["work_s"]["statistics"] * 1e3,
      r["work_s"]["inverse_root"] * 1e3,
      r["preconditioner_bytes_per_device"] / 2**20, r["speedup"]["statistics"],
      r["speedup"]["inverse_root"]
  ] for d, r in results.items()]
  table = common.print_table(
      f"{args.model}, scale_by_shampoo(o4.ShampooConfig(bits={args.bits})) "
      "sharded over d devices"
      f"{' (propagation only)' if args.propagation_only else ''}"
      f"{', roots replicated' if args.replicate_roots else ''} "
      f"({common.machine()})", [
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
