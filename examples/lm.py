"""Byte-level language model on the Python standard library's source files,
several optimizers compared.

    python examples/lm.py [--steps 300] [--size tiny|small|base] [--optimizers
    adamw,shampoo4,...] [--out runs/lm]

The corpus is every ``.py`` file under ``sysconfig.get_paths()["stdlib"]``
(present on every Python installation, no download), concatenated in sorted
order; the last 10 % is held out. Prints the same table as ``compare.py`` with
held-out bits per byte instead of accuracy, and writes ``results.json``,
``loss_curves.png`` and ``state_memory.png``. ``--size base`` is meant for a
GPU.
"""

from __future__ import annotations

import functools
import os
import platform
import sysconfig
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state

import optax_shampoo4 as o4
from compare import (comparison_parser, maybe_restore, maybe_save,
                     preconditioner_schedule, run_comparison, timed_steps)

SIZES = {
    "tiny": dict(width=64, layers=2, heads=4, context=64, batch=16),
    "small": dict(width=256, layers=4, heads=8, context=128, batch=32),
    "base": dict(width=768, layers=12, heads=12, context=256, batch=32)
}


def load_corpus(max_bytes: int = 4_000_000):
  """Bytes of the standard library's .py files (sorted paths), split 90 % / 10
  %."""
  root = sysconfig.get_paths()["stdlib"]
  chunks, total = [], 0
  for directory, _, files in sorted(os.walk(root)):
    if "site-packages" in directory or "test" in os.path.basename(directory):
      continue
    for name in sorted(files):
      if name.endswith(".py"):
        with open(os.path.join(directory, name), "rb") as f:
          data = f.read()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
          break
    if total >= max_bytes:
      break
  corpus = np.frombuffer(b"".join(chunks)[:max_bytes], np.uint8)
  if len(corpus) < 10_000:
    raise RuntimeError(f"standard library sources not found under {root}")
  split = int(0.9 * len(corpus))
  return corpus[:split], corpus[split:]


def corpus_fingerprint(corpus) -> dict:
  """What identifies a corpus of :func:`load_corpus`, which is the running
  Python's standard library and so differs between Python versions."""
  train, held_out = corpus
  return dict(python=platform.python_version(), train_bytes=len(train),
              held_out_bytes=len(held_out),
              crc32=zlib.crc32(train.tobytes() + held_out.tobytes()))


class Block(nn.Module):
  width: int
  heads: int
  dtype: Any = jnp.float32  # computation dtype (params stay fp32)

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    attention = nn.MultiHeadDotProductAttention(self.heads,
                                                qkv_features=self.width,
                                                dtype=self.dtype)
    x = x + attention(nn.LayerNorm(dtype=self.dtype)(x), mask=mask)
    h = nn.Dense(4 * self.width, dtype=self.dtype)(
        nn.LayerNorm(dtype=self.dtype)(x))
    return x + nn.Dense(self.width, dtype=self.dtype)(nn.gelu(h))


class ByteTransformer(nn.Module):
  width: int
  layers: int
  heads: int
  context: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(256, self.width)(tokens) + self.param(
        "position", nn.initializers.normal(0.02),
        (self.context, self.width))[:tokens.shape[1]]
    x = x.astype(self.dtype)
    for _ in range(self.layers):
      x = Block(self.width, self.heads, self.dtype)(x)
    return nn.Dense(256, dtype=jnp.float32)(nn.LayerNorm(dtype=jnp.float32)(x))


def batches(data, context, batch, rng):
  starts = rng.integers(0, len(data) - context - 1, batch)
  windows = np.stack([data[s:s + context + 1] for s in starts]).astype(np.int32)
  return windows[:, :-1], windows[:, 1:]


def train_one(name, tx, args, corpus, progress):
  size = SIZES[args.size]
  train, held_out = corpus
  model = ByteTransformer(size["width"], size["layers"], size["heads"],
                          size["context"])
  params = model.init(
      jax.random.PRNGKey(args.seed), jnp.zeros((1, size["context"]),
                                               jnp.int32))["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=tx)
  state = maybe_restore(args, name, state)

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  # the loop schedules Shampoo's and SOAP's updates (one program per schedule
  # entry, none with a conditional): on a GPU the host then runs ahead
  @functools.partial(jax.jit, static_argnames="due")
  def step(state, x, y, due):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, x, y)
    return o4.apply_scheduled_gradients(state, grads, due), loss

  evaluate = jax.jit(loss_fn)
  rng = np.random.default_rng(args.seed + int(state.step))
  schedule, next_step = preconditioner_schedule(name), int(state.step) + 1

  def run_step(state):
    nonlocal next_step
    due, next_step = schedule(next_step), next_step + 1
    return step(state, *batches(train, size["context"], size["batch"], rng),
                due=due)

  state, curve, times = timed_steps(state, args.steps, run_step, name, progress)
  maybe_save(args, name, state)
  eval_rng = np.random.default_rng(1234)
  held = [
      float(
          evaluate(state.params,
                   *batches(held_out, size["context"], size["batch"],
                            eval_rng))) for _ in range(8)
  ]
  n_params = sum(p.size for p in jax.tree.leaves(state.params))
  state_bytes = o4.state_nbytes(state.opt_state)
  return {
      "train_loss": float(np.mean(curve[-10:])),
      "held_out_bits_per_byte": float(np.mean(held) / np.log(2)),
      "state_bytes": state_bytes,
      "state_bytes_per_param": state_bytes / n_params,
      "ms_per_step": 1e3 * float(np.median(times[min(len(times) - 1, 5):])),
      "curve": curve,
      "params": n_params,
      "steps_done": int(state.step)
  }


def main(argv=None):
  parser = comparison_parser(__doc__.splitlines()[0], 300, "runs/lm",
                             "adamw,adamw_4bit,shampoo32,shampoo4,all_4bit")
  parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
  parser.add_argument("--max-bytes", type=int, default=4_000_000)
  args = parser.parse_args(argv)
  corpus = load_corpus(args.max_bytes)
  return run_comparison(parser, args, train_one, corpus,
                        (("held_out_bits_per_byte", "held-out bpb"),),
                        extra_json={"corpus_bytes": [len(c) for c in corpus]},
                        title="byte transformer")


if __name__ == "__main__":
  main()
