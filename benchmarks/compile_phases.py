"""Where the compile of each training program goes (GPU): XLA's HLO passes,
its backend (code generation and ptxas), and the rest, per program, and what
each optimizer program holds per preconditioner order.

    python benchmarks/compile_phases.py [--only "adamw lr 1e-3;shampoo 4-bit,
    host-scheduled updates, split step"] [--flag-sets "default=;no tuning=
    --xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=0"]
    [--pass-times] [--out benchmarks/results/compile_phases]

The programs are ``benchmarks/train_lm.py``'s: a variant's whole step (the
program of step 1), or, for a split step, the model's gradient and the
optimizer's update for every ``due`` (plain, statistics, statistics and roots;
for a split of the updates, plain, statistics alone and roots alone).
Each variant compiles in its own process per flag set (XLA reads its flags once
per process), one program after the other. XLA's own timers (``VLOG`` of
``gpu_compiler``) give the seconds of the HLO passes and of the backend; the
rest of a program's wall-clock is tracing, lowering and loading;
``--pass-times`` adds each program's longest HLO passes, from the module
metadata XLA dumps. Per program: its instructions as lowered (StableHLO),
fusions, library calls (cuBLAS, cuSOLVER), and the fusions and library calls
whose result has a preconditioner's order (``[k, n, n]``) by order. Prints a
table and writes ``results.json``.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent import futures

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import compile_time  # pylint: disable=wrong-import-position
import train_lm  # pylint: disable=wrong-import-position
import train_lm_programs  # pylint: disable=wrong-import-position
from train_lm_variants import split_of  # pylint: disable=wrong-import-position

MARK = "@@ compiling "
TIMER = re.compile(r"GpuCompiler::(RunHloPasses|RunBackend) for \S+ time: "
                   r"([0-9.]+) (s|ms|us)")
UNIT_S = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
LOWERED_OP = re.compile(r" = (?:stablehlo|chlo)\.")
# the jitted functions whose modules are the programs, as XLA names them
PROGRAM_MODULES = ("jit_step", "jit_loss_fn", "jit_apply_scheduled_gradients",
                   "jit_apply_scheduled_part")
PASS = re.compile(
    r'pass_name: "([^"]*)".*?start_timestamp_usec: (\d+)\s*'
    r"end_timestamp_usec: (\d+)", re.S)
OPS = re.compile(r"\n\s*\S+ = (\S+|\([^=]*?\)) (fusion|custom-call)\(")
STACK = re.compile(r"\[\d+,(\d+),\1\]")


def programs(name: str, args):
  """``(label, function that lowers the program)`` of each program of
  ``name``'s training step."""
  import jax
  run = train_lm.setup(name, args)
  x, y = train_lm.batch(run, run.corpus[0], np.random.default_rng(0))
  split = split_of(name)
  if not split:
    due = run.schedule(1) if run.schedule else None
    step = run.jit(train_lm.training_step(run))
    yield "whole step", lambda: step.lower(run.state, x, y, due=due)
    return
  gradient, update, parts = train_lm_programs.split_step(
      train_lm.loss_function(run.model), apart=split == "updates")
  yield "gradient", lambda: gradient.lower(run.state.params, x, y)
  grads = jax.eval_shape(lambda params: params, run.state.params)
  dues = dict.fromkeys(
      part for s in range(1, args.steps + 1) for part in parts(run.schedule(s)))
  for due in sorted(dues):
    yield f"update {due}", lambda due=due: update.lower(run.state, grads,
                                                        due=due)


def op_counts(text: str, stacks: bool) -> dict:
  """Fusions and library calls of a compiled program and, with ``stacks`` (an
  optimizer's program), those of them whose result is a stack of one order (by
  order)."""
  counts = collections.Counter()
  by_order = collections.Counter()
  for shape, op in OPS.findall(text):
    counts[op] += 1
    stack = STACK.search(shape) if stacks else None
    if stack:
      by_order[int(stack.group(1))] += 1
  return dict(fusions=counts["fusion"], library_calls=counts["custom-call"],
              gemms=text.count('custom_call_target="__cublas$lt$matmul"'),
              by_order=dict(sorted(by_order.items())))


def compile_child(name: str, args) -> list:
  """Compiles ``name``'s programs one after the other; a mark on stderr
  before each lets the parent assign XLA's timer lines to it."""
  import jax
  rows = []
  for label, lower in programs(name, args):
    print(MARK + label, file=sys.stderr, flush=True)
    start = time.perf_counter()
    lowered = lower()
    compiled = lowered.compile()
    rows.append(
        dict(program=label, wall_s=time.perf_counter() - start,
             lowered_instructions=len(LOWERED_OP.findall(lowered.as_text())),
             device=jax.devices()[0].device_kind, jax=jax.__version__,
             **op_counts(compiled.as_text(), label.startswith("update"))))
  print(MARK + "done", file=sys.stderr, flush=True)
  return rows


def compile_side_by_side(name: str, args) -> list:
  """Compiles each of ``name``'s programs in a thread as soon as it is
  lowered, as ``train_lm.py --compile-concurrently`` does: the gradient first,
  then the updates, most updates first (``o4.compile_scheduled``). Each row's
  ``wall_s`` is its own compile and ``finished_s`` when it was done, from the
  first lowering on; the last row is the whole."""
  import jax
  # the model and state built; the updates ordered as compile_scheduled does
  lowers = sorted(
      programs(name, args), key=lambda p:
      (p[0] != "gradient", -p[0].count("True")))
  start = time.perf_counter()

  def compile_one(label, program):
    begin = time.perf_counter()
    compiled = program.compile()
    end = time.perf_counter()
    return dict(program=label, wall_s=end - begin, finished_s=end - start,
                device=jax.devices()[0].device_kind, jax=jax.__version__,
                **op_counts(compiled.as_text(), label.startswith("update")))

  with futures.ThreadPoolExecutor(len(lowers)) as pool:
    pending = []
    for label, lower in lowers:
      pending.append(pool.submit(compile_one, label, lower()))
    lowered_s = time.perf_counter() - start
    rows = [p.result() for p in pending]
  total = time.perf_counter() - start
  return rows + [
      dict(program=f"all side by side (lowered after {lowered_s:.1f} s)",
           wall_s=total, finished_s=total, fusions="—", library_calls="—",
           gemms="—", by_order={})
  ]


def phase_seconds(stderr: str) -> dict:
  """``{program label: {"hlo_passes_s", "backend_s"}}`` from the timer lines
  between the marks (the larger module when a program compiles several)."""
  phases, label = {}, None
  for line in stderr.splitlines():
    if line.startswith(MARK):
      label = line[len(MARK):]
      phases[label] = {"hlo_passes_s": 0.0, "backend_s": 0.0}
      continue
    timer = TIMER.search(line)
    if timer and label in phases:
      key = "hlo_passes_s" if timer.group(1) == "RunHloPasses" else "backend_s"
      seconds = float(timer.group(2)) * UNIT_S[timer.group(3)]
      phases[label][key] = max(phases[label][key], seconds)
  return phases


def pass_seconds(dump: str) -> list:
  """Per compiled program, in compile order, its three longest HLO passes
  ``[(pass, seconds)]``, from the module metadata XLA wrote under ``dump``."""
  names = {}
  for f in os.listdir(dump):
    config = re.fullmatch(r"module_(\d+)\.(\S+)\.config\.pbtxt", f)
    if config and config.group(2) in PROGRAM_MODULES:
      names[int(config.group(1))] = config.group(2)
  programs = []
  for module in sorted(names):
    with open(os.path.join(dump,
                           f"module_{module:04d}.metadata.textproto")) as f:
      text = f.read()
    seconds = collections.Counter()
    for name, start, end in PASS.findall(text):
      seconds[name] += (int(end) - int(start)) / 1e6
    programs.append([(n, round(t, 2)) for n, t in seconds.most_common(3)])
  return programs


def run_child(name: str, flag_set: str, flags: str, argv,
              pass_times: bool) -> list:
  dump = tempfile.mkdtemp() if pass_times else None
  if dump:
    flags += (f" --xla_dump_to={dump} --xla_dump_module_metadata=true "
              f"--xla_dump_hlo_module_re={'|'.join(PROGRAM_MODULES)}")
  env = dict(os.environ, XLA_FLAGS=flags, TF_CPP_MIN_LOG_LEVEL="0",
             TF_CPP_VMODULE="gpu_compiler=1")
  output = compile_time.child(
      os.path.abspath(__file__), name, argv, env, flag_set)
  if output is None:
    return []
  rows, stderr = output
  phases = phase_seconds(stderr)
  rows = [
      dict(row, name=name, flag_set=flag_set, xla_flags=flags,
           **phases.get(row["program"], {})) for row in rows
  ]
  if dump:
    for row, passes in zip(rows, pass_seconds(dump)):
      row["largest_passes"] = passes
    shutil.rmtree(dump, ignore_errors=True)
  return rows


def print_table(rows) -> None:
  header = ("flags", "optimizer", "program", "lowered instructions",
            "compile s", "HLO passes s", "backend s", "fusions",
            "library calls", "cuBLAS GEMMs", "fusions + calls of each order",
            "largest HLO passes, s")
  print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  for r in rows:
    orders = ", ".join(f"{n}: {c}" for n, c in r["by_order"].items())
    print("| " + " | ".join([
        r["flag_set"], r["name"], r["program"],
        str(r.get("lowered_instructions", "—")), f"{r['wall_s']:.1f}" +
        (f" (done at {r['finished_s']:.1f})" if "finished_s" in r else ""), *(
            f"{r[k]:.1f}" if k in r else "—"
            for k in ("hlo_passes_s", "backend_s")),
        str(r["fusions"]),
        str(r["library_calls"]),
        str(r["gemms"]), orders or "—", ", ".join(
            f"{n} {t:.1f}" for n, t in r.get("largest_passes", [])) or "—"
    ]) + " |")


def parser():
  """``train_lm.py``'s options (model, intervals, ``--only``) and the flag
  sets."""
  parser = train_lm.parser()
  parser.description = __doc__.splitlines()[0]
  parser.add_argument(
      "--flag-sets",
      default="default=;no tuning=--xla_gpu_enable_triton_gemm=false "
      "--xla_gpu_autotune_level=0", help="';'-separated NAME=XLA_FLAGS")
  parser.add_argument(
      "--pass-times", action="store_true",
      help="also time each HLO pass (XLA's module metadata, dumped to a "
      "temporary directory)")
  parser.add_argument(
      "--side-by-side", action="store_true",
      help="compile each optimizer's programs in threads, each as soon as it "
      "is lowered, as o4.compile_scheduled does (XLA's phase timers then mix, "
      "and are left out)")
  parser.set_defaults(
      out="benchmarks/results/compile_phases", statistics_every=100,
      inverse_root_every=500,
      only="adamw lr 1e-3;shampoo 4-bit, host-scheduled "
      "updates, split step")
  return parser


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parser().parse_args(argv)
  if args.child:
    compile_all = compile_side_by_side if args.side_by_side else compile_child
    print(json.dumps(compile_all(args.child, args)))
    return
  rows = []
  os.makedirs(args.out, exist_ok=True)
  for flag_set in args.flag_sets.split(";"):
    label, _, flags = flag_set.partition("=")
    for name in args.only.split(";"):
      rows += run_child(name, label, flags.strip(), argv, args.pass_times)
      print(f"{name} ({label}) compiled", flush=True)
      with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
  if rows:
    print(f"\n{rows[0]['device']}, jax {rows[0]['jax']}")
  print_table(rows)


if __name__ == "__main__":
  main()
