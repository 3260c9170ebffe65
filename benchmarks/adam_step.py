"""Step time and state memory of optax.adamw vs 4-bit / 8-bit AdamW on GPT-2-medium shapes (355M params).

Run: ``PYTHONPATH=. python benchmarks/adam_step.py [--profile]``. The step is update + apply_updates,
jitted with the params and state donated, as in a training loop, timed two ways: blocking on every step
(median), and 20 steps dispatched back to back (what a training loop sees: the host dispatches a step
while the device runs the previous one; the 4-bit states have ~3× as many leaves to dispatch). Every 4-bit configuration the fused
kernels cover is timed twice: through XLA (the default) and with the experimental Pallas kernels
(``implementation="pallas"``). A second table checks that both paths compute the same
step on these shapes (update difference, fraction of differing stored codes). ``--profile`` adds the device
time per kernel of the default 4-bit step (jax.profiler trace).
"""

import argparse
import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from benchmarks.shampoo_step import pipelined_step_time, time_step
from optax_shampoo4 import adamw_4bit, adamw_4bit_fused
from optax_shampoo4.quantization import unpack_nibbles


def _run(tx, params, grads, steps):
  state, update = tx.init(params), None
  for step in range(steps):
    update, state = jax.jit(tx.update)(jax.tree.map(lambda x: x * (1.0 + step), grads), state, params)
  return update, state


def _compare(a_tree, b_tree):
  """Worst relative update difference (leaf, value, where, the two values) and differing state bytes."""
  (a_update, a_state), (b_update, b_state) = a_tree, b_tree
  worst = (0.0, "-", "-", "-")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(a_update), jax.tree.leaves(b_update)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    difference = np.where(np.isfinite(a) & np.isfinite(b), np.abs(a - b), np.inf)
    error = float(difference.max() / max(np.abs(b).max(), 1e-30))
    if error > worst[0]:
      at = np.unravel_index(np.argmax(difference), a.shape)
      worst = (error, jax.tree_util.keystr(path), str(tuple(int(i) for i in at)), f"{a[at]:.3g} vs {b[at]:.3g}")
  differing = total = largest_step = 0
  for a, b in zip(jax.tree.leaves(a_state), jax.tree.leaves(b_state)):
    a, b = np.asarray(a), np.asarray(b)
    differing += int(np.sum(a != b))
    total += a.size
    if a.dtype == np.uint8:  # packed codes: how many code steps apart the two paths are
      codes = [np.asarray(unpack_nibbles(x, 2 * x.shape[-1]), int) for x in (a, b)]
      largest_step = max(largest_step, int(np.abs(codes[0] - codes[1]).max()))
  return [*worst, differing / total, largest_step]


def agreement(params, grads, second_moment, steps=3):
  """Kernels (compiled, and through the Pallas interpreter) vs the XLA path after ``steps`` steps."""
  from optax_shampoo4 import adam_kernel
  runs = {"xla": _run(adamw_4bit(1e-3, second_moment=second_moment), params, grads, steps),
          "pallas": _run(adamw_4bit(1e-3, second_moment=second_moment, implementation="pallas"), params, grads,
                         steps)}
  adam_kernel.FORCE_INTERPRET = True
  try:
    runs["interpreted"] = _run(adamw_4bit(1e-3, second_moment=second_moment, implementation="pallas"), params,
                               grads, steps)
  finally:
    adam_kernel.FORCE_INTERPRET = False
  rows = [[second_moment, f"{a} vs {b}", *_compare(runs[a], runs[b])]
          for a, b in (("pallas", "xla"), ("interpreted", "xla"), ("pallas", "interpreted"))]
  return rows + [[second_moment, "fused step vs update + apply_updates (params)",
                  *_compare_fused(params, grads, second_moment, steps)]]


def _compare_fused(params, grads, second_moment, steps):
  """The params after ``steps`` fused steps vs after as many ``update`` + ``apply_updates`` steps."""
  from benchmarks.shampoo_step import step_program
  fused = adamw_4bit_fused(1e-3, second_moment=second_moment)
  plain = adamw_4bit(1e-3, second_moment=second_moment, implementation="pallas")
  results = []
  for tx in (fused, plain):
    step, carry = step_program(tx), [jax.tree.map(jnp.copy, params), tx.init(params)]
    for t in range(steps):
      carry = list(step(carry[0], carry[1], jax.tree.map(lambda x: x * (1.0 + t), grads)))
    results.append(carry)
  moved = lambda p: jax.tree.map(lambda a, b: a - b, p, params)  # compare the steps taken, not the params
  return _compare((moved(results[0][0]), results[0][1]), (moved(results[1][0]), results[1][1]))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--profile", action="store_true")
  parser.add_argument("--skip-agreement", action="store_true")
  parser.add_argument("--agreement-only", action="store_true", help="only the kernels-vs-XLA check")
  parser.add_argument("--skip-slow-baselines", action="store_true",
                      help="leave out factored and 8-bit (the 8-bit decode's gather takes minutes to compile)")
  args = parser.parse_args()
  shapes = common.gpt2_medium_shapes()
  n = common.parameter_count(shapes)
  params = common.random_tree(shapes, seed=1)
  grads = common.random_tree(shapes, seed=2)
  optimizers = {"optax.adamw": optax.adamw(1e-3)}
  for second_moment in ("rank1", "block"):
    optimizers[f"adamw_4bit {second_moment}"] = adamw_4bit(1e-3, second_moment=second_moment)
    optimizers[f"adamw_4bit {second_moment}, Pallas kernels"] = adamw_4bit(
        1e-3, second_moment=second_moment, implementation="pallas")
    optimizers[f"adamw_4bit_fused {second_moment}"] = adamw_4bit_fused(1e-3, second_moment=second_moment)
  if not args.skip_slow_baselines:
    optimizers["adamw_4bit factored"] = adamw_4bit(1e-3, second_moment="factored")
    optimizers["adamw 8-bit (block 256)"] = adamw_4bit(1e-3, bits=8, second_moment="block")
  rows, results, tables = [], {}, []
  for name, tx in ({} if args.agreement_only else optimizers).items():
    seconds, nbytes = time_step(tx, params, grads, args.repeats)
    pipelined = pipelined_step_time(tx, params, grads)
    results[name] = {"step_s": seconds, "pipelined_step_s": pipelined, "state_bytes": nbytes}
    print(f"{name}: {seconds * 1e3:.3f} ms/step, {pipelined * 1e3:.3f} pipelined, {nbytes / 2**20:.1f} MiB",
          flush=True)
  base = results.get("optax.adamw")
  for name, r in results.items():
    rows.append([name, r["step_s"] * 1e3, r["step_s"] / base["step_s"], r["pipelined_step_s"] * 1e3,
                 r["pipelined_step_s"] / base["pipelined_step_s"], r["state_bytes"] / 2**20, r["state_bytes"] / n])
  tables += [] if args.agreement_only else [common.print_table(f"AdamW step, GPT-2 medium shapes ({n / 1e6:.0f}M params, {common.machine()})",
                               ["optimizer", "ms/step (blocked)", "x optax.adamw", "ms/step (pipelined)",
                                "x optax.adamw ", "state MiB", "state B/param"], rows)]
  # the embedding and two blocks: every leaf shape of the model, at a fraction of the interpreter's cost
  subset = lambda tree: {k: v for k, v in tree.items() if k.split(".")[0] in ("wte", "h0", "h1")}
  rows = []
  for second_moment in () if args.skip_agreement else ("rank1", "block"):
    rows += agreement(subset(params), subset(grads), second_moment)
    print(rows[-3:], flush=True)
  tables.append(common.print_table(
      "Pallas kernels (Triton, and the Pallas interpreter) vs the XLA path after 3 steps (wte, h0, h1)",
      ["second moment", "paths", "max |Δ update| / max |update|", "worst leaf", "at", "values",
       "differing state bytes", "largest code step"], rows))
  payload = {"results": results, "params": n, "agreement": rows}
  if args.profile:
    from benchmarks.profile import device_times, summarize
    from benchmarks.shampoo_step import step_program
    for name in ("optax.adamw", "adamw_4bit block, Pallas kernels", "adamw_4bit_fused block", "adamw_4bit_fused rank1"):
      step = step_program(optimizers[name])
      carry = [jax.tree.map(jnp.copy, params), optimizers[name].init(params)]

      def run():
        carry[0], carry[1] = step(carry[0], carry[1], grads)
        return carry[1]

      launches = collections.Counter()
      per_op, _ = device_times(run, launches=launches)
      new_tables, payload[f"profile {name}"] = summarize(name, per_op, 12, launches)
      with open(common.output_path(common.file_name(f"hlo_adam_step_{name}.txt")), "w") as f:
        f.write(step.lower(carry[0], carry[1], grads).compile().as_text())
      tables += new_tables
  common.write_json("adam_step_agreement" if args.agreement_only else "adam_step", {**payload, "tables": tables})


if __name__ == "__main__":
  main()
