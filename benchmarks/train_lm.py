"""Whole training runs of a Flax byte-level GPT: AdamW against Shampoo, all-4-bit and SOAP, side by side (GPU).

    python benchmarks/train_lm.py [--steps 1200] [--size base] [--out benchmarks/results/train_lm]

The model is ``examples/lm.py``'s transformer (Flax ``MultiHeadDotProductAttention``, bf16 compute, fp32
params; ``--size base``: 85.6 M parameters, 12 layers, width 768, 12 heads, context 256, batch 32) trained
on the Python standard library's sources with a warmup-cosine learning rate, b2 0.95, weight decay 0.1.
Every optimizer runs in its own process, so that ``memory_stats()["peak_bytes_in_use"]`` is its own. Per
optimizer: final train loss (mean of the last 50 steps), held-out loss, median and mean ms per step
(each step waited for), wall-clock to reach the best AdamW final loss (50-step running mean of the
train loss, compile excluded), optimizer-state bytes, peak GPU bytes, the compiled step's temp bytes
(``memory_analysis()``) and its compile time. Prints a table, writes ``results.json`` and
``loss_vs_time.png`` (with matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
SMOOTH = 50


def optimizers(args):
  """name -> factory of the optimizer given a schedule (built in the child process)."""
  import optax
  import optax_shampoo4 as o4
  intervals = dict(statistics_every=args.statistics_every, inverse_root_every=args.inverse_root_every)
  adamw = lambda s: optax.adamw(s, b2=0.95, weight_decay=0.1)
  shampoo = lambda **kw: (lambda s: o4.shampoo_adamw(s, b2=0.95, weight_decay=0.1, **intervals, **kw))
  soap = lambda s, **kw: o4.soap(s, b2=0.95, weight_decay=0.1, precondition_every=args.precondition_every, **kw)
  return {"adamw lr 1e-3": (1e-3, adamw), "adamw lr 2e-3": (2e-3, adamw),
          "shampoo 4-bit": (args.lr, shampoo()),
          "shampoo 32-bit": (args.lr, shampoo(shampoo=o4.ShampooConfig(bits=32))),
          "shampoo all-4-bit": (args.lr, shampoo(adam=o4.AdamConfig())),
          "shampoo 4-bit, 100/500": (args.lr, lambda s: o4.shampoo_adamw(s, b2=0.95, weight_decay=0.1, statistics_every=100, inverse_root_every=500)),
          "soap 4-bit lr 3e-3": (3e-3, soap),
          "soap 4-bit lr 1e-3": (1e-3, soap),
          "soap 32-bit lr 3e-3": (3e-3, lambda s: soap(s, config=o4.ShampooConfig(bits=32), moments=o4.AdamConfig(bits=32)))}


def run_one(name, args):
  import jax
  import jax.numpy as jnp
  import optax
  from flax.training import train_state
  import lm
  import optax_shampoo4 as o4

  size = lm.SIZES[args.size]
  train, held_out = lm.load_corpus(args.max_bytes)
  model = lm.ByteTransformer(size["width"], size["layers"], size["heads"], size["context"], jnp.bfloat16)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size["context"]), jnp.int32))["params"]
  peak, factory = optimizers(args)[name]
  schedule = optax.warmup_cosine_decay_schedule(0.0, peak, args.steps // 10, args.steps, peak / 10)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=factory(schedule))

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, x, y)
    return state.apply_gradients(grads=grads), loss

  rng = np.random.default_rng(0)
  x, y = lm.batches(train, size["context"], size["batch"], rng)
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state, x, y).compile()
  compile_s = time.perf_counter() - start
  temp_bytes = compiled.memory_analysis().temp_size_in_bytes
  losses, times = [], []
  for _ in range(args.steps):
    x, y = lm.batches(train, size["context"], size["batch"], rng)
    start = time.perf_counter()
    state, loss = compiled(state, x, y)
    losses.append(float(loss))  # waits for the step
    times.append(time.perf_counter() - start)
  evaluate = jax.jit(loss_fn)
  eval_rng = np.random.default_rng(1234)
  held = [float(evaluate(state.params, *lm.batches(held_out, size["context"], size["batch"], eval_rng)))
          for _ in range(16)]
  stats = jax.devices()[0].memory_stats() or {}
  return {"name": name, "params": int(sum(p.size for p in jax.tree.leaves(params))),
          "final_loss": float(np.mean(losses[-SMOOTH:])), "held_out_loss": float(np.mean(held)),
          "ms_median": 1e3 * float(np.median(times[5:])), "ms_mean": 1e3 * float(np.mean(times[5:])),
          "state_bytes": int(o4.state_nbytes(state.opt_state)), "peak_bytes": int(stats.get("peak_bytes_in_use", 0)),
          "temp_bytes": int(temp_bytes), "compile_s": compile_s, "losses": losses, "step_s": times,
          "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}


def time_to_target(result, target):
  smooth = np.convolve(result["losses"], np.ones(SMOOTH) / SMOOTH, mode="valid")
  elapsed = np.cumsum(result["step_s"])[SMOOTH - 1:]
  hit = np.nonzero(smooth <= target)[0]
  return (float(elapsed[hit[0]]), int(hit[0] + SMOOTH)) if len(hit) else (None, None)


def summarize(results, out):
  adamw = [r for r in results if r["name"].startswith("adamw")]
  best = min(adamw, key=lambda r: r["final_loss"])
  target, (base_time, _) = best["final_loss"], time_to_target(best, best["final_loss"])
  rows = []
  print(f"\n{results[0]['params'] / 1e6:.1f} M params on {results[0]['device']}, jax {results[0]['jax']}; "
        f"target = {best['name']}'s final loss {target:.4f}")
  header = ("optimizer", "final loss", "held-out", "ms/step med / mean", "time to target (× best adamw)",
            "state MiB", "peak GiB (× adamw)", "temp GiB", "compile s (× adamw)")
  print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  ratio = lambda a, b: f"{a / b:.2f}×" if b else "n/a"
  for r in results:
    seconds, at_step = time_to_target(r, target)
    r["time_to_target_s"], r["time_to_target_ratio"] = seconds, (seconds / base_time if seconds and base_time else None)
    reach = "not reached" if seconds is None else f"{seconds:.1f} s ({ratio(seconds, base_time)}, step {at_step})"
    cells = (r["name"], f"{r['final_loss']:.4f}", f"{r['held_out_loss']:.4f}",
             f"{r['ms_median']:.1f} / {r['ms_mean']:.1f}", reach, f"{r['state_bytes'] / 2**20:.0f}",
             f"{r['peak_bytes'] / 2**30:.2f} ({ratio(r['peak_bytes'], best['peak_bytes'])})",
             f"{r['temp_bytes'] / 2**30:.2f}", f"{r['compile_s']:.1f} ({ratio(r['compile_s'], best['compile_s'])})")
    rows.append(cells)
    print("| " + " | ".join(cells) + " |")
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"target": target, "results": results}, f)
  plot(results, out)


def plot(results, out):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in results:
    smooth = np.convolve(r["losses"], np.ones(SMOOTH) / SMOOTH, mode="valid")
    ax.plot(np.cumsum(r["step_s"])[SMOOTH - 1:], smooth, label=r["name"])
  ax.set(xlabel="wall-clock s (compile excluded)", ylabel=f"train loss ({SMOOTH}-step mean)", ylim=(None, 2.0))
  ax.legend()
  fig.savefig(os.path.join(out, "loss_vs_time.png"), dpi=120, bbox_inches="tight")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1200)
  parser.add_argument("--size", default="base")
  parser.add_argument("--max-bytes", type=int, default=8_000_000)
  parser.add_argument("--lr", type=float, default=1e-3, help="Shampoo's peak learning rate")
  parser.add_argument("--statistics-every", type=int, default=20)
  parser.add_argument("--inverse-root-every", type=int, default=100)
  parser.add_argument("--precondition-every", type=int, default=10, help="SOAP's basis interval")
  parser.add_argument("--only", default=None, help="';'-separated optimizer names (default: all); "
                      "results already in OUT/parts are reused")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--out", default="benchmarks/results/train_lm")
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(run_one(args.child, args)))
    return
  os.makedirs(args.out, exist_ok=True)
  names = args.only.split(";") if args.only else list(optimizers(args))
  results = []
  os.makedirs(os.path.join(args.out, "parts"), exist_ok=True)
  for name in names:
    part = os.path.join(args.out, "parts", re.sub(r"[^A-Za-z0-9.-]+", "_", name) + ".json")
    if os.path.exists(part):  # measured by an earlier call on this machine
      with open(part) as f:
        results.append(json.load(f))
      continue
    child = [sys.executable, os.path.abspath(__file__), "--child", name] + [
        a for a in (argv if argv is not None else sys.argv[1:])]
    done = subprocess.run(child, capture_output=True, text=True)
    if done.returncode:
      print(f"{name} failed:\n{done.stderr[-3000:]}", flush=True)
      continue
    results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    r = results[-1]
    with open(part, "w") as f:
      json.dump(r, f)
    print(f"{name}: loss {r['final_loss']:.4f}, {r['ms_median']:.1f} ms/step, compile {r['compile_s']:.0f} s, "
          f"peak {r['peak_bytes'] / 2**30:.2f} GiB", flush=True)
  summarize(results, args.out)


if __name__ == "__main__":
  main()
