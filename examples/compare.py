"""Train a small Flax CNN on scikit-learn's digits with several optimizers and
compare them.

    python examples/compare.py [--steps 400] [--optimizers adamw,shampoo4,...]
    [--seed 0] [--out runs/compare]

Prints one table (final train loss, held-out loss and accuracy on the test
split, optimizer state bytes and bytes per parameter, ms per step), and writes
``results.json``, ``loss_curves.png`` and ``state_memory.png`` into ``--out``.
With ``--checkpoint-dir`` each optimizer's final train state is saved with
Orbax; ``--resume`` restores it and continues training for ``--steps`` more
steps.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state

import optax_shampoo4 as o4

SHAMPOO = dict(statistics_every=10, inverse_root_every=50)
SOAP = dict(precondition_every=10)


def preconditioner_schedule(name: str):
  """``step -> preconditioner_due`` for the compared optimizer ``name``: the
  loop passes the schedule, so that no step waits on XLA:GPU's conditional
  (``optax_shampoo4.host_schedule``); None for the optimizers without one."""
  if name.startswith("soap"):
    return lambda step: (o4.due_at(step, SOAP["precondition_every"]), False)
  if name.startswith(("shampoo", "cholesky", "all_4bit")):
    return lambda step: (o4.due_at(step, SHAMPOO["statistics_every"]),
                         o4.due_at(step, SHAMPOO["inverse_root_every"]))
  return lambda step: None


def optimizers(learning_rate: float):
  """The compared optimizers, by name (the same learning rate for all: grafting
  makes it transfer)."""
  return {
      "adamw":
          lambda: optax.adamw(learning_rate, weight_decay=1e-4),
      "adamw_4bit":
          lambda: o4.adamw_4bit(learning_rate, weight_decay=1e-4),
      "shampoo32":
          lambda: o4.shampoo_adamw(learning_rate, weight_decay=1e-4, **SHAMPOO,
                                   shampoo=o4.ShampooConfig(bits=32)),
      "shampoo4":
          lambda: o4.shampoo_adamw(learning_rate, weight_decay=1e-4, **SHAMPOO,
                                   shampoo=o4.ShampooConfig(bits=4)),
      "cholesky4":
          lambda: o4.shampoo_adamw(
              learning_rate, weight_decay=1e-4, **SHAMPOO, shampoo=o4.
              ShampooConfig(bits=4, storage="cholesky")),
      "all_4bit":
          lambda: o4.shampoo_adamw(learning_rate, weight_decay=1e-4, **SHAMPOO,
                                   shampoo=o4.ShampooConfig(
                                       bits=4), adam=o4.AdamConfig(bits=4)),
      # SOAP has no grafting; it takes the same learning rate here for a
      # like-for-like run
      "soap4":
          lambda: o4.soap(learning_rate, weight_decay=1e-4, **SOAP),
      "soap32":
          lambda: o4.soap(learning_rate, weight_decay=1e-4, **SOAP, config=o4.
                          ShampooConfig(bits=32), moments=o4.AdamConfig(bits=32
                                                                       )),
  }


class CNN(nn.Module):
  """Two 3×3 convolutions and two dense layers for 8×8 grey digits."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.relu(nn.Conv(64, (3, 3))(x))
    x = nn.avg_pool(x, (4, 4), strides=(4, 4))
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


def load_digits_split(seed: int):
  from sklearn.datasets import load_digits
  digits = load_digits()
  order = np.random.default_rng(seed).permutation(len(digits.target))
  images = (digits.images[order] / 16.0).astype(np.float32)[..., None]
  labels = digits.target[order].astype(np.int32)
  return (images[:1500], labels[:1500]), (images[1500:], labels[1500:])


def make_step(model):

  @jax.jit
  def step(state, images, labels):

    def loss_fn(params):
      logits = model.apply({"params": params}, images)
      return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                             labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  return step


def evaluate(model, params, images, labels):
  logits = model.apply({"params": params}, images)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return float(loss), float(jnp.mean(jnp.argmax(logits, -1) == labels))


def maybe_restore(args, name, state):
  """With ``--resume --checkpoint-dir``: the train state saved for optimizer
  ``name``, else ``state``."""
  if not (args.resume and args.checkpoint_dir):
    return state
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(
      os.path.abspath(os.path.join(args.checkpoint_dir, name)), state)


def maybe_save(args, name, state):
  """With ``--checkpoint-dir``: saves optimizer ``name``'s train state (Orbax,
  overwriting)."""
  if not args.checkpoint_dir:
    return
  import orbax.checkpoint as ocp
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(
      os.path.abspath(os.path.join(args.checkpoint_dir, name)), state,
      force=True)
  checkpointer.wait_until_finished()


def timed_steps(state, steps, run_step, name, progress):
  """Calls ``run_step(state) -> (state, loss)`` ``steps`` times; returns the
  state, the losses and the seconds of each call (the loss is read back, so each
  time covers the whole step)."""
  curve, times = [], []
  for _ in range(steps):
    start = time.perf_counter()
    state, loss = run_step(state)
    loss = float(loss)
    times.append(time.perf_counter() - start)
    curve.append(loss)
    progress.update(1)
    progress.set_postfix(optimizer=name, loss=f"{loss:.3f}")
  return state, curve, times


def train_one(name, tx, args, data, progress):
  (train_x, train_y), (test_x, test_y) = data
  model = CNN()
  params = model.init(jax.random.PRNGKey(args.seed), train_x[:1])["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=tx)
  state = maybe_restore(args, name, state)
  first_step = int(state.step)
  step_fn = make_step(model)
  rng = np.random.default_rng(args.seed + first_step)

  def run_step(state):
    index = rng.integers(0, len(train_y), args.batch_size)
    return step_fn(state, train_x[index], train_y[index])

  state, curve, times = timed_steps(state, args.steps, run_step, name, progress)
  maybe_save(args, name, state)
  train_loss, _ = evaluate(model, state.params, train_x, train_y)
  test_loss, test_accuracy = evaluate(model, state.params, test_x, test_y)
  n_params = sum(p.size for p in jax.tree.leaves(state.params))
  state_bytes = o4.state_nbytes(state.opt_state)
  steady = times[min(len(times) - 1, 5):]  # skip compilation
  return {
      "train_loss": train_loss,
      "test_loss": test_loss,
      "test_accuracy": test_accuracy,
      "state_bytes": state_bytes,
      "state_bytes_per_param": state_bytes / n_params,
      "ms_per_step": 1e3 * float(np.median(steady)),
      "curve": curve,
      "params": n_params,
      "steps_done": first_step + args.steps
  }


def plot(results, out, title="digits CNN"):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, r in results.items():
    curve = np.asarray(r["curve"])
    window = max(1, len(curve) // 40)
    smooth = np.convolve(curve, np.ones(window) / window, mode="valid")
    ax.plot(smooth, label=name)
  ax.set(xlabel="step", ylabel="train loss (moving average)", yscale="log",
         title=title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, "loss_curves.png"), dpi=120)
  fig, ax = plt.subplots(figsize=(7, 4))
  names = list(results)
  ax.bar(names, [results[n]["state_bytes"] / 1024 for n in names])
  ax.set(ylabel="optimizer state (KiB)", title="optimizer state memory")
  plt.setp(ax.get_xticklabels(), rotation=20)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "state_memory.png"), dpi=120)
  plt.close("all")


def comparison_parser(description, steps, out, default_optimizers):
  """The command-line flags shared by the example comparisons."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--steps", type=int, default=steps)
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--optimizers", default=default_optimizers)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=out)
  parser.add_argument("--checkpoint-dir", default=None)
  parser.add_argument("--resume", action="store_true")
  return parser


def run_comparison(parser, args, train_fn, data, metrics, extra_json=None,
                   available=None, title="digits CNN"):
  """Trains every optimizer of ``args.optimizers`` with ``train_fn``, prints the
  table, writes JSON + PNGs.

  ``metrics`` are ``(result key, column title)`` pairs of the quality columns
  beside the train loss; ``available`` maps optimizer names to factories
  (default: :func:`optimizers` at ``args.learning_rate``).
  """
  available = available or optimizers(args.learning_rate)
  names = args.optimizers.split(",")
  unknown = [n for n in names if n not in available]
  if unknown:
    parser.error(
        f"unknown optimizers {unknown}; choose from {sorted(available)}")
  os.makedirs(args.out, exist_ok=True)
  from tqdm import tqdm
  results = {}
  with tqdm(total=args.steps * len(names), unit="step") as progress:
    for name in names:
      results[name] = train_fn(name, available[name](), args, data, progress)
  columns = "".join(f" {column:>12}" for _, column in metrics)
  print(
      f"{'optimizer':<12} {'train loss':>10}{columns} {'state bytes':>12} "
      f"{'B/param':>8} {'ms/step':>8}"
  )
  for name, r in results.items():
    values = "".join(f" {r[key]:>12.4f}" for key, _ in metrics)
    print(
        f"{name:<12} {r['train_loss']:>10.4f}{values} {r['state_bytes']:>12,} "
        f"{r['state_bytes_per_param']:>8.3f} {r['ms_per_step']:>8.2f}")
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(
        {
            "args": vars(args),
            "machine": str(jax.devices()[0]),
            **(extra_json or {}), "results": results
        }, f, indent=1)
  plot(results, args.out, title)
  return results


def main(argv=None):
  parser = comparison_parser(
      __doc__.splitlines()[0], 400, "runs/compare",
      "adamw,adamw_4bit,shampoo32,shampoo4,cholesky4,all_4bit")
  parser.add_argument("--batch-size", type=int, default=64)
  args = parser.parse_args(argv)
  return run_comparison(parser, args, train_one, load_digits_split(args.seed),
                        (("test_loss", "held-out loss"),
                         ("test_accuracy", "test acc")))


if __name__ == "__main__":
  main()
