"""Step time and state memory of optax.adamw vs 4-bit / 8-bit AdamW on GPT-2-medium shapes (355M params).

Run: ``PYTHONPATH=. python benchmarks/adam_step.py``. The step is update + apply_updates, jitted with the
params and state donated, as in a training loop.
"""

import argparse

import optax

from benchmarks import common
from benchmarks.shampoo_step import time_step
from optax_shampoo4 import adamw_4bit


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  shapes = common.gpt2_medium_shapes()
  n = common.parameter_count(shapes)
  params = common.random_tree(shapes, seed=1)
  grads = common.random_tree(shapes, seed=2)
  optimizers = {"optax.adamw": optax.adamw(1e-3), "adamw_4bit rank1": adamw_4bit(1e-3),
                "adamw_4bit block": adamw_4bit(1e-3, second_moment="block"),
                "adamw_4bit factored": adamw_4bit(1e-3, second_moment="factored"),
                "adamw 8-bit (block 256)": adamw_4bit(1e-3, bits=8, second_moment="block")}
  rows, results = [], {}
  for name, tx in optimizers.items():
    seconds, nbytes = time_step(tx, params, grads, args.repeats)
    results[name] = {"step_s": seconds, "state_bytes": nbytes}
    print(f"{name}: {seconds * 1e3:.3f} ms/step, {nbytes / 2**20:.1f} MiB", flush=True)
  base = results["optax.adamw"]["step_s"]
  for name, r in results.items():
    rows.append([name, r["step_s"] * 1e3, r["step_s"] / base, r["state_bytes"] / 2**20, r["state_bytes"] / n])
  table = common.print_table(f"AdamW step, GPT-2 medium shapes ({n / 1e6:.0f}M params, {common.machine()})",
                             ["optimizer", "ms/step", "x optax.adamw", "state MiB", "state B/param"], rows)
  common.write_json("adam_step", {"results": results, "params": n, "table": table})


if __name__ == "__main__":
  main()
