"""Compile time of the Flax GPT's training step, and the part of it that
XLA:GPU's autotuner takes (GPU).

    python benchmarks/compile_time.py [--only "adamw lr 1e-3;shampoo 4-bit"]
    [--autotune-levels 4,0] [--out benchmarks/results/compile_time]

The step is ``benchmarks/train_lm.py``'s (same model, optimizers and
command-line options). Each optimizer compiles once per autotune level, each
in its own process, since XLA reads its flags once per process. Level 0
(``--xla_gpu_autotune_level=0``) skips XLA:GPU's timing of candidate kernels
for every matrix product and fusion, so its difference from the default level
4 is the autotuner's share of the compile. Per row: seconds to trace and lower,
seconds to compile, and the compiled step's instruction counts (fusions,
library calls, conditionals, and whiles), and how many launches follow the
last conditional. Prints a table and writes ``results.json``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import train_lm  # pylint: disable=wrong-import-position

COUNTED = ("fusion", "custom-call", "conditional", "while")


def after_last_conditional(text: str) -> int:
  """Kernels and calls the entry computation runs after its last conditional.
  XLA:GPU's host reads a conditional's predicate and waits for it, so these are
  launched only once the GPU has caught up, while the GPU idles."""
  entry = text[text.index("\nENTRY "):].split("\n}\n")[0].splitlines()
  marks = [i for i, line in enumerate(entry) if " conditional(" in line]
  if not marks:
    return 0
  launch = re.compile(r"= [^=]* (fusion|custom-call|call|while)\(")
  return sum(bool(launch.search(line)) for line in entry[marks[-1] + 1:])


def compile_one(name: str, args) -> dict:
  """Lower and compile ``name``'s training step (of a host-scheduled variant,
  the program of step 1, a plain step); its seconds and counts."""
  import jax
  run = train_lm.setup(name, args)
  x, y = train_lm.batch(run, run.corpus[0], np.random.default_rng(0))
  due = run.schedule(1) if run.schedule else None
  start = time.perf_counter()
  lowered = run.jit(train_lm.training_step(run)).lower(run.state, x, y, due=due)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  text = compiled.as_text()
  counts = {op: len(re.findall(rf"= [^=]* {op}\(", text)) for op in COUNTED}
  return dict(name=name, lower_s=lowered_at - start,
              compile_s=done - lowered_at, counts=counts,
              after_last_conditional=after_last_conditional(text),
              device=str(jax.devices()[0].device_kind), jax=jax.__version__)


def child(script: str, name: str, argv, env, label: str):
  """``(the JSON of its last stdout line, its stderr)`` of ``script --child
  name argv`` run in ``env``, or None (its stderr printed) if it failed."""
  done = subprocess.run([sys.executable, script, "--child", name] + argv,
                        capture_output=True, text=True, env=env)
  if done.returncode:
    print(f"{name} ({label}) failed:\n{done.stderr[-3000:]}", flush=True)
    return None
  return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def run_child(name: str, level: int, argv) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "") + f" --xla_gpu_autotune_level={level}")
  output = child(os.path.abspath(__file__), name, argv, env, f"level {level}")
  return dict(output[0], autotune_level=level) if output else None


def print_table(rows) -> None:
  header = ("optimizer", "autotune level", "lower s", "compile s",
            "× adamw (same level)") + COUNTED + ("after last conditional",)
  print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  adamw = {
      r["autotune_level"]: r["compile_s"]
      for r in rows
      if r["name"].startswith("adamw")
  }
  for r in rows:
    base = adamw.get(r["autotune_level"])
    cells = [
        r["name"],
        str(r["autotune_level"]), f"{r['lower_s']:.1f}",
        f"{r['compile_s']:.1f}",
        f"{r['compile_s'] / base:.2f}×" if base else "n/a"
    ] + [str(r["counts"][op]) for op in COUNTED
        ] + [str(r["after_last_conditional"])]
    print("| " + " | ".join(cells) + " |")


def main(argv=None):
  parser = train_lm.parser()
  parser.description = __doc__.splitlines()[0]
  parser.add_argument("--autotune-levels", default="4,0")
  parser.set_defaults(out="benchmarks/results/compile_time",
                      statistics_every=100, inverse_root_every=500,
                      only="adamw lr 1e-3;shampoo 4-bit")
  argv = sys.argv[1:] if argv is None else argv
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(compile_one(args.child, args)))
    return
  rows = []
  for name in args.only.split(";"):
    for level in map(int, args.autotune_levels.split(",")):
      row = run_child(name, level, argv)
      if row:
        rows.append(row)
        print(f"{name}, level {level}: {row['compile_s']:.1f} s", flush=True)
  print(f"\n{rows[0]['device']}, jax {rows[0]['jax']}" if rows else "")
  print_table(rows)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
