"""Shampoo's update intervals on the CNN example: wall-clock to AdamW's loss.

    python benchmarks/intervals.py [--steps 1000] [--seeds 0,1,2]

Trains the digits CNN of ``examples/compare.py`` (two 3×3 convolutions, two
dense layers, batch 64, lr 3e-3, weight decay 1e-4) with ``optax.adamw`` and
with 4-bit ``shampoo_adamw`` at several ``(statistics_every,
inverse_root_every)`` pairs, each step waited for. Per configuration, averaged
over the seeds: final train loss (mean of the last 50 steps), test accuracy,
median and mean ms per step, and the wall-clock to reach AdamW's final loss of
the same seed (50-step running mean, the first step's compile excluded) as a
ratio to AdamW's own. Prints a table and writes ``intervals_cnn.json``
(``$OUT`` or ``benchmarks/results``). ``docs/benchmarks.md`` has the run behind
the default intervals.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
sys.path.insert(0, os.path.join(HERE, ".."))

INTERVALS = ((10, 50), (20, 100), (50, 250), (100, 500))


def train(tx, data, steps: int, seed: int, batch: int) -> dict:
  """Losses and per-step seconds of ``steps`` steps of the digits CNN, and its
  test accuracy."""
  import jax
  from flax.training import train_state
  import compare
  (train_x, train_y), (test_x, test_y) = data
  model = compare.CNN()
  params = model.init(jax.random.PRNGKey(seed), train_x[:1])["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=tx)
  step = compare.make_step(model)
  rng = np.random.default_rng(seed)
  losses, times = [], []
  for _ in range(steps):
    index = rng.integers(0, len(train_y), batch)
    start = time.perf_counter()
    state, loss = step(state, train_x[index], train_y[index])
    losses.append(float(loss))
    times.append(time.perf_counter() - start)
  _, accuracy = compare.evaluate(model, state.params, test_x, test_y)
  # the first step compiles
  return {"losses": losses, "step_s": [0.0] + times[1:], "accuracy": accuracy}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  args = parser.parse_args(argv)
  import optax
  import compare
  import optax_shampoo4 as o4
  from benchmarks import common
  from benchmarks.train_lm import SMOOTH, time_to_target
  configs = {
      "adamw": lambda: optax.adamw(args.learning_rate, weight_decay=1e-4)
  }
  for t1, t2 in INTERVALS:
    configs[f"shampoo 4-bit, {t1}/{t2}"] = (
        lambda t1=t1, t2=t2: o4.shampoo_adamw(
            args.learning_rate, weight_decay=1e-4, statistics_every=t1,
            inverse_root_every=t2))
  runs = {name: [] for name in configs}
  for seed in (int(s) for s in args.seeds.split(",")):
    data = compare.load_digits_split(seed)
    for name, make in configs.items():
      runs[name].append(train(make(), data, args.steps, seed, 64))
    target = float(np.mean(runs["adamw"][-1]["losses"][-SMOOTH:]))
    base, _ = time_to_target(runs["adamw"][-1], target)
    for name in configs:
      seconds, at = time_to_target(runs[name][-1], target)
      runs[name][-1].update(
          target=target, time_to_target_s=seconds, at_step=at,
          time_to_target_ratio=None if seconds is None else seconds / base)
  rows = []
  for name, results in runs.items():
    ratios = [r["time_to_target_ratio"] for r in results]
    times = np.concatenate([r["step_s"][5:] for r in results])
    rows.append([
        name,
        float(np.mean([np.mean(r["losses"][-SMOOTH:]) for r in results])),
        float(np.mean([r["accuracy"] for r in results])),
        f"{1e3 * np.median(times):.2f} / {1e3 * np.mean(times):.2f}",
        " ".join("—" if x is None else f"{x:.2f}" for x in ratios),
        " ".join(str(r["at_step"]) for r in results)
    ])
  common.print_table(f"Digits CNN, {args.steps} steps, seeds {args.seeds}", [
      "optimizer", "final loss", "test acc", "ms/step median / mean",
      "time to AdamW's loss (× AdamW, per seed)", "at step"
  ], rows)
  path = common.write_json("intervals_cnn", {"args": vars(args), "runs": runs})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
