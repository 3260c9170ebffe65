"""How long the call of a jitted step keeps the host, with nothing of this
library in it (GPU).

    python benchmarks/dispatch.py [--steps 30] [--matmuls 40]

The step multiplies a stack of four 4096 × 4096 matrices ``--matmuls`` times
(about 70 ms on an H100) and adds one to the rest of its state. Each variant
runs ``--steps`` calls without waiting for any, and reports the median time
until a call returns and the mean time per step: with the state donated or
not, the step's input on the device or in host memory, and 600 more state
leaves. Prints a table and writes ``dispatch.json``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common


def step(matmuls: int):
  """A step of ``matmuls`` products on ``state["a"]``, the rest incremented."""

  def fn(state, x):
    a = state["a"]
    for _ in range(matmuls):
      a = jnp.tanh(a @ a * 1e-3 + x.mean())
    rest = jax.tree.map(lambda r: r + 1.0, state["rest"])
    return {"a": a, "rest": rest}, a.sum()

  return fn


def measure(fn, donate: bool, on_device: bool, leaves: int, steps: int):
  """``(ms until a call returns (median), ms per step)``."""
  jitted = jax.jit(fn, donate_argnums=(0,) if donate else ())
  state = {
      "a":
          jnp.full((4, 4096, 4096), 0.01),
      "rest": [jnp.zeros(
          (64, 1024, 1024))] + [jnp.zeros(1000) for _ in range(leaves)]
  }
  host_x = np.ones((128, 256), np.float32)
  x = jax.device_put(host_x) if on_device else host_x
  compiled = jitted.lower(state, x).compile()
  state, loss = compiled(state, x)
  jax.block_until_ready(loss)
  returns = []
  start = time.perf_counter()
  for _ in range(steps):
    call = time.perf_counter()
    state, loss = compiled(state, x)
    returns.append(time.perf_counter() - call)
  jax.block_until_ready(loss)
  return (1e3 * float(np.median(returns)),
          1e3 * (time.perf_counter() - start) / steps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--matmuls", type=int, default=40)
  args = parser.parse_args()
  fn = step(args.matmuls)
  variants = [(donate, on_device, 0)
              for donate in (True, False)
              for on_device in (True, False)]
  variants += [(True, True, 600), (False, True, 600)]
  rows = []
  for donate, on_device, leaves in variants:
    returned, per_step = measure(fn, donate, on_device, leaves, args.steps)
    rows.append(
        dict(donate=donate, input_on_device=on_device, extra_leaves=leaves,
             call_returns_ms=returned, step_ms=per_step))
  header = ("state donated", "input on device", "extra state leaves",
            "call returns after, ms", "ms per step")
  print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  for r in rows:
    print(f"| {r['donate']} | {r['input_on_device']} | {r['extra_leaves']} | "
          f"{r['call_returns_ms']:.1f} | {r['step_ms']:.1f} |")
  common.write_json("dispatch", {"rows": rows, "jax": jax.__version__})


if __name__ == "__main__":
  main()
