"""Where the time of a Shampoo step goes: device time per kernel / HLO op, read
from a JAX profiler trace.

Run: ``PYTHONPATH=. python benchmarks/profile.py [--model gpt2_small] [--bits 4]
  [--top 15]``.

For the plain, statistics and inverse-root step programs of ``shampoo_adamw``
(or, with ``--optimizer soap``, the plain and refresh steps of ``soap``, each
scheduled by the host) on a model's shapes, traces a few calls with ``jax.profiler`` and prints the device
time of each op class (matrix products, Cholesky / triangular solves / eigh,
fusions, copies), the slowest ops, and the time of each source line of the
library (:mod:`benchmarks.kernel_sources`). Then times the fp32 matrix-product
algorithms XLA offers for the preconditioner algebra on an order-1200 stack
(rate and error against ``Precision.HIGHEST``), and the batched factorizations
the statistics step uses.
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
import numpy as np

from benchmarks import common, kernel_sources
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


def algorithms(order: int = 1200, count: int = 101):
  """Rate and relative error (vs HIGHEST) of a batched fp32 product with each
  dot algorithm XLA offers."""
  key = jax.random.PRNGKey(0)
  a = jax.random.normal(key, (count, order, order), jnp.float32)
  b = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(1),
                                      (order, order)))[0] * jnp.logspace(
                                          0, -6, order)
  reference = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
  flops = 2 * count * order**3
  rows = []
  candidates = [("HIGHEST", jax.lax.Precision.HIGHEST),
                ("HIGH", jax.lax.Precision.HIGH),
                ("DEFAULT", jax.lax.Precision.DEFAULT)]
  for name in ("TF32_TF32_F32_X3", "BF16_BF16_F32_X6", "BF16_BF16_F32_X3",
               "BF16_BF16_F32_X9"):
    candidates.append((name, getattr(jax.lax.DotAlgorithmPreset, name)))
  for name, precision in candidates:
    try:
      fn = jax.jit(lambda x, y, p=precision: jnp.matmul(x, y, precision=p))
      seconds = common.time_call(fn, a, b, repeats=5)
      error = float(
          jnp.linalg.norm(fn(a, b) - reference) / jnp.linalg.norm(reference))
      rows.append([name, seconds * 1e3, flops / seconds / 1e12, error])
    except Exception as e:  # an algorithm the backend does not offer
      rows.append([name, "unsupported", str(e)[:60], "-"])
  return rows


def factorizations(order: int = 1200, count: int = 101):
  x = jax.random.normal(
      jax.random.PRNGKey(2), (count, order, order), jnp.float32)
  spd = jnp.matmul(x, jnp.swapaxes(x, -1, -2),
                   precision=jax.lax.Precision.HIGHEST) / order + jnp.eye(order)
  lower = jnp.linalg.cholesky(spd)
  programs = {
      "cholesky": (jax.jit(jnp.linalg.cholesky), spd),
      "triangular_solve (right, transposed)":
          (jax.jit(lambda l, b: jax.lax.linalg.triangular_solve(
              l, b, left_side=False, lower=True, transpose_a=True)), lower, x),
      "eigh": (jax.jit(jnp.linalg.eigh), spd),
      "matmul HIGHEST": (jax.jit(
          lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)),
                         x, x),
  }
  return [[name, common.time_call(fn, *args, repeats=3) * 1e3]
          for name, (fn, *args) in programs.items()]


def statistics_problem(order: int, updates: int):
  """``(grams, reference)``: ``updates`` Gram matrices of two blocks whose
  gradients have a spectrum spanning three decades, and the float64 inverse
  4th root of their EMA."""
  rng = np.random.default_rng(0)
  basis = np.linalg.qr(rng.standard_normal(
      (order, order)))[0] * np.logspace(0, -3, order)
  streams = [
      np.stack([
          basis @ rng.standard_normal((order, order)) / np.sqrt(order)
          for _ in range(2)
      ])
      for _ in range(updates)
  ]
  grams = [np.einsum("kij,klj->kil", g, g) for g in streams]
  statistic = np.broadcast_to(1e-6 * np.eye(order), (2, order, order))
  for g in grams:
    statistic = 0.95 * statistic + 0.05 * g
  values, vectors = np.linalg.eigh(statistic)
  damped = values + 1e-6 * values[:, -1:]
  return grams, np.einsum("kij,kj,klj->kil", vectors, damped**-0.25, vectors)


def statistics_variants(order: int = 1200, count: int = 101, updates: int = 4):
  """The eigenvector statistics update of an order-1200 stack under each dot
  algorithm and number of Cholesky-QR passes: time (4-bit storage, ``count``
  blocks), and the error of the inverse root after ``updates`` updates (2
  blocks, fp32 and 4-bit storage) against a float64 reference; for fp32 storage
  also the difference from the HIGHEST, 3-pass pipeline."""
  import functools
  from optax_shampoo4 import linalg, preconditioners
  hyper = preconditioners.Hyper(0.95, 1e-6, 0.0)
  grams, reference = statistics_problem(order, updates)
  timing_grams = linalg.gram(
      jax.random.normal(jax.random.PRNGKey(order), (count, order, 256)))
  original_orthonormalize = linalg.orthonormalize_columns
  variants = [("HIGHEST", jax.lax.Precision.HIGHEST, 3),
              ("HIGHEST", jax.lax.Precision.HIGHEST, 2)]
  for name in ("TF32_TF32_F32_X3", "BF16_BF16_F32_X6", "BF16_BF16_F32_X3"):
    variants.append((name, getattr(jax.lax.DotAlgorithmPreset, name), 3))

  def final_root(bits, numerics):
    storage = preconditioners.make_storage(
        o4.ShampooConfig(bits=bits, min_quantized_size=0), order, numerics)
    update = jax.jit(lambda s, g: storage.update_statistics(s, g, hyper))
    state, failures = storage.init(2, order, hyper), 0
    for g in grams:
      state, ok = update(state, jnp.asarray(g, jnp.float32))
      failures += int(np.sum(~np.asarray(ok)))
    root = jax.jit(lambda s: storage.inverse_root(
        storage.update_inverse_root(s, hyper)[0]))(
            state)
    return np.asarray(root, np.float64), failures

  relative = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
  rows, highest_root = [], None
  for name, precision, passes in variants:
    linalg.orthonormalize_columns = functools.partial(original_orthonormalize,
                                                      passes=passes)
    try:
      numerics = linalg.Numerics(precision)
      storage4 = preconditioners.make_storage(
          o4.ShampooConfig(bits=4, min_quantized_size=0), order, numerics)
      update4 = jax.jit(lambda s, g: storage4.update_statistics(s, g, hyper)[0])
      seconds = common.time_call(update4, storage4.init(count, order, hyper),
                                 timing_grams, repeats=3)
      root32, failures32 = final_root(32, numerics)
      root4, failures4 = final_root(4, numerics)
      highest_root = root32 if highest_root is None else highest_root
      rows.append([
          name, passes, seconds * 1e3,
          relative(root32, reference),
          relative(root32, highest_root),
          relative(root4, reference), failures32 + failures4
      ])
    except Exception as e:  # an algorithm the backend does not offer
      rows.append([name, passes, "unsupported", str(e)[:50], "-", "-", "-"])
    finally:
      linalg.orthonormalize_columns = original_orthonormalize
  return rows


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
      linalg_precision=args.linalg_precision)
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


def extra_tables():
  """``(payload, tables)``: dot algorithms, statistics-update variants and
  batched factorizations of order-1200 stacks."""
  payload = {
      "algorithms": algorithms(),
      "statistics_variants": statistics_variants(),
      "factorizations": factorizations()
  }
  tables = [
      common.print_table(
          f"Dot algorithms, (101, 1200, 1200) fp32 products "
          f"({common.machine()})",
          ["algorithm", "ms", "TFLOP/s", "rel. error vs HIGHEST"],
          payload["algorithms"]),
      common.print_table(
          "Eigenvector statistics update of a (101, 1200, 1200) stack by dot "
          "algorithm and Cholesky-QR passes", [
              "algorithm", "passes", "4-bit update ms", "fp32 root err vs fp64",
              "fp32 root diff vs HIGHEST/3", "4-bit root err vs fp64",
              "rejected"
          ], payload["statistics_variants"]),
      common.print_table("Batched factorizations, (101, 1200, 1200) fp32",
                         ["op", "ms"], payload["factorizations"])
  ]
  return payload, tables


def main(argv=None):
  args = parse_args(argv)
  shapes = common.model_shapes(args.model)
  params, grads = common.random_tree(shapes, seed=1), common.random_tree(
      shapes, seed=2)
  payload, tables = profile_steps(args, params, grads)
  if not args.skip_extras:
    extra_payload, new_tables = extra_tables()
    payload.update(extra_payload)
    tables += new_tables
  prefix = "" if args.optimizer == "shampoo" else "soap_"
  suffix = "_bjorck" + args.bjorck_steps.replace(
      ",", "") if args.bjorck_steps else ""
  if args.preconditioning_precision:
    suffix += "_" + args.preconditioning_precision
  if args.linalg_precision:
    suffix += "_linalg_" + args.linalg_precision
  if args.max_order != o4.ShampooConfig.max_order:
    suffix += f"_order{args.max_order}"
  common.write_json(f"profile_{prefix}{args.model}_{args.bits}bit{suffix}", {
      **payload, "tables": tables
  })


if __name__ == "__main__":
  main()
