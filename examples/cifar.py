"""ResNet-18/34 and ViT-S on CIFAR-10/100 (python-pickle format) with
first-order and Shampoo optimizers.

    python examples/cifar.py --data-dir ~/data/cifar-100-python --model resnet34
    [--epochs 200] python examples/cifar.py --data-dir ~/data/cifar-100-python
    --model vit_s --optimizers adamw,shampoo4,all_4bit

``--data-dir`` is the directory of the standard python version of CIFAR (the
files ``data_batch_1`` … ``data_batch_5`` and ``test_batch`` for CIFAR-10,
``train`` and ``test`` for CIFAR-100), or a directory that contains
``cifar-10-batches-py`` / ``cifar-100-python``. Nothing is downloaded.
``--write-synthetic N`` first writes a CIFAR-10-format dataset of N
class-dependent random images there (for a smoke test or a timing run on a
machine without the data; its accuracy says nothing about CIFAR).

Hyperparameters follow [S4] (docs/algorithms.md): ResNets use SGD with momentum
0.9, learning rate 0.1, L2 weight decay 5e-4; ViT-S uses AdamW, learning rate
1e-3, betas (0.9, 0.999), eps 1e-8, decoupled weight decay 0.05; Shampoo updates
statistics every 100 steps and inverse roots every 500 (CIFAR's T1/T2). The
learning rate warms up linearly over the first 5 % of the steps and then follows
a cosine to zero (our choice). Training uses random crops (4-pixel reflection
padding) and horizontal flips, batch 128.

Prints the table of ``compare.py`` (with amortized ms/step beside the median)
and writes ``results.json``, ``loss_curves.png`` and ``state_memory.png``;
``--checkpoint-dir`` / ``--resume`` save and restore each optimizer's train
state (params, batch statistics, optimizer state) with Orbax.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state

import optax_shampoo4 as o4
from cifar_data import augment, load_cifar, normalize, write_cifar_like
from compare import (comparison_parser, maybe_restore, maybe_save,
                     run_comparison, timed_steps)

PAPER = {  # [S4]'s CIFAR settings per base optimizer
    "sgdm": dict(learning_rate=0.1, weight_decay=5e-4),
    "adamw": dict(learning_rate=1e-3, weight_decay=0.05),
}


# ---------------------------------------------------------------- models
class BasicBlock(nn.Module):
  channels: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9)
    y = nn.relu(norm()(nn.Conv(self.channels, (3, 3), self.strides, padding=1,
                               use_bias=False)(x)))
    y = norm()(nn.Conv(self.channels, (3, 3), padding=1, use_bias=False)(y))
    if x.shape != y.shape:
      x = norm()(
          nn.Conv(self.channels, (1, 1), self.strides, use_bias=False)(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """CIFAR ResNet: a 3×3 stem without pooling, four stages of basic blocks,
  global average pooling."""
  stages: Sequence[int]
  num_classes: int
  width: int = 64

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for stage, blocks in enumerate(self.stages):
      for block in range(blocks):
        x = BasicBlock(self.width * 2**stage,
                       2 if stage > 0 and block == 0 else 1)(x, train)
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


class EncoderBlock(nn.Module):
  width: int
  heads: int

  @nn.compact
  def __call__(self, x):
    batch, tokens, _ = x.shape
    qkv = nn.Dense(3 * self.width)(nn.LayerNorm()(x)).reshape(
        batch, tokens, 3, self.heads, -1)
    attention = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1],
                                             qkv[:, :, 2])
    x = x + nn.Dense(self.width)(attention.reshape(batch, tokens, self.width))
    return x + nn.Dense(self.width)(
        nn.gelu(nn.Dense(4 * self.width)(nn.LayerNorm()(x))))


class ViT(nn.Module):
  """ViT for 32×32 images: 4×4 patches (64 tokens), learned positions, mean
  pooling."""
  num_classes: int
  width: int = 384
  depth: int = 12
  heads: int = 6

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.width, (4, 4), strides=4)(x)
    x = x.reshape(x.shape[0], -1, self.width)
    x = x + self.param("position", nn.initializers.normal(0.02), x.shape[1:])
    for _ in range(self.depth):
      x = EncoderBlock(self.width, self.heads)(x)
    return nn.Dense(self.num_classes)(nn.LayerNorm()(x).mean(axis=1))


MODELS = {
    "resnet18": ("sgdm", (2, 2, 2, 2)),
    "resnet34": ("sgdm", (3, 4, 6, 3)),
    "vit_s": ("adamw", None)
}


def make_model(name: str, num_classes: int, width=None, depth=None):
  if name == "vit_s":
    width = width or 384
    return ViT(num_classes, width=width, depth=depth or 12,
               heads=max(1, width // 64))
  return ResNet(MODELS[name][1], num_classes, width=width or 64)


# ------------------------------------------------------------ optimizers
def optimizers(base: str, learning_rate: float, weight_decay: float, steps: int,
               statistics_every: int = 100, inverse_root_every: int = 500):
  """The compared optimizers for a base (``"sgdm"`` or ``"adamw"``), with a
  warmup-cosine schedule."""
  intervals = dict(statistics_every=statistics_every,
                   inverse_root_every=inverse_root_every)
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate,
                                                max(1, steps // 20),
                                                max(2, steps))
  if base == "sgdm":

    def shampoo(**kw):
      return lambda: o4.shampoo_sgdm(schedule, momentum=0.9,
                                     weight_decay=weight_decay, **intervals,
                                     shampoo=o4.ShampooConfig(**kw))

    return {
        "sgdm":
            lambda: optax.chain(
                optax.add_decayed_weights(weight_decay), optax.sgd(
                    schedule, 0.9)),
        "shampoo32":
            shampoo(bits=32),
        "shampoo4":
            shampoo(bits=4),
        "cholesky4":
            shampoo(bits=4, storage="cholesky")
    }

  def shampoo(adam=o4.AdamConfig(bits=32), **kw):
    return lambda: o4.shampoo_adamw(schedule, weight_decay=weight_decay, **
                                    intervals, adam=adam, shampoo=o4.
                                    ShampooConfig(**kw))

  return {
      "adamw": lambda: optax.adamw(schedule, weight_decay=weight_decay),
      "adamw_4bit": lambda: o4.adamw_4bit(schedule, weight_decay=weight_decay),
      "shampoo32": shampoo(bits=32),
      "shampoo4": shampoo(bits=4),
      "cholesky4": shampoo(bits=4, storage="cholesky"),
      "all_4bit": shampoo(o4.AdamConfig(), bits=4)
  }


# -------------------------------------------------------------- training
class TrainState(train_state.TrainState):
  batch_stats: Any = None


def make_train_step(model):
  has_batch_norm = isinstance(model, ResNet)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, images, labels, key):
    images = normalize(augment(images, key))

    def loss_fn(params):
      variables = {"params": params}
      if has_batch_norm:
        variables["batch_stats"] = state.batch_stats
        logits, updates = model.apply(variables, images, train=True,
                                      mutable=["batch_stats"])
      else:
        logits, updates = model.apply(variables, images, train=True), {}
      loss = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                             labels).mean()
      return loss, updates.get("batch_stats", state.batch_stats)

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss

  return step


def make_evaluate(model):

  @jax.jit
  def correct(state, images, labels):
    variables = {"params": state.params}
    if state.batch_stats is not None:
      variables["batch_stats"] = state.batch_stats
    logits = model.apply(variables, normalize(images), train=False)
    return jnp.sum(jnp.argmax(logits, -1) == labels)

  def evaluate(state, images, labels, batch=1000):
    hits = sum(
        int(correct(state, images[i:i + batch], labels[i:i + batch]))
        for i in range(0, len(labels), batch))
    return hits / len(labels)

  return evaluate


def train_one(name, tx, args, data, progress):
  (train_x, train_y), (test_x, test_y), num_classes = data
  model = make_model(args.model, num_classes, args.width, args.depth)
  variables = model.init(
      jax.random.PRNGKey(args.seed), jnp.zeros((1, 32, 32, 3)))
  state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                            tx=tx, batch_stats=variables.get("batch_stats"))
  state = maybe_restore(args, name, state)
  step_fn, evaluate = make_train_step(model), make_evaluate(model)
  rng = np.random.default_rng(args.seed + int(state.step))
  key = jax.random.PRNGKey(args.seed)

  def run_step(state):
    index = rng.integers(0, len(train_y), args.batch_size)
    return step_fn(state, train_x[index], train_y[index],
                   jax.random.fold_in(key, int(state.step)))

  state, curve, times = timed_steps(state, args.steps, run_step, name, progress)
  maybe_save(args, name, state)
  n_params = sum(p.size for p in jax.tree.leaves(state.params))
  state_bytes = o4.state_nbytes(state.opt_state)
  steady = times[min(len(times) - 1, 3):]  # the first steps compile
  return {
      "train_loss": float(np.mean(curve[-20:])),
      "test_accuracy": evaluate(state, test_x, test_y),
      "state_bytes": state_bytes,
      "state_bytes_per_param": state_bytes / n_params,
      "ms_per_step": 1e3 * float(np.median(steady)),
      "ms_per_step_amortized": 1e3 * float(np.mean(steady)),
      "curve": curve,
      "params": n_params,
      "steps_done": int(state.step)
  }


def main(argv=None):
  parser = comparison_parser(__doc__.splitlines()[0], None, "runs/cifar", None)
  parser.add_argument("--data-dir", required=True)
  parser.add_argument("--model", choices=sorted(MODELS), default="resnet18")
  parser.add_argument(
      "--base", choices=sorted(PAPER), default=None,
      help="base optimizer (default: sgdm for ResNets, adamw for ViT-S, as in "
      "[S4])")
  parser.add_argument("--epochs", type=float, default=200.0,
                      help="used when --steps is not given")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--weight-decay", type=float, default=None)
  parser.add_argument("--width", type=int, default=None,
                      help="ResNet base channels (64) / ViT width (384)")
  parser.add_argument("--depth", type=int, default=None,
                      help="ViT encoder blocks (12)")
  parser.add_argument("--statistics-every", type=int, default=100,
                      help="Shampoo's T1 ([S4] CIFAR: 100)")
  parser.add_argument("--inverse-root-every", type=int, default=500,
                      help="Shampoo's T2 ([S4] CIFAR: 500)")
  parser.add_argument(
      "--write-synthetic", type=int, default=0, metavar="N",
      help="first write N synthetic CIFAR-10-format training images (N/5 test) "
      "into --data-dir")
  parser.set_defaults(learning_rate=None)
  args = parser.parse_args(argv)
  args.base = args.base or MODELS[args.model][0]
  hyper = PAPER[args.base]
  args.learning_rate = hyper[
      "learning_rate"] if args.learning_rate is None else args.learning_rate
  args.weight_decay = hyper[
      "weight_decay"] if args.weight_decay is None else args.weight_decay
  if args.write_synthetic:
    write_cifar_like(args.data_dir, args.write_synthetic,
                     max(10, args.write_synthetic // 5), args.seed)
  data = load_cifar(args.data_dir)
  if args.steps is None:
    args.steps = max(1, int(args.epochs * len(data[0][1]) // args.batch_size))
  available = optimizers(args.base, args.learning_rate, args.weight_decay,
                         args.steps, args.statistics_every,
                         args.inverse_root_every)
  if args.optimizers is None:
    args.optimizers = ",".join(available)
  results = run_comparison(
      parser, args, train_one, data, (("test_accuracy", "test acc"),),
      available=available, title=f"{args.model} on "
      f"{os.path.basename(os.path.normpath(args.data_dir))}", extra_json={
          "num_classes": data[2],
          "train_images": len(data[0][1])
      })
  print("amortized ms/step: " + ", ".join(
      f"{n} {r['ms_per_step_amortized']:.2f}" for n, r in results.items()))
  return results


if __name__ == "__main__":
  main()
