"""How far the host runs ahead of the GPU in a loop of jitted steps that it
does not wait for, with nothing of this library in it (GPU).

    python benchmarks/dispatch.py [--steps 30] [--matmuls 40]

The step multiplies a stack of four 4096 × 4096 matrices ``--matmuls`` times
(about 70 ms on an H100) and adds one to the rest of its state. Each variant
runs ``--steps`` calls without waiting for any and records when each call
returns. The first calls return at once, while the runtime queues them; once
its queue is full, each call returns when a step before it finishes, so a
steady-state call takes about a step's time although the host is that many
steps ahead. The table gives how many calls were queued (those that returned
in under half a step), the median return of the rest, and the mean time per
step: with the state donated or not, the step's input on the device or in host
memory, 600 more state leaves, and the loss written into the donated state
instead of returned. Prints a table and writes ``dispatch.json``.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common


def step(matmuls: int, loss_in_state: bool):
  """A step of ``matmuls`` products on ``state["a"]``, the rest incremented.

  With ``loss_in_state`` the loss is written into the state instead of being
  returned, so a donated state leaves the step no output of its own.
  """

  def fn(state, x):
    a = state["a"]
    for _ in range(matmuls):
      a = jnp.tanh(a @ a * 1e-3 + x.mean())
    rest = jax.tree.map(lambda r: r + 1.0, state["rest"])
    if loss_in_state:
      return {"a": a, "rest": rest, "loss": a.sum()}
    return {"a": a, "rest": rest}, a.sum()

  return fn


def call_returns(matmuls: int, loss_in_state: bool, donate: bool,
                 on_device: bool, leaves: int, steps: int):
  """``(ms until each call returned, ms per step)``."""
  jitted = jax.jit(
      step(matmuls, loss_in_state), donate_argnums=(0,) if donate else ())
  state = {
      "a":
          jnp.full((4, 4096, 4096), 0.01),
      "rest": [jnp.zeros(
          (64, 1024, 1024))] + [jnp.zeros(1000) for _ in range(leaves)]
  }
  if loss_in_state:
    state["loss"] = jnp.zeros(())
  host_x = np.ones((128, 256), np.float32)
  x = jax.device_put(host_x) if on_device else host_x
  compiled = jitted.lower(state, x).compile()
  call = lambda s: (compiled(s, x), None) if loss_in_state else compiled(s, x)
  state, _ = call(state)
  jax.block_until_ready(state)
  returns = []
  start = time.perf_counter()
  for _ in range(steps):
    began = time.perf_counter()
    state, _ = call(state)
    returns.append(1e3 * (time.perf_counter() - began))
  jax.block_until_ready(state)
  return returns, 1e3 * (time.perf_counter() - start) / steps


def summary(returns: list[float], step_ms: float) -> dict:
  """Calls queued (returned in under half a step) and the rest's median."""
  queued = next((i for i, r in enumerate(returns) if r > step_ms / 2),
                len(returns))
  rest = returns[queued:]
  return dict(calls_queued=queued,
              queued_call_ms_max=max(returns[:queued], default=None),
              later_call_returns_ms=float(np.median(rest)) if rest else None,
              step_ms=step_ms, call_returns_ms_each=returns)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--matmuls", type=int, default=40)
  args = parser.parse_args()
  variants = [(False, donate, on_device, 0)
              for donate in (True, False)
              for on_device in (True, False)]
  variants += [(False, True, True, 600), (False, False, True, 600)]
  variants += [(True, True, True, 0)]
  rows = []
  for loss_in_state, donate, on_device, leaves in variants:
    returns, step_ms = call_returns(args.matmuls, loss_in_state, donate,
                                    on_device, leaves, args.steps)
    rows.append(
        dict(loss_in_state=loss_in_state, donate=donate,
             input_on_device=on_device, extra_leaves=leaves,
             **summary(returns, step_ms)))
  header = ("loss in the state", "state donated", "input on device",
            "extra state leaves", "calls queued", "slowest queued call, ms",
            "later calls return after, ms", "ms per step")
  print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  fmt = lambda v: "—" if v is None else f"{v:.1f}"
  for r in rows:
    print(f"| {r['loss_in_state']} | {r['donate']} | {r['input_on_device']} | "
          f"{r['extra_leaves']} | {r['calls_queued']} | "
          f"{fmt(r['queued_call_ms_max'])} | "
          f"{fmt(r['later_call_returns_ms'])} | {r['step_ms']:.1f} |")
  common.write_json(
      "dispatch", {
          "rows": rows,
          "jax": jax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", "")
      })


if __name__ == "__main__":
  main()
