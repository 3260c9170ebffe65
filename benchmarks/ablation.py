"""Ablation of the preconditioner storages, printed as [S4]-style tables (writes
docs-ready markdown + JSON).

Run: ``PYTHONPATH=. python benchmarks/ablation.py [--steps 300]`` (CPU is fine;
  about 5 minutes).

1. NRE / AE of A^{-1/4} from each storage at 4 and 8 bits, on [S4] Table 1's
   synthetic matrix and on a real statistic collected from the example training
   run (the digits CNN's largest preconditioner).
2. The error-feedback sweep over β_e for the Cholesky storage.
3. Final train loss / test accuracy of the example run for each storage.
"""

import argparse
import os
import sys

import jax
import numpy as np

from benchmarks import common
import optax_shampoo4 as o4
from optax_shampoo4 import diagnostics, shampoo_adamw
from optax_shampoo4.fused import find_state

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import compare  # noqa: E402

STORAGES = [("matrix", {}), ("cholesky", {}),
            ("eigenvectors", {
                "bjorck_steps": 0
            }), ("eigenvectors", {
                "bjorck_steps": 1
            })]


def label(storage, extra):
  if storage == "eigenvectors":
    return f"eigenvectors, {'with' if extra['bjorck_steps'] else 'no'} Björck"
  return storage


def error_rows(u, lam):
  rows = []
  for bits in (4, 8):
    for storage, extra in STORAGES:
      nre, angle = diagnostics.inverse_root_error(u, lam, storage=storage,
                                                  bits=bits, **extra)
      rows.append([f"{bits}-bit", label(storage, extra), nre, angle])
  return rows


def real_statistic(args):
  """The largest left statistic of the digits CNN after training with fp32
  classic Shampoo."""
  tx = shampoo_adamw(3e-3, statistics_every=10, inverse_root_every=50,
                     shampoo=o4.ShampooConfig(bits=32, storage="matrix"))
  data = compare.load_digits_split(0)
  model = compare.CNN()
  params = model.init(jax.random.PRNGKey(0), data[0][0][:1])["params"]
  from flax.training import train_state
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=tx)
  step = compare.make_step(model)
  rng = np.random.default_rng(0)
  for _ in range(args.steps):
    index = rng.integers(0, 1500, 64)
    state, _ = step(state, data[0][0][index], data[0][1][index])
  # the aliases wrap their chain in skip_nonfinite's state
  stacks = find_state(state.opt_state, o4.ShampooState).preconditioners
  order = max(int(k.split("_")[1]) for k in stacks)
  statistic = np.asarray(stacks[f"order_{order}"].statistic[0], np.float64)
  eigenvalues, vectors = np.linalg.eigh(statistic)
  eigenvalues = np.maximum(eigenvalues, 1e-6 * eigenvalues.max())
  return vectors, eigenvalues, order


class Quiet:
  """A progress bar that shows nothing."""

  def update(self, _):
    pass

  def set_postfix(self, **_):
    pass


def error_feedback_rows():
  """Mean error of the rebuilt statistic, Cholesky storage with and without
  error feedback, on 150 synthetic n=256 Gram matrices."""
  rng = np.random.default_rng(0)
  grams = [(lambda g: g @ g.T / 64)(rng.standard_normal(
      (256, 64)) * np.logspace(0, -2, 256)[:, None]) for _ in range(150)]
  off = diagnostics.error_feedback_errors(grams, error_feedback=False)
  rows = [["off", "-", float(np.mean(off[20:]))]]
  for beta_e in (0.0, 0.5, 0.9):
    errors = diagnostics.error_feedback_errors(grams,
                                               error_feedback_beta=beta_e)
    rows.append(["on", beta_e, float(np.mean(errors[20:]))])
  return rows


def training_rows(steps: int):
  """Final train loss and test accuracy of the digits CNN per bit width and
  storage."""
  data = compare.load_digits_split(0)
  run_args = argparse.Namespace(seed=0, steps=steps, batch_size=64,
                                resume=False, checkpoint_dir=None)
  rows = []
  for bits in (4, 8, 32):
    for storage, extra in STORAGES:
      if bits == 32 and storage != "matrix":
        continue
      bjorck = extra.get("bjorck_steps", 1)
      tx = shampoo_adamw(
          3e-3, weight_decay=1e-4, statistics_every=10, inverse_root_every=50,
          shampoo=o4.ShampooConfig(bits=bits, storage=storage,
                                   bjorck_steps=(bjorck, 4 * bjorck)))
      r = compare.train_one(label(storage, extra), tx, run_args, data, Quiet())
      rows.append([
          f"{bits}-bit",
          label(storage, extra) if bits != 32 else "fp32 (classic)",
          r["train_loss"], r["test_accuracy"]
      ])
  return rows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=300)
  args = parser.parse_args()
  tables, payload = [], {}
  error_columns = ["bits", "storage", "NRE", "AE (deg)"]
  payload["synthetic"] = error_rows(*diagnostics.synthetic_statistic())
  tables.append(
      common.print_table(
          "A^{-1/4} error, synthetic order-1200 matrix ([S4] Table 1)",
          error_columns, payload["synthetic"]))
  vectors, eigenvalues, order = real_statistic(args)
  payload["real"] = {"order": order, "rows": error_rows(vectors, eigenvalues)}
  tables.append(
      common.print_table(
          f"A^{{-1/4}} error, real statistic (digits CNN, order {order})",
          error_columns, payload["real"]["rows"]))
  payload["error_feedback"] = error_feedback_rows()
  tables.append(
      common.print_table(
          "Cholesky storage: error of the rebuilt statistic vs fp32 (n=256, "
          "150 steps)", ["error feedback", "beta_e", "mean relative error"],
          payload["error_feedback"]))
  payload["training"] = training_rows(args.steps)
  tables.append(
      common.print_table(
          f"Digits CNN, {args.steps} steps, AdamW base",
          ["bits", "storage", "final train loss", "test accuracy"],
          payload["training"]))
  common.write_json("ablation", {**payload, "tables": tables})


if __name__ == "__main__":
  main()
