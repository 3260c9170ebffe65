"""Shared helpers of the benchmark scripts: model shapes, timing, table
printing, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, NamedTuple, Sequence

import jax
import jax.numpy as jnp


class FusedRow(NamedTuple):
  """A benchmark row whose steps run through ``optax_shampoo4.fused_step`` (see
  :func:`fused`)."""

  init: Callable[..., Any]
  update: Callable[..., Any]
  step: Callable[..., Any]


def fused(tx) -> FusedRow:
  """``tx`` (``adamw_4bit`` with the Pallas kernels) timed through its fused
  step."""
  import optax_shampoo4 as o4
  return FusedRow(tx.init, tx.update, o4.fused_step(tx))


def fused_adamw_4bit(learning_rate, second_moment: str,
                     packed=None) -> FusedRow:
  import optax_shampoo4 as o4
  packed = second_moment == "block" if packed is None else packed
  return fused(
      o4.adamw_4bit(
          learning_rate,
          config=o4.AdamConfig(second_moment=second_moment,
                               implementation="pallas", packed=packed)))


def gpt2_small_shapes() -> Dict[str, tuple]:
  """Parameter shapes of GPT-2 small (124.4M parameters, Hugging Face
  layout)."""
  d, vocab, context = 768, 50257, 1024
  shapes = {
      "wte": (vocab, d),
      "wpe": (context, d),
      "ln_f.scale": (d,),
      "ln_f.bias": (d,)
  }
  for i in range(12):
    shapes.update({
        f"h{i}.attn.kernel": (d, 3 * d),
        f"h{i}.attn.bias": (3 * d,),
        f"h{i}.proj.kernel": (d, d),
        f"h{i}.proj.bias": (d,),
        f"h{i}.fc.kernel": (d, 4 * d),
        f"h{i}.fc.bias": (4 * d,),
        f"h{i}.fc_proj.kernel": (4 * d, d),
        f"h{i}.fc_proj.bias": (d,),
        f"h{i}.ln1.scale": (d,),
        f"h{i}.ln1.bias": (d,),
        f"h{i}.ln2.scale": (d,),
        f"h{i}.ln2.bias": (d,)
    })
  return shapes


def vit_s16_shapes(classes: int = 1000) -> Dict[str, tuple]:
  """Parameter shapes of ViT-S/16 (22M parameters, Flax layout)."""
  d, mlp = 384, 1536
  shapes = {
      "patch.kernel": (16, 16, 3, d),
      "patch.bias": (d,),
      "cls": (1, 1, d),
      "pos": (1, 197, d),
      "head.kernel": (d, classes),
      "head.bias": (classes,),
      "norm.scale": (d,)
  }
  for i in range(12):
    shapes.update({
        f"b{i}.qkv.kernel": (d, 3 * d),
        f"b{i}.qkv.bias": (3 * d,),
        f"b{i}.proj.kernel": (d, d),
        f"b{i}.fc1.kernel": (d, mlp),
        f"b{i}.fc1.bias": (mlp,),
        f"b{i}.fc2.kernel": (mlp, d),
        f"b{i}.fc2.bias": (d,),
        f"b{i}.ln1.scale": (d,),
        f"b{i}.ln2.scale": (d,)
    })
  return shapes


def model_shapes(name: str) -> Dict[str, tuple]:
  """Parameter shapes of a model the optimizer-only benchmarks time:
  ``"gpt2_small"``, ``"vit_s16"`` or ``"lm_base"``."""
  return {
      "gpt2_small": gpt2_small_shapes,
      "vit_s16": vit_s16_shapes,
      "lm_base": lm_base_shapes
  }[name]()


def lm_base_shapes() -> Dict[str, tuple]:
  """Parameter shapes of ``examples/lm.py``'s base Flax GPT (85.6M parameters,
  the model of ``benchmarks/train_lm.py``), by parameter path."""
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
  import lm
  size = lm.SIZES["base"]
  model = lm.ByteTransformer(size["width"], size["layers"], size["heads"],
                             size["context"], jnp.bfloat16)
  tree = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size["context"]), jnp.int32)))
  return {
      jax.tree_util.keystr(path): leaf.shape
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree["params"])
  }


def gpt2_medium_shapes() -> Dict[str, tuple]:
  """Parameter shapes of GPT-2 medium (355M parameters)."""
  d, vocab, context = 1024, 50257, 1024
  shapes = {"wte": (vocab, d), "wpe": (context, d), "ln_f.scale": (d,)}
  for i in range(24):
    shapes.update({
        f"h{i}.attn.kernel": (d, 3 * d),
        f"h{i}.attn.bias": (3 * d,),
        f"h{i}.proj.kernel": (d, d),
        f"h{i}.fc.kernel": (d, 4 * d),
        f"h{i}.fc.bias": (4 * d,),
        f"h{i}.fc_proj.kernel": (4 * d, d),
        f"h{i}.ln1.scale": (d,),
        f"h{i}.ln2.scale": (d,)
    })
  return shapes


def random_tree(shapes: Dict[str, tuple], seed: int = 0, scale: float = 1e-2):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  return {
      name: scale * jax.random.normal(k, shape, jnp.float32)
      for k, (name, shape) in zip(keys, shapes.items())
  }


def parameter_count(shapes: Dict[str, tuple]) -> int:
  total = 0
  for shape in shapes.values():
    n = 1
    for d in shape:
      n *= d
    total += n
  return total


def time_call(fn: Callable, *args, warmup: int = 2, repeats: int = 10) -> float:
  """Median wall time in seconds of ``fn(*args)`` (results blocked on), after
  ``warmup`` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def machine() -> str:
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", "?")
  return (f"{device.platform}:{kind} x{jax.device_count()}, "
          f"jax {jax.__version__}, {platform.node()}")


def print_table(title: str, columns: Sequence[str],
                rows: List[Sequence]) -> str:
  cells = [[str(c) for c in columns]] + [
      [f"{v:.4g}" if isinstance(v, float) else str(v) for v in r] for r in rows
  ]
  widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
  lines = [
      f"### {title}", "",
      "| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
      "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  ]
  lines += [
      "| " + " | ".join(c.ljust(w)
                        for c, w in zip(r, widths)) + " |"
      for r in cells[1:]
  ]
  text = "\n".join(lines)
  print(text, flush=True)
  return text


def file_name(label: str) -> str:
  """``label`` as a file name: spaces to underscores, commas dropped."""
  return label.replace(" ", "_").replace(",", "")


def output_path(filename: str) -> str:
  """Where results go: ``$OUT`` (the GPU machine's output folder) if set, else
  ``benchmarks/results``."""
  directory = os.environ.get("OUT") or os.path.join(
      os.path.dirname(__file__), "results")
  os.makedirs(directory, exist_ok=True)
  return os.path.join(directory, filename)


def write_json(name: str, payload: dict) -> str:
  path = output_path(f"{name}.json")
  with open(path, "w") as f:
    json.dump({"machine": machine(), **payload}, f, indent=1)
  return path
