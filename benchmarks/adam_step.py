"""Step time and state memory of optax.adamw vs 4-bit / 8-bit AdamW on
GPT-2-medium shapes (355M params).

Run: ``PYTHONPATH=. python benchmarks/adam_step.py [--profile]``. The step is
update + apply_updates, jitted with the params and state donated, as in a
training loop, timed two ways: blocking on every step (median), and 20 steps
dispatched back to back (median of 3 such loops) (what a training loop sees: the
host dispatches a step while the device runs the previous one; the host's work
grows with the arrays passed in and out: a per-tensor 4-bit state has ~1.5× as
many as optax.adamw's, a packed one a handful). Every 4-bit configuration the
fused kernels cover is timed twice: through XLA (the default) and with the
experimental Pallas kernels (``implementation="pallas"``). A second table checks
that both paths compute the same step on these shapes (update difference,
fraction of differing stored codes). ``--profile`` adds the device time per
kernel of the default 4-bit step (jax.profiler trace). ``--trace`` adds, per
optimizer, what bounds a loop of back-to-back steps (host time per call, garbage
collections, device busy time and gaps); ``--train-step TOKENS`` times whole
training steps (gradient of a synthetic loss + optimizer) and each optimizer's
share of them; ``--only "name;name"`` times a subset.
"""

import argparse
import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from benchmarks.pipeline_trace import pipeline_trace
from benchmarks.shampoo_step import pipelined_step_time, time_step
import optax_shampoo4 as o4
from optax_shampoo4 import adamw_4bit
from optax_shampoo4.moments import unpack_moments
from optax_shampoo4.quantization import unpack_nibbles


def _run(tx, params, grads, steps):
  state, update = tx.init(params), None
  for step in range(steps):
    update, state = jax.jit(tx.update)(jax.tree.map(lambda x: x * (1.0 + step),
                                                    grads), state, params)
  return update, state


def _compare(a_tree, b_tree):
  """Worst relative update difference (leaf, value, where, the two values) and
  differing state bytes."""
  (a_update, a_state), (b_update, b_state) = a_tree, b_tree
  worst = (0.0, "-", "-", "-")
  for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(a_update), jax.tree.leaves(b_update)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    difference = np.where(
        np.isfinite(a) & np.isfinite(b), np.abs(a - b), np.inf)
    error = float(difference.max() / max(np.abs(b).max(), 1e-30))
    if error > worst[0]:
      at = np.unravel_index(np.argmax(difference), a.shape)
      worst = (error, jax.tree_util.keystr(path),
               str(tuple(int(i) for i in at)), f"{a[at]:.3g} vs {b[at]:.3g}")
  differing = total = largest_step = 0
  for a, b in zip(jax.tree.leaves(a_state), jax.tree.leaves(b_state)):
    a, b = np.asarray(a), np.asarray(b)
    differing += int(np.sum(a != b))
    total += a.size
    # packed codes: how many code steps apart the two paths are
    if a.dtype == np.uint8:
      codes = [
          np.asarray(unpack_nibbles(x, 2 * x.shape[-1]), int) for x in (a, b)
      ]
      largest_step = max(largest_step, int(np.abs(codes[0] - codes[1]).max()))
  return [*worst, differing / total, largest_step]


def agreement(params, grads, second_moment, steps=3):
  """Kernels (compiled, and through the Pallas interpreter) vs the XLA path
  after ``steps`` steps."""
  from optax_shampoo4 import adam_kernel
  runs = {
      "xla":
          _run(
              adamw_4bit(1e-3,
                         config=o4.AdamConfig(second_moment=second_moment)),
              params, grads, steps),
      "pallas":
          _run(
              adamw_4bit(
                  1e-3, config=o4.AdamConfig(second_moment=second_moment,
                                             implementation="pallas")), params,
              grads, steps)
  }
  adam_kernel.FORCE_INTERPRET = True
  try:
    runs["interpreted"] = _run(
        adamw_4bit(
            1e-3, config=o4.AdamConfig(second_moment=second_moment,
                                       implementation="pallas")), params, grads,
        steps)
  finally:
    adam_kernel.FORCE_INTERPRET = False
  rows = [[second_moment, f"{a} vs {b}", *_compare(runs[a], runs[b])]
          for a, b in (("pallas", "xla"), ("interpreted", "xla"),
                       ("pallas", "interpreted"))]
  return rows + [[
      second_moment, "fused step vs update + apply_updates (params)",
      *_compare_fused(params, grads, second_moment, steps)
  ]]


def _compare_fused(params, grads, second_moment, steps):
  """The params after ``steps`` fused steps vs after as many ``update`` +
  ``apply_updates`` steps."""
  from benchmarks.shampoo_step import step_program
  fused = common.fused_adamw_4bit(1e-3, second_moment)
  plain = adamw_4bit(
      1e-3, config=o4.AdamConfig(second_moment=second_moment,
                                 implementation="pallas"))
  results = []
  for tx in (fused, plain):
    step, carry = step_program(tx), [
        jax.tree.map(jnp.copy, params),
        tx.init(params)
    ]
    for t in range(steps):
      carry = list(
          step(carry[0], carry[1], jax.tree.map(lambda x: x * (1.0 + t),
                                                grads)))
    results.append(carry)
  # compare the steps taken, not the params
  moved = lambda p: jax.tree.map(lambda a, b: a - b, p, params)
  return _compare((moved(results[0][0]), unpack_moments(results[0][1])),
                  (moved(results[1][0]), results[1][1]))


def synthetic_loss(params, inputs):
  """A loss whose gradient costs about what a transformer's backward pass does
  per parameter: every matrix ``(in, out)`` multiplies an activation ``(tokens,
  in)``; the loss is the mean square of the products."""
  total = 0.0
  for w in params.values():
    if w.ndim == 2:
      total += jnp.mean(jnp.square(inputs[w.shape[0]] @ w))
    else:
      total += 1e-3 * jnp.sum(jnp.square(w))
  return total


def train_step_times(optimizers, params, tokens: int, steps: int = 20,
                     repeats: int = 3):
  """Seconds per training step (gradient of :func:`synthetic_loss` + optimizer,
  one jitted program, params and state donated, ``steps`` steps back to back,
  median of ``repeats`` loops) for each optimizer, and for ``optax.sgd`` (the
  cheapest update: its time minus sgd's is the optimizer's share of the
  step)."""
  sizes = sorted({w.shape[0] for w in params.values() if w.ndim == 2})
  normal = lambda n: jax.random.normal(jax.random.PRNGKey(n), (tokens, n))
  inputs = {n: normal(n) / np.sqrt(n) for n in sizes}
  times = {}
  for name, tx in {"optax.sgd": optax.sgd(1e-3), **optimizers}.items():

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, state, batch, tx=tx):
      grads = jax.grad(synthetic_loss)(p, batch)
      if isinstance(tx, common.FusedRow):
        return tx.step(grads, state, p)
      updates, state = tx.update(grads, state, p)
      return optax.apply_updates(p, updates), state

    times[name] = pipelined_step_time(tx, params, inputs, steps, repeats,
                                      step=step)
    print(f"train step with {name}: {times[name] * 1e3:.3f} ms", flush=True)
  return times


def parse_args(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--profile", action="store_true")
  parser.add_argument("--skip-agreement", action="store_true")
  parser.add_argument("--agreement-only", action="store_true",
                      help="only the kernels-vs-XLA check")
  parser.add_argument(
      "--trace", action="store_true",
      help="also trace a loop of back-to-back steps per optimizer: host "
      "dispatch vs device busy time")
  parser.add_argument(
      "--train-step", type=int, default=0, metavar="TOKENS",
      help="also time whole training steps (gradient of a synthetic loss over "
      "TOKENS tokens + "
      "optimizer) per optimizer")
  parser.add_argument(
      "--only", default="",
      help="semicolon-separated optimizer names to time besides optax.adamw "
      "(default: all)")
  parser.add_argument(
      "--skip-slow-baselines", action="store_true",
      help="leave out factored and 8-bit (the 8-bit decode's gather takes "
      "minutes to compile)")
  return parser.parse_args(argv)


def make_optimizers(args):
  """name -> optimizer (a GradientTransformation or a common.FusedRow)."""
  optimizers = {"optax.adamw": optax.adamw(1e-3)}
  for second_moment in ("rank1", "block"):
    optimizers[f"adamw_4bit {second_moment}"] = adamw_4bit(
        1e-3, config=o4.AdamConfig(second_moment=second_moment))
    optimizers[f"adamw_4bit {second_moment}, Pallas kernels"] = adamw_4bit(
        1e-3, config=o4.AdamConfig(second_moment=second_moment,
                                   implementation="pallas"))
    optimizers[
        f"fused_step(adamw_4bit {second_moment})"] = common.fused_adamw_4bit(
            1e-3, second_moment)
  # the same step on the per-tensor state layout (block: packed by default;
  # rank-1 has only this layout)
  optimizers["fused_step(adamw_4bit block), per-tensor "
             "state"] = common.fused_adamw_4bit(1e-3, "block", packed=False)
  if not args.skip_slow_baselines:
    optimizers["adamw_4bit factored"] = adamw_4bit(
        1e-3, config=o4.AdamConfig(second_moment="factored"))
    optimizers["adamw 8-bit (block 256)"] = adamw_4bit(
        1e-3, config=o4.AdamConfig(bits=8, second_moment="block"))
  if args.only:
    wanted = args.only.split(";") + ["optax.adamw"]
    optimizers = {k: v for k, v in optimizers.items() if k in wanted}
  return optimizers


def time_optimizers(optimizers, params, grads, args):
  """name -> blocked and pipelined step seconds, state bytes and arrays (and
  ``pipeline_trace`` with ``--trace``)."""
  results = {}
  for name, tx in optimizers.items():
    seconds, nbytes = time_step(tx, params, grads, args.repeats)
    pipelined = pipelined_step_time(tx, params, grads)
    results[name] = {
        "step_s": seconds,
        "pipelined_step_s": pipelined,
        "state_bytes": nbytes,
        "state_arrays": len(jax.tree.leaves(jax.eval_shape(tx.init, params)))
    }
    if args.trace:
      results[name]["trace"] = pipeline_trace(tx, params, grads)
      print(name, results[name]["trace"], flush=True)
    print(
        f"{name}: {seconds * 1e3:.3f} ms/step, {pipelined * 1e3:.3f} "
        f"pipelined, {nbytes / 2**20:.1f} MiB", flush=True)
  return results


def step_table(results, n: int) -> str:
  base = results["optax.adamw"]
  rows = [[
      name, r["step_s"] * 1e3, r["step_s"] / base["step_s"],
      r["pipelined_step_s"] * 1e3,
      r["pipelined_step_s"] / base["pipelined_step_s"],
      r["state_bytes"] / 2**20, r["state_bytes"] / n, r["state_arrays"]
  ] for name, r in results.items()]
  return common.print_table(
      f"AdamW step, GPT-2 medium shapes ({n / 1e6:.0f}M params, "
      f"{common.machine()})", [
          "optimizer", "ms/step (blocked)", "x optax.adamw",
          "ms/step (pipelined)", "x optax.adamw ", "state MiB", "state B/param",
          "state arrays"
      ], rows)


def train_step_table(optimizers, params, tokens: int):
  """``(payload, table)`` of whole training steps over ``tokens`` tokens."""
  times = train_step_times(optimizers, params, tokens)
  share = lambda t: t - times["optax.sgd"]
  base = times["optax.adamw"]
  table = common.print_table(
      f"Training step (gradient over {tokens} tokens + "
      "optimizer, pipelined), GPT-2 medium shapes", [
          "optimizer", "train step ms", "x optax.adamw",
          "optimizer share ms (step - sgd step)", "x optax.adamw "
      ], [[name, t * 1e3, t / base,
           share(t) * 1e3,
           share(t) / share(base)] for name, t in times.items()])
  return {"tokens": tokens, "step_s": times}, table


def agreement_table(params, grads, second_moments):
  """``(rows, table)`` of the kernels against the XLA path on the embedding
  and two blocks: every leaf shape of the model, at a fraction of the
  interpreter's cost."""
  subset = lambda tree: {
      k: v for k, v in tree.items() if k.split(".")[0] in ("wte", "h0", "h1")
  }
  rows = []
  for second_moment in second_moments:
    rows += agreement(subset(params), subset(grads), second_moment)
    print(rows[-3:], flush=True)
  return rows, common.print_table(
      "Pallas kernels (Triton, and the Pallas interpreter) vs the XLA path "
      "after 3 steps (wte, h0, h1)", [
          "second moment", "paths", "max |Δ update| / max |update|",
          "worst leaf", "at", "values", "differing state bytes",
          "largest code step"
      ], rows)


PROFILED = ("optax.adamw", "adamw_4bit block, Pallas kernels",
            "fused_step(adamw_4bit block)",
            "fused_step(adamw_4bit block), per-tensor state",
            "fused_step(adamw_4bit rank1)")


def profile_optimizers(optimizers, params, grads):
  """``(payload, tables)``: device time per op of one step of each of
  :data:`PROFILED`; each compiled step's HLO is written next to the JSON."""
  from benchmarks.profile import device_times, summarize
  from benchmarks.shampoo_step import step_program
  payload, tables = {}, []
  for name in (n for n in PROFILED if n in optimizers):
    step = step_program(optimizers[name])
    carry = [jax.tree.map(jnp.copy, params), optimizers[name].init(params)]

    def run():
      carry[0], carry[1] = step(carry[0], carry[1], grads)
      return carry[1]

    launches = collections.Counter()
    per_op, _ = device_times(run, launches=launches)
    new_tables, payload[f"profile {name}"] = summarize(name, per_op, 12,
                                                       launches)
    with open(
        common.output_path(common.file_name(f"hlo_adam_step_{name}.txt")),
        "w") as f:
      f.write(step.lower(carry[0], carry[1], grads).compile().as_text())
    tables += new_tables
  return payload, tables


def main(argv=None):
  args = parse_args(argv)
  shapes = common.gpt2_medium_shapes()
  n = common.parameter_count(shapes)
  params = common.random_tree(shapes, seed=1)
  grads = common.random_tree(shapes, seed=2)
  optimizers = make_optimizers(args)
  payload, tables = {"params": n}, []
  if not args.agreement_only:
    payload["results"] = time_optimizers(optimizers, params, grads, args)
    tables.append(step_table(payload["results"], n))
  if args.train_step:
    payload["train_step"], table = train_step_table(
        {
            k: v for k, v in optimizers.items() if k in payload["results"]
        }, params, args.train_step)
    tables.append(table)
  payload["agreement"], table = agreement_table(params, grads,
                                                () if args.skip_agreement else
                                                ("rank1", "block"))
  tables.append(table)
  if args.profile:
    profiled, profile_tables = profile_optimizers(optimizers, params, grads)
    payload.update(profiled)
    tables += profile_tables
  common.write_json(
      "adam_step_agreement" if args.agreement_only else "adam_step", {
          **payload, "tables": tables
      })


if __name__ == "__main__":
  main()
