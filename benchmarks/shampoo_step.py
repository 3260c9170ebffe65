"""Step times and state memory of optax.adamw vs shampoo_adamw (32-bit and
4-bit) on real model shapes.

Run: ``PYTHONPATH=. python benchmarks/shampoo_step.py [--models
  gpt2_small,vit_s16]``.

Each step kind is timed on its own jitted program (same state shapes): *plain*
(precondition with the stored roots), *statistics* (plain + statistics update)
and *inverse root* (plain + inverse-root update). The amortized step at T1/T2 is
``plain + (stats − plain)/T1 + (root − plain)/T2``. The plain step is also timed
pipelined (20 steps dispatched back to back, as in a training loop). Also
printed: the time of each order class's statistics / inverse-root work (where
  the time goes), the floor of the per-step preconditioning products at the
  measured matmul rates, and the error of TF32 preconditioning.
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
import optax_shampoo4 as o4
from optax_shampoo4 import (blocking, linalg, preconditioners, shampoo_adamw,
                            state_nbytes)

NEVER = 2**30


def step_program(tx, due=None):
  """The jitted training step ``update`` + ``apply_updates`` (a
  ``common.FusedRow``: its fused ``step``), params and state donated; ``due``:
  the ``preconditioner_due`` it passes (None: the step schedules itself)."""
  extra = {} if due is None else {"preconditioner_due": due}

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, grads):
    if isinstance(tx, common.FusedRow):
      return tx.step(grads, state, params)
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  return step


def time_step(tx, params, grads, repeats):
  step = step_program(tx)
  state = tx.init(params)
  params = jax.tree.map(jnp.copy, params)
  carry = [params, state]

  def run():
    carry[0], carry[1] = step(carry[0], carry[1], grads)
    return carry[1]

  return common.time_call(run, repeats=repeats), state_nbytes(carry[1])


def pipelined_step_time(tx, params, grads, steps: int = 20, repeats: int = 3,
                        step=None) -> float:
  """Seconds per step of ``steps`` steps dispatched back to back and blocked on
  once, as in a training loop: the host's dispatch of a step overlaps the
  device's work on the previous one (median of ``repeats`` such loops).
  (``time_step`` blocks on every step, so it also counts the dispatch of every
  state leaf.) ``step(params, state, grads) -> (params, state)`` defaults to
  :func:`step_program`; another program (e.g. one computing its own gradients
  from a batch passed as ``grads``) may be given."""
  step = step_program(tx) if step is None else step
  carry = [jax.tree.map(jnp.copy, params), tx.init(params)]
  for _ in range(2):
    carry = list(step(carry[0], carry[1], grads))
  jax.block_until_ready(carry)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      carry = list(step(carry[0], carry[1], grads))
    jax.block_until_ready(carry)
    times.append((time.perf_counter() - start) / steps)
  return statistics.median(times)


def matmul_rates():
  a = jax.random.normal(jax.random.PRNGKey(0), (8192, 8192), jnp.float32)
  rates = {}
  for name, precision in (("fp32", jax.lax.Precision.HIGHEST),
                          ("tf32", jax.lax.Precision.HIGH), ("bf16", None)):
    operand = a.astype(jnp.bfloat16) if precision is None else a
    fn = jax.jit(lambda x, p=precision: jnp.matmul(x, x, precision=p))
    rates[name] = 2 * 8192**3 / common.time_call(fn, operand, repeats=5)
  return rates


def preconditioning_flops(shapes, max_order):
  plan = blocking.make_plan(tuple(shapes.values()), max_order)
  return sum(
      len(g.blocks) * 2 * (g.rows * g.rows * g.cols + g.rows * g.cols * g.cols)
      for g in plan.groups)


def order_breakdown(shapes, bits, repeats):
  """Seconds of the statistics and inverse-root update of each order class
  (4-bit eigenvector storage)."""
  plan = blocking.make_plan(tuple(shapes.values()), 1200)
  hyper = preconditioners.Hyper(0.95, 1e-6, 0.0)
  rows = []
  for order, count in plan.stack_sizes:
    storage = preconditioners.make_storage(o4.ShampooConfig(bits=bits), order)
    state = storage.init(count, order, hyper)
    grams = linalg.gram(
        jax.random.normal(jax.random.PRNGKey(order), (count, order, 256)))
    stats = jax.jit(lambda s, g: storage.update_statistics(s, g, hyper)[0])
    root = jax.jit(lambda s: storage.update_inverse_root(s, hyper)[0])
    orth = jax.jit(linalg.orthonormalize_columns)
    stats_s = common.time_call(stats, state, grams, repeats=repeats)
    root_s = common.time_call(root, state, repeats=repeats)
    orth_s = common.time_call(orth, grams, repeats=repeats)
    rows.append([order, count, stats_s * 1e3, orth_s * 1e3, root_s * 1e3])
  return rows


def tf32_error():
  """Relative error of L̂ G R̂ at TF32 vs HIGHEST, beside the 4-bit vs 32-bit
  error of the roots."""
  rng = np.random.default_rng(0)
  m, n = 768, 768
  g = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
  a = linalg.gram(jnp.asarray(rng.standard_normal((1, m, 2 * m)), jnp.float32))
  root = linalg.inverse_root_eigh(a)[0]
  from optax_shampoo4.quantization import fake_quantize
  root4 = fake_quantize(root, keep_diagonal=True)

  def product(l, precision):
    return jnp.matmul(
        jnp.matmul(l, g, precision=precision), l, precision=precision)

  hi = product(root, jax.lax.Precision.HIGHEST)
  tf = product(root, jax.lax.Precision.HIGH)
  q4 = product(root4, jax.lax.Precision.HIGHEST)
  rel = lambda x: float(jnp.linalg.norm(x - hi) / jnp.linalg.norm(hi))
  return {"tf32_vs_fp32": rel(tf), "4bit_root_vs_fp32_root": rel(q4)}


STEP_KINDS = {  # step kind -> (statistics_every, inverse_root_every)
    "plain": (NEVER, NEVER),
    "statistics": (1, NEVER),
    "inverse_root": (NEVER, 1)
}


def adamw_row(params, grads, repeats):
  """``(table row, results)`` of ``optax.adamw``."""
  seconds, state_bytes = time_step(optax.adamw(1e-3), params, grads, repeats)
  pipelined = pipelined_step_time(optax.adamw(1e-3), params, grads)
  row = [
      "optax.adamw", seconds * 1e3, pipelined * 1e3, "-", "-", seconds * 1e3,
      state_bytes / 2**20
  ]
  return row, dict(step_s=seconds, pipelined_step_s=pipelined,
                   state_bytes=state_bytes)


def shampoo_row(config, params, grads, args):
  """``(table row, results)`` of ``shampoo_adamw`` with ``config``: each step
  kind timed, and the step amortized over ``args.t1``/``args.t2``."""
  tx = lambda t1, t2: shampoo_adamw(1e-3, statistics_every=t1,
                                    inverse_root_every=t2, shampoo=config)
  kinds = {}
  for kind, intervals in STEP_KINDS.items():
    kinds[kind], state_bytes = time_step(
        tx(*intervals), params, grads, args.repeats)
  plain = kinds["plain"]
  kinds["plain_pipelined"] = pipelined_step_time(
      tx(NEVER, NEVER), params, grads)
  amortized = plain + (kinds["statistics"] - plain) / args.t1 + (
      kinds["inverse_root"] - plain) / args.t2
  row = [
      f"shampoo_adamw(shampoo=o4.ShampooConfig(bits={config.bits}))",
      plain * 1e3, kinds["plain_pipelined"] * 1e3, kinds["statistics"] * 1e3,
      kinds["inverse_root"] * 1e3, amortized * 1e3, state_bytes / 2**20
  ]
  precond_bytes = state_nbytes(
      jax.eval_shape(o4.scale_by_shampoo(config).init, params))
  return row, dict({
      f"{k}_s": v for k, v in kinds.items()
  }, amortized_s=amortized, state_bytes=state_bytes,
                   preconditioner_bytes=precond_bytes)


def ratio_rows(results):
  """Rows of the 4-bit / 32-bit ratios (``results["ratios"]`` set), or none
  without both widths."""
  if not {"shampoo4", "shampoo32"} <= set(results):
    return []
  four, fp32 = results["shampoo4"], results["shampoo32"]
  results["ratios"] = {
      "amortized_4bit_over_32bit":
          four["amortized_s"] / fp32["amortized_s"],
      "preconditioner_state_32bit_over_4bit":
          fp32["preconditioner_bytes"] / four["preconditioner_bytes"]
  }
  labels = ("amortized 4-bit / 32-bit", "preconditioner state 32-bit / 4-bit")
  return [
      [label, value] for label, value in zip(labels, results["ratios"].values())
  ]


def measure_model(model, shapes, args, config, rates):
  """``(results, tables)`` of one model's parameter shapes."""
  params = common.random_tree(shapes, seed=1)
  grads = common.random_tree(shapes, seed=2)
  row, adamw = adamw_row(params, grads, args.repeats)
  rows, results = [row], {"adamw": adamw}
  for bits in [int(b) for b in args.bits.split(",")]:
    row, results[f"shampoo{bits}"] = shampoo_row(
        config(bits), params, grads, args)
    rows.append(row)
  flops = preconditioning_flops(shapes, 1200)
  results["preconditioning_gflop"] = flops / 1e9
  results["preconditioning_floor_ms"] = {
      k: flops / v * 1e3 for k, v in rates.items()
  }
  n = common.parameter_count(shapes)
  tables = [
      common.print_table(
          f"{model} ({n / 1e6:.1f}M params), T1/T2 = {args.t1}/{args.t2}", [
              "optimizer", "plain ms", "plain ms (pipelined)", "statistics ms",
              "inverse-root ms", "amortized ms", "state MiB"
          ], rows),
      common.print_table(
          f"{model}: ratios and floor", ["quantity", "value"],
          ratio_rows(results) +
          [["preconditioning GFLOP per step", flops / 1e9]] +
          [[f"floor of L̂GR̂ at {k} (ms)", v]
           for k, v in results["preconditioning_floor_ms"].items()])
  ]
  if not args.no_breakdown:
    breakdown = order_breakdown(shapes, 4, max(3, args.repeats // 2))
    results["order_breakdown"] = breakdown
    tables.append(
        common.print_table(f"{model}: 4-bit work per order class", [
            "order", "count", "statistics ms", "of which orth. ms",
            "inverse root ms"
        ], breakdown))
  return results, tables


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", default="gpt2_small,vit_s16")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--t1", type=int, default=100)
  parser.add_argument("--t2", type=int, default=500)
  parser.add_argument("--bits", default="32,4",
                      help="comma-separated; 4/32 ratios need both")
  parser.add_argument(
      "--working-set-mib", type=int, default=None,
      help="ShampooConfig.working_set_bytes in MiB (default: the config's)")
  parser.add_argument("--no-breakdown", action="store_true",
                      help="skip the per-order-class timings")
  args = parser.parse_args(argv)
  working_set = ({} if args.working_set_mib is None else {
      "working_set_bytes": args.working_set_mib * 2**20
  })
  config = lambda bits: o4.ShampooConfig(bits=bits, **working_set)
  rates = matmul_rates()
  payload = {
      "matmul_tflops": {
          k: v / 1e12 for k, v in rates.items()
      },
      "preconditioning_error": tf32_error()
  }
  tables = [
      common.print_table(f"Matmul rates, 8192^3 ({common.machine()})",
                         ["precision", "TFLOP/s"],
                         [[k, v / 1e12] for k, v in rates.items()]),
      common.print_table(
          "Error of the per-step preconditioning product L̂ G R̂ (order 768)",
          ["comparison", "relative error"],
          [[k, v] for k, v in payload["preconditioning_error"].items()])
  ]
  for model in args.models.split(","):
    payload[model], model_tables = measure_model(model,
                                                 common.model_shapes(model),
                                                 args, config, rates)
    tables += model_tables
    # after each model: runs can be long
    common.write_json("shampoo_step", {**payload, "tables": tables})


if __name__ == "__main__":
  main()
