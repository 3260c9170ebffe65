"""Where the time of a Shampoo step goes: device time per kernel / HLO op, read
from a JAX profiler trace.

Run: ``PYTHONPATH=. python benchmarks/profile.py [--model gpt2_small] [--bits 4]
  [--top 15]``.

For the plain, statistics and inverse-root step programs of ``shampoo_adamw``
(or, with ``--optimizer soap``, the plain and refresh steps of ``soap``, each
scheduled by the host) on a model's shapes, traces a few calls with ``jax.profiler`` and prints the device
time of each op class (matrix products, Cholesky / triangular solves / eigh,
fusions, copies), the slowest ops, and the time of each source line of the
library (:mod:`benchmarks.kernel_sources`). Then, unless ``--skip-extras``,
times the statistics step's linear algebra on its own
(:mod:`benchmarks.linalg_kernels`).
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp

from benchmarks import common, kernel_sources, linalg_kernels
from benchmarks.shampoo_step import STEP_KINDS, step_program
import optax_shampoo4 as o4
from optax_shampoo4 import linalg, shampoo_adamw

CLASSES = (  # (class, pattern on the kernel / op name), first match wins
    # before "matmul": cuBLAS's triangular solves carry "cublas" in their names
    ("factorization",
     r"potrf|trsm|syevd|syevj|cholesky|triangular|eigh|solver|getrf|lapack"
     r"|geqrf"),
    ("matmul", r"gemm|cutlass|cublas|xmma|dot|matmul|sm90|sm80"),
    ("copy/transpose",
     r"copy|transpose|memcpy|memset|concatenate|slice|dynamic"),
    ("fusion", r"fusion|reduce|convert|select|compare|add|multiply"),
)

# the profiled program's own frames, left out of the by-source table
SCRIPT_FILES = ("profile.py", "shampoo_step.py")


def classify(name: str) -> str:
  lower = name.lower()
  for label, pattern in CLASSES:
    if re.search(pattern, lower):
      return label
  return "other"


def device_times(fn, *args, calls: int = 3,
                 launches: Optional[collections.Counter] = None):
  """``{op name: device ns per call}`` from a profiler trace of ``calls`` calls
  (after one warm-up); ``launches`` (if given) receives the number of kernel
  launches per call of each op."""
  from jax.profiler import ProfileData
  jax.block_until_ready(fn(*args))
  directory = tempfile.mkdtemp()
  with jax.profiler.trace(directory):
    for _ in range(calls):
      jax.block_until_ready(fn(*args))
  path = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)[0]
  per_op = collections.Counter()
  lines_seen = set()
  for plane in ProfileData.from_file(path).planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      lines_seen.add(line.name)
      # Kernel launches sit on the "Stream #…" lines; "XLA Ops"/"XLA Modules"
      # summarize the same time.
      if not line.name.startswith("Stream"):
        continue
      for event in line.events:
        per_op[event.name] += event.duration_ns / calls
        if launches is not None:
          launches[event.name] += 1 / calls
  return per_op, sorted(lines_seen)


def summarize(title, per_op, top, launches=None):
  total = sum(per_op.values())
  by_class = collections.Counter()
  for name, ns in per_op.items():
    by_class[classify(name)] += ns
  rows = [[label, ns / 1e6, 100 * ns / max(total, 1)]
          for label, ns in by_class.most_common()]
  rows.append(["total device time", total / 1e6, 100.0])
  if launches:
    rows.append(
        ["kernel launches per step",
         round(sum(launches.values())), "-"])
  tables = [
      common.print_table(f"{title}: device time by class", ["class", "ms", "%"],
                         rows)
  ]
  rows = [[name[:90],
           classify(name), ns / 1e6, 100 * ns / max(total, 1)]
          for name, ns in per_op.most_common(top)]
  tables.append(
      common.print_table(f"{title}: slowest kernels",
                         ["kernel", "class", "ms", "%"], rows))
  return tables, {
      "total_ms": total / 1e6,
      "by_class_ms": {
          k: v / 1e6 for k, v in by_class.items()
      },
      "top": [[n, ns / 1e6] for n, ns in per_op.most_common(top)]
  }


def parse_args(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", default="gpt2_small",
                      choices=("gpt2_small", "vit_s16", "lm_base"))
  parser.add_argument("--optimizer", default="shampoo",
                      choices=("shampoo", "soap"))
  parser.add_argument("--bits", type=int, default=4)
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--skip-steps", action="store_true")
  parser.add_argument(
      "--kinds", default=None,
      help="step kinds, ','-separated (default: Shampoo's "
      "plain,statistics,inverse_root; SOAP's plain,refresh)")
  parser.add_argument(
      "--cholesky-every-pass", action="store_true",
      help="also profile the statistics step with a Cholesky factorization in "
      "every Cholesky-QR "
      "pass (no first-order corrections)")
  parser.add_argument(
      "--bjorck-steps", default=None,
      help="ShampooConfig.bjorck_steps as 'statistics,use' (default: the "
      "optimizer's own); the output's name then ends in _bjorck<s><u>")
  parser.add_argument(
      "--preconditioning-precision", default=None, choices=("bf16", "high"),
      help="ShampooConfig.preconditioning_precision (SOAP's rotations, "
      "Shampoo's products); the output's name then ends in _<precision>")
  parser.add_argument(
      "--linalg-precision", default=None, choices=o4.config.LINALG_PRECISIONS,
      help="ShampooConfig.linalg_precision (the statistics step, SOAP's "
      "refresh); the output's name then ends in _linalg_<precision>")
  parser.add_argument(
      "--rectification-precision", default=None,
      choices=o4.config.LINALG_PRECISIONS,
      help="ShampooConfig.rectification_precision (the Björck steps on loaded "
      "bases); the output's name then ends in _rectified_<precision>")
  parser.add_argument(
      "--max-order", type=int, default=o4.ShampooConfig.max_order,
      help="ShampooConfig.max_order; the output's name then ends in "
      "_order<n> unless it is the default")
  parser.add_argument(
      "--source-depth", type=int, default=2,
      help="frames of each kernel's call stack in the by-source table")
  parser.add_argument("--dump-hlo", action="store_true",
                      help="write each profiled program's optimized HLO")
  parser.add_argument(
      "--skip-extras", action="store_true",
      help="skip the dot-algorithm, statistics-variant and factorization "
      "timings")
  return parser.parse_args(argv)


# SOAP's step kinds: the refresh flag of ``preconditioner_due``
SOAP_KINDS = {"plain": False, "refresh": True}


def step_of(args, kind: str):
  """The jitted step of ``kind`` of the optimizer profiled: Shampoo's by its
  intervals, SOAP's by the host's schedule (no conditional either way)."""
  steps = args.bjorck_steps and tuple(map(int, args.bjorck_steps.split(",")))
  config = o4.ShampooConfig(
      bits=args.bits, bjorck_steps=steps, max_order=args.max_order,
      preconditioning_precision=args.preconditioning_precision,
      linalg_precision=args.linalg_precision,
      rectification_precision=args.rectification_precision)
  if args.optimizer == "soap":
    tx = o4.soap(1e-3, config=config)
    return tx, step_program(tx, (SOAP_KINDS[kind], False))
  tx = shampoo_adamw(1e-3, statistics_every=STEP_KINDS[kind][0],
                     inverse_root_every=STEP_KINDS[kind][1], shampoo=config)
  return tx, step_program(tx)


def profile_step(args, kind: str, label: str, params, grads):
  """``(per-op device times, trace lines, optimized HLO text)`` of one step of
  ``kind`` (the text also written with ``--dump-hlo``)."""
  tx, step = step_of(args, kind)
  carry = [jax.tree.map(jnp.copy, params), tx.init(params)]
  # the executable traced is the one whose text names its kernels' sources
  compiled = step.lower(carry[0], carry[1], grads).compile()

  def run():
    carry[0], carry[1] = compiled(carry[0], carry[1], grads)
    return carry[1]

  per_op, lines = device_times(run)
  hlo_text = compiled.as_text()
  if args.dump_hlo:
    name = common.file_name(
        f"hlo_{args.optimizer}_{args.model}_{args.bits}bit_{label}.txt")
    with open(common.output_path(name), "w") as f:
      f.write(hlo_text)
  return per_op, lines, hlo_text


def profile_steps(args, params, grads):
  """``(payload, tables)`` of every step kind asked for."""
  default_tolerance = linalg.CHOLESKY_QR_CORRECTION_TOLERANCE
  # (step kind, label, Cholesky-QR correction tolerance while it is traced)
  kinds = args.kinds or ",".join(SOAP_KINDS if args.optimizer ==
                                 "soap" else STEP_KINDS)
  programs = [(kind, kind, default_tolerance) for kind in kinds.split(",")
             ] if not args.skip_steps else []
  if args.cholesky_every_pass:
    programs.append(("statistics", "statistics, Cholesky every pass", None))
  payload, tables = {}, []
  for kind, label, tolerance in programs:
    linalg.CHOLESKY_QR_CORRECTION_TOLERANCE = tolerance
    try:
      per_op, lines, hlo_text = profile_step(args, kind, label, params, grads)
    finally:
      linalg.CHOLESKY_QR_CORRECTION_TOLERANCE = default_tolerance
    title = f"{args.optimizer} {args.model} {label} step, bits={args.bits}"
    new_tables, payload[label] = summarize(title, per_op, args.top)
    table, payload[label]["by_source_ms"] = kernel_sources.table(
        title, per_op, hlo_text, SCRIPT_FILES, args.source_depth, args.top)
    payload[label]["trace_lines"] = lines
    tables += new_tables + [table]
  return payload, tables


def main(argv=None):
  args = parse_args(argv)
  shapes = common.model_shapes(args.model)
  params, grads = common.random_tree(shapes, seed=1), common.random_tree(
      shapes, seed=2)
  payload, tables = profile_steps(args, params, grads)
  if not args.skip_extras:
    extra_payload, new_tables = linalg_kernels.extra_tables()
    payload.update(extra_payload)
    tables += new_tables
  prefix = "" if args.optimizer == "shampoo" else "soap_"
  suffix = "_bjorck" + args.bjorck_steps.replace(
      ",", "") if args.bjorck_steps else ""
  if args.preconditioning_precision:
    suffix += "_" + args.preconditioning_precision
  if args.linalg_precision:
    suffix += "_linalg_" + args.linalg_precision
  if args.rectification_precision:
    suffix += "_rectified_" + args.rectification_precision
  if args.max_order != o4.ShampooConfig.max_order:
    suffix += f"_order{args.max_order}"
  common.write_json(f"profile_{prefix}{args.model}_{args.bits}bit{suffix}", {
      **payload, "tables": tables
  })


if __name__ == "__main__":
  main()
