"""Whole training runs of a Flax byte-level GPT: AdamW against Shampoo,
all-4-bit and SOAP, side by side (GPU).

    python benchmarks/train_lm.py [--steps 1200] [--size base] [--batch 32]
    [--out benchmarks/results/train_lm]

The model is ``examples/lm.py``'s transformer (Flax
``MultiHeadDotProductAttention``, bf16 compute, fp32 params; ``--size base``:
85.6 M parameters, 12 layers, width 768, 12 heads, context 256, batch 32)
trained on the Python standard library's sources with a warmup-cosine learning
rate, b2 0.95, weight decay 0.1. Every optimizer runs in its own process, so
that ``memory_stats()["peak_bytes_in_use"]`` is its own. Per optimizer: final
train loss (mean of the last 50 steps), held-out loss, median and mean ms per
step (each step waited for), ms per step of the 50 steps after the run in a
loop that does not wait for each (updates that fall due among them
included), wall-clock to reach the best AdamW final loss
(50-step running mean of the train loss, compile excluded), optimizer-state
bytes, peak GPU bytes, the compiled step's temp bytes (``memory_analysis()``)
and its compile time. Prints a table, writes ``results.json`` and
``loss_vs_time.png`` (with matplotlib). ``--devices 4``: data-parallel over 4
GPUs with params and optimizer state FSDP-sharded and Shampoo's / SOAP's stacks
spread over the devices; peak memory is the largest device's. A variant whose
name ends in ``, split step`` runs each step as two programs, the model's
gradient and the optimizer's update, and one ending in ``, split updates``
also runs each preconditioner update as a program of its own
(``train_lm_programs``).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
sys.path.insert(0, os.path.join(HERE, ".."))
# pylint: disable-next=wrong-import-position
from train_lm_report import SMOOTH, summarize
# pylint: disable-next=wrong-import-position
import train_lm_programs
# pylint: disable-next=wrong-import-position
from train_lm_variants import host_schedule, lookup, optimizers, split_of
# pylint: disable-next=wrong-import-position
from train_lm_options import parser
# steps of the loop that does not wait for each, after the run
FREE_RUNNING_STEPS = 50


def data_parallel(state, devices):
  """``(mesh, state sharding, batch sharding)`` over the first ``devices`` GPUs:
  the batch split over a ``"data"`` axis, params and optimizer state
  FSDP-sharded along it (first axis, where it divides)."""
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from optax_shampoo4.sharding import optimizer_state_sharding
  mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
  replicated = NamedSharding(mesh, P())
  rows = lambda p: NamedSharding(
      mesh,
      P("data") if p.ndim and p.shape[0] % devices == 0 else P())
  params_sharding = jax.tree.map(rows, state.params)
  opt_sharding = optimizer_state_sharding(state.opt_state, mesh, "data",
                                          params_sharding)
  return mesh, state.replace(step=replicated, params=params_sharding,
                             opt_state=opt_sharding), NamedSharding(
                                 mesh, P("data"))


class Setup(NamedTuple):
  """One optimizer's training run before its first step."""
  model: Any
  state: Any  # a flax TrainState
  corpus: Tuple[np.ndarray, np.ndarray]  # train and held-out bytes
  size: Dict[str, int]
  jit: Callable  # jax.jit with the state donated (and sharded), due static
  place: Callable  # puts a batch (x, y) where the step expects it
  # the loop puts the next batch on the device while a step runs
  prefetch: bool = False
  # step -> preconditioner_due, for a loop that schedules the updates
  schedule: Optional[Callable[[int], Tuple[bool, bool]]] = None


def setup(name, args) -> Setup:
  import jax
  import jax.numpy as jnp
  import optax
  from flax.training import train_state
  import lm
  import optax_shampoo4 as o4

  if split_of(name) and args.devices > 1:
    raise ValueError(f"{name!r}: a split step runs on one device")
  size = dict(lm.SIZES[args.size])
  size["batch"] = args.batch or size["batch"]
  model = lm.ByteTransformer(size["width"], size["layers"], size["heads"],
                             size["context"], jnp.bfloat16)
  params = model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size["context"]),
                                       jnp.int32))["params"]
  base = None
  # the stacks spread over the data axis, each device updating its share
  if args.devices > 1:
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    base = o4.ShampooConfig(
        shard_blocks=NamedSharding(
            Mesh(np.array(jax.devices()[:args.devices]), ("data",)), P("data")))
  peak, factory = lookup(name, args, base)
  schedule = optax.warmup_cosine_decay_schedule(0.0, peak, args.steps // 10,
                                                args.steps, peak / 10)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=factory(schedule))
  jit = lambda f: jax.jit(f, donate_argnums=0, static_argnames="due")
  place = lambda x, y: (x, y)  # the step's call copies it from host memory
  if args.prefetch:
    place = lambda x, y: jax.device_put((x, y))
  if args.devices > 1:
    _, state_sharding, batch_sharding = data_parallel(state, args.devices)
    state = jax.device_put(state, state_sharding)
    jit = lambda f: jax.jit(f, donate_argnums=0, static_argnames="due",
                            out_shardings=(state_sharding, None))
    place = lambda x, y: (jax.device_put(x, batch_sharding),
                          jax.device_put(y, batch_sharding))
  return Setup(model, state, lm.load_corpus(args.max_bytes), size, jit, place,
               args.prefetch, host_schedule(name, args))


def loss_function(model):
  import optax

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss_fn


def training_step(run: Setup):
  """``step(state, x, y, due=None) -> (state, loss)``: one gradient step of the
  run's model, before ``run.jit``; ``due``: the ``preconditioner_due`` it
  passes."""
  import jax
  import optax_shampoo4 as o4
  loss_fn = loss_function(run.model)

  def step(state, x, y, due=None):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, x, y)
    return o4.apply_scheduled_gradients(state, grads, due), loss

  return step


def batch(run: Setup, data, rng):
  import lm
  return run.place(
      *lm.batches(data, run.size["context"], run.size["batch"], rng))


def compile_programs(run: Setup, dues, xy, options=None, split=None):
  """``({due: compiled}, seconds)``: the programs of every distinct schedule
  entry (``train_lm_programs``), whole steps or, with ``split`` (``"step"`` or
  ``"updates"``), a gradient program and the optimizer's programs;
  ``options``: ``compile_scheduled``'s keywords, or None to compile one after
  the other."""
  if split:
    return train_lm_programs.compile_split(
        loss_function(run.model), run.state, dues, xy, options,
        apart=split == "updates")
  return train_lm_programs.compile_whole(
      run.jit(training_step(run)), run.state, dues, xy, options)


def train(run: Setup, steps: int, sync_every: int = 1, compile_with=None):
  """``(program_at, state, last batch, record)``: the run's steps, waited for
  every ``sync_every`` steps (a loop that logs its loss that often), its
  programs compiled by :func:`compile_programs` with the keywords
  ``compile_with``;
  ``program_at(step)`` is the compiled program of the 1-based step (up to
  ``steps + FREE_RUNNING_STEPS``); ``record`` has the losses, step seconds
  (each step of a block of ``sync_every`` its share of the block's time) and
  dispatch seconds (until the call returned, the step enqueued), and the
  compiles' seconds and largest temp bytes."""
  rng = np.random.default_rng(0)
  x, y = batch(run, run.corpus[0], rng)
  schedule = run.schedule or (lambda step: None)
  programs, compile_s = compile_programs(
      run, [schedule(s) for s in range(1, steps + FREE_RUNNING_STEPS + 1)],
      (x, y), **(compile_with or {}))
  record = dict(
      compile_s=sum(compile_s), compile_s_by_program=compile_s, temp_bytes=max(
          c.memory_analysis().temp_size_in_bytes for c in programs.values()),
      losses=[], step_s=[], dispatch=[])
  state, pending = run.state, []
  draw = lambda: batch(run, run.corpus[0], rng)
  upcoming = draw() if run.prefetch else None
  for step in range(1, steps + 1):
    x, y = upcoming if run.prefetch else draw()
    compiled = programs[schedule(step)]
    start = time.perf_counter()
    if not pending:  # the first step of a block
      block_start = start
    state, loss = compiled(state, x, y)
    record["dispatch"].append(time.perf_counter() - start)
    if run.prefetch and step < steps:  # the same draws, one step earlier
      upcoming = draw()
    pending.append(loss)
    if step % sync_every and step < steps:
      continue
    record["losses"] += [float(l) for l in pending]  # waits for the block
    elapsed = time.perf_counter() - block_start
    record["step_s"] += [elapsed / len(pending)] * len(pending)
    pending = []
  return lambda step: programs[schedule(step)], state, (x, y), record


def free_running_ms(program_at, first_step: int, state, xy):
  """``(state, ms per step)`` of the ``FREE_RUNNING_STEPS`` steps from
  ``first_step`` on (updates that fall due among them included), run as a
  training loop that does not wait for each step: the host runs ahead of the
  GPU unless the step makes it wait, as XLA:GPU's conditionals do."""
  import jax
  programs = [
      program_at(step)
      for step in range(first_step, first_step + FREE_RUNNING_STEPS)
  ]
  jax.block_until_ready(state)
  start = time.perf_counter()
  for compiled in programs:
    state, loss = compiled(state, *xy)
  jax.block_until_ready((state, loss))
  return state, 1e3 * (time.perf_counter() - start) / FREE_RUNNING_STEPS


def held_out_loss(run: Setup, params) -> float:
  import jax
  evaluate = jax.jit(loss_function(run.model))
  rng = np.random.default_rng(1234)
  return float(
      np.mean([
          float(evaluate(params, *batch(run, run.corpus[1], rng)))
          for _ in range(16)
      ]))


def profile(name, args, compiled, state, xy):
  """``(state, breakdown)`` after tracing ``args.profile_steps`` plain steps
  (``benchmarks/step_trace.py``); the trace and the compiled HLO are written
  next to the results."""
  from benchmarks import step_trace
  stem = os.path.join(args.out, re.sub(r"[^A-Za-z0-9.-]+", "_", name))
  carry = [state]

  def one_step():
    carry[0], loss = compiled(carry[0], *xy)
    return loss

  kernels = step_trace.kernel_events(one_step, args.profile_steps,
                                     raw_path=stem + "_trace.json.gz",
                                     wait_each=not args.profile_free_running)
  breakdown = step_trace.breakdown(kernels, compiled.as_text(),
                                   args.profile_steps)
  with gzip.open(stem + "_hlo.txt.gz", "wt") as f:
    f.write(compiled.as_text())
  return carry[0], breakdown


def rejected_updates(opt_state) -> int:
  """The preconditioner or basis updates that the optimizer rejected (its
  ``failure_count`` fields) over the run."""
  import jax
  paths = jax.tree_util.tree_flatten_with_path(opt_state)[0]
  return sum(
      int(leaf)
      for path, leaf in paths
      if getattr(path[-1], "name", None) == "failure_count")


def run_one(name, args):
  import jax
  import lm
  import optax_shampoo4 as o4

  run = setup(name, args)
  compile_with = train_lm_programs.compile_arguments(name, args)
  program_at, state, xy, record = train(run, args.steps, args.sync_every,
                                        compile_with)
  held = held_out_loss(run, state.params)
  state, free_ms = free_running_ms(program_at, args.steps + 1, state, xy)
  breakdown = None
  # where each millisecond of a step goes, in the program of the first step
  # after the run (a plain step unless the intervals divide steps + 1)
  if args.profile_steps:
    state, breakdown = profile(name, args, program_at(args.steps + 1), state,
                               xy)
  peak_bytes = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0)
                   for d in jax.devices()[:args.devices])
  times, losses = record["step_s"], record["losses"]
  ms = lambda f, x: 1e3 * float(f(x[5:]))
  result = dict(
      name=name, devices=args.devices, sync_every=args.sync_every,
      batch=run.size["batch"], context=run.size["context"],
      state_bytes_per_device=int(
          o4.state_nbytes(state.opt_state, per_device=True)),
      params=int(sum(p.size for p in jax.tree.leaves(state.params))),
      final_loss=float(np.mean(losses[-SMOOTH:])), held_out_loss=held,
      ms_median=ms(np.median, times), ms_mean=ms(np.mean, times),
      dispatch_ms_median=ms(np.median, record["dispatch"]),
      ms_free_running=free_ms, prefetch=args.prefetch, state_bytes=int(
          o4.state_nbytes(state.opt_state)), peak_bytes=int(peak_bytes),
      temp_bytes=int(record["temp_bytes"]), compile_s=record["compile_s"],
      compile_s_by_program=record["compile_s_by_program"],
      compiled_concurrently=args.compile_concurrently,
      compile_arguments=compile_with, corpus=lm.corpus_fingerprint(run.corpus),
      losses=losses, step_s=times, device=str(
          jax.devices()[0].device_kind), jax=jax.__version__, profile=breakdown)
  result["rejected_updates"] = rejected_updates(state.opt_state)
  return result


def main(argv=None):
  args = parser().parse_args(argv)
  if args.child:
    print(json.dumps(run_one(args.child, args)))
    return
  os.makedirs(args.out, exist_ok=True)
  names = args.only.split(";") if args.only else list(optimizers(args))
  results = []
  os.makedirs(os.path.join(args.out, "parts"), exist_ok=True)
  for name in names:
    part = os.path.join(args.out, "parts",
                        re.sub(r"[^A-Za-z0-9.-]+", "_", name) + ".json")
    if os.path.exists(part):  # measured by an earlier call on this machine
      with open(part) as f:
        results.append(json.load(f))
      continue
    child = [sys.executable,
             os.path.abspath(__file__), "--child", name
            ] + [a for a in (argv if argv is not None else sys.argv[1:])]
    done = subprocess.run(child, capture_output=True, text=True)
    if done.returncode:
      print(f"{name} failed:\n{done.stderr[-3000:]}", flush=True)
      continue
    results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    r = results[-1]
    with open(part, "w") as f:
      json.dump(r, f)
    print(
        f"{name}: loss {r['final_loss']:.4f}, {r['ms_median']:.1f} ms/step, "
        f"compile {r['compile_s']:.0f} s, "
        f"peak {r['peak_bytes'] / 2**30:.2f} GiB", flush=True)
  summarize(results, args.out)


if __name__ == "__main__":
  main()
