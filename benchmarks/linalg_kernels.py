"""The linear algebra of the statistics step, timed on its own (GPU):
the fp32 matrix-product algorithms XLA offers, the eigenvector statistics
update under each of them and each number of Cholesky-QR passes, and the
batched factorizations, all on stacks of order-1200 blocks.

Run by ``benchmarks/profile.py`` unless ``--skip-extras``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
import optax_shampoo4 as o4


def algorithms(order: int = 1200, count: int = 101):
  """Rate and relative error (vs HIGHEST) of a batched fp32 product with each
  dot algorithm XLA offers."""
  key = jax.random.PRNGKey(0)
  a = jax.random.normal(key, (count, order, order), jnp.float32)
  b = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(1),
                                      (order, order)))[0] * jnp.logspace(
                                          0, -6, order)
  reference = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
  flops = 2 * count * order**3
  rows = []
  candidates = [("HIGHEST", jax.lax.Precision.HIGHEST),
                ("HIGH", jax.lax.Precision.HIGH),
                ("DEFAULT", jax.lax.Precision.DEFAULT)]
  for name in ("TF32_TF32_F32_X3", "BF16_BF16_F32_X6", "BF16_BF16_F32_X3",
               "BF16_BF16_F32_X9"):
    candidates.append((name, getattr(jax.lax.DotAlgorithmPreset, name)))
  for name, precision in candidates:
    try:
      fn = jax.jit(lambda x, y, p=precision: jnp.matmul(x, y, precision=p))
      seconds = common.time_call(fn, a, b, repeats=5)
      error = float(
          jnp.linalg.norm(fn(a, b) - reference) / jnp.linalg.norm(reference))
      rows.append([name, seconds * 1e3, flops / seconds / 1e12, error])
    except Exception as e:  # an algorithm the backend does not offer
      rows.append([name, "unsupported", str(e)[:60], "-"])
  return rows


def factorizations(order: int = 1200, count: int = 101):
  x = jax.random.normal(
      jax.random.PRNGKey(2), (count, order, order), jnp.float32)
  spd = jnp.matmul(x, jnp.swapaxes(x, -1, -2),
                   precision=jax.lax.Precision.HIGHEST) / order + jnp.eye(order)
  lower = jnp.linalg.cholesky(spd)
  programs = {
      "cholesky": (jax.jit(jnp.linalg.cholesky), spd),
      "triangular_solve (right, transposed)":
          (jax.jit(lambda l, b: jax.lax.linalg.triangular_solve(
              l, b, left_side=False, lower=True, transpose_a=True)), lower, x),
      "eigh": (jax.jit(jnp.linalg.eigh), spd),
      "matmul HIGHEST": (jax.jit(
          lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)),
                         x, x),
  }
  return [[name, common.time_call(fn, *args, repeats=3) * 1e3]
          for name, (fn, *args) in programs.items()]


def statistics_problem(order: int, updates: int):
  """``(grams, reference)``: ``updates`` Gram matrices of two blocks whose
  gradients have a spectrum spanning three decades, and the float64 inverse
  4th root of their EMA."""
  rng = np.random.default_rng(0)
  basis = np.linalg.qr(rng.standard_normal(
      (order, order)))[0] * np.logspace(0, -3, order)
  streams = [
      np.stack([
          basis @ rng.standard_normal((order, order)) / np.sqrt(order)
          for _ in range(2)
      ])
      for _ in range(updates)
  ]
  grams = [np.einsum("kij,klj->kil", g, g) for g in streams]
  statistic = np.broadcast_to(1e-6 * np.eye(order), (2, order, order))
  for g in grams:
    statistic = 0.95 * statistic + 0.05 * g
  values, vectors = np.linalg.eigh(statistic)
  damped = values + 1e-6 * values[:, -1:]
  return grams, np.einsum("kij,kj,klj->kil", vectors, damped**-0.25, vectors)


def statistics_variants(order: int = 1200, count: int = 101, updates: int = 4):
  """The eigenvector statistics update of an order-1200 stack under each dot
  algorithm and number of Cholesky-QR passes: time (4-bit storage, ``count``
  blocks), and the error of the inverse root after ``updates`` updates (2
  blocks, fp32 and 4-bit storage) against a float64 reference; for fp32 storage
  also the difference from the HIGHEST, 3-pass pipeline."""
  import functools
  from optax_shampoo4 import linalg, preconditioners
  hyper = preconditioners.Hyper(0.95, 1e-6, 0.0)
  grams, reference = statistics_problem(order, updates)
  timing_grams = linalg.gram(
      jax.random.normal(jax.random.PRNGKey(order), (count, order, 256)))
  original_orthonormalize = linalg.orthonormalize_columns
  variants = [("HIGHEST", jax.lax.Precision.HIGHEST, 3),
              ("HIGHEST", jax.lax.Precision.HIGHEST, 2)]
  for name in ("TF32_TF32_F32_X3", "BF16_BF16_F32_X6", "BF16_BF16_F32_X3"):
    variants.append((name, getattr(jax.lax.DotAlgorithmPreset, name), 3))

  def final_root(bits, numerics):
    storage = preconditioners.make_storage(
        o4.ShampooConfig(bits=bits, min_quantized_size=0), order, numerics)
    update = jax.jit(lambda s, g: storage.update_statistics(s, g, hyper))
    state, failures = storage.init(2, order, hyper), 0
    for g in grams:
      state, ok = update(state, jnp.asarray(g, jnp.float32))
      failures += int(np.sum(~np.asarray(ok)))
    root = jax.jit(lambda s: storage.inverse_root(
        storage.update_inverse_root(s, hyper)[0]))(
            state)
    return np.asarray(root, np.float64), failures

  relative = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
  rows, highest_root = [], None
  for name, precision, passes in variants:
    linalg.orthonormalize_columns = functools.partial(original_orthonormalize,
                                                      passes=passes)
    try:
      numerics = linalg.Numerics(precision)
      storage4 = preconditioners.make_storage(
          o4.ShampooConfig(bits=4, min_quantized_size=0), order, numerics)
      update4 = jax.jit(lambda s, g: storage4.update_statistics(s, g, hyper)[0])
      seconds = common.time_call(update4, storage4.init(count, order, hyper),
                                 timing_grams, repeats=3)
      root32, failures32 = final_root(32, numerics)
      root4, failures4 = final_root(4, numerics)
      highest_root = root32 if highest_root is None else highest_root
      rows.append([
          name, passes, seconds * 1e3,
          relative(root32, reference),
          relative(root32, highest_root),
          relative(root4, reference), failures32 + failures4
      ])
    except Exception as e:  # an algorithm the backend does not offer
      rows.append([name, passes, "unsupported", str(e)[:50], "-", "-", "-"])
    finally:
      linalg.orthonormalize_columns = original_orthonormalize
  return rows


def extra_tables():
  """``(payload, tables)``: dot algorithms, statistics-update variants and
  batched factorizations of order-1200 stacks."""
  payload = {
      "algorithms": algorithms(),
      "statistics_variants": statistics_variants(),
      "factorizations": factorizations()
  }
  tables = [
      common.print_table(
          f"Dot algorithms, (101, 1200, 1200) fp32 products "
          f"({common.machine()})",
          ["algorithm", "ms", "TFLOP/s", "rel. error vs HIGHEST"],
          payload["algorithms"]),
      common.print_table(
          "Eigenvector statistics update of a (101, 1200, 1200) stack by dot "
          "algorithm and Cholesky-QR passes", [
              "algorithm", "passes", "4-bit update ms", "fp32 root err vs fp64",
              "fp32 root diff vs HIGHEST/3", "4-bit root err vs fp64",
              "rejected"
          ], payload["statistics_variants"]),
      common.print_table("Batched factorizations, (101, 1200, 1200) fp32",
                         ["op", "ms"], payload["factorizations"])
  ]
  return payload, tables
