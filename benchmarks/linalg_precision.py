"""The statistics step's linear algebra at each product precision: time and
accuracy against float64.

Run: ``PYTHONPATH=. python benchmarks/linalg_precision.py [--precisions
highest,bf16_3x]`` (default: all of ``PRECISIONS``). One statistics update of a stack of 4-bit
eigenvector preconditioners as :mod:`optax_shampoo4.preconditioners` runs it
(Björck on load, the statistic rebuilt, its EMA with a gradient's Gram, one
warm-started subspace-iteration step), on the orders of the 86 M-param GPT of
``benchmarks/train_lm.py`` (171 × 768, 48 × 1200, 24 × 672). The statistics have
eigenvalues spanning six decades and the bases start from the quantized float64
eigenbasis, as after earlier steps. Accuracy, on the first matrix of each
stack, against the same update in float64 numpy from the same quantized start:
``max |λ − λ₆₄| / max λ₆₄`` and the median of ``|λ − λ₆₄| / λ₆₄`` of the
eigenvalues, and ``max |V Vᵀ − I|``.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import common
from optax_shampoo4 import linalg, quantization

STACKS = ((171, 768), (48, 1200), (24, 672))
PRECISIONS = {
    "highest": lax.Precision.HIGHEST,
    "bf16_3x": lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
    "bf16_6x": lax.DotAlgorithmPreset.BF16_BF16_F32_X6,
    "tf32_3x": lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
    "tf32": lax.DotAlgorithmPreset.TF32_TF32_F32,
}


def problem(count, order, seed=0):
  """``(statistic, gradient, quantized rows, eigenvalues)`` of a stack."""
  key1, key2 = jax.random.split(jax.random.PRNGKey(seed))
  spectrum = jnp.logspace(0, -3, order)[:, None]
  g = jax.random.normal(key1, (count, order, 2 * order)) * spectrum
  a = linalg.gram(g) / (2 * order)
  w, v = np.linalg.eigh(np.asarray(a, np.float64))
  rows = np.swapaxes(v[..., ::-1], -1, -2)
  q = quantization.quantize(jnp.asarray(rows, jnp.float32), bits=4)
  grad = jax.random.normal(key2, (count, order, order)) * spectrum
  return a, grad, q, jnp.asarray(w[..., ::-1].copy(), jnp.float32)


def statistics_update(precision):
  numerics = linalg.Numerics(precision=precision)

  def update(q, eigenvalues, grad):
    rows = linalg.bjorck(quantization.dequantize(q), 1, numerics)
    scaled = rows * eigenvalues[..., :, None]
    statistic = linalg.symmetrize(
        linalg.matmul(linalg.transpose(rows), scaled, numerics))
    statistic = 0.95 * statistic + 0.05 * linalg.gram(grad, numerics)
    return linalg.subspace_iteration_step(statistic, rows, numerics=numerics)

  return jax.jit(update)


def reference(q, eigenvalues, grad):
  """The same update of the first matrix in float64 (QR for the
  orthonormalization)."""
  rows = np.asarray(quantization.dequantize(q)[0], np.float64)
  rows = 1.5 * rows - 0.5 * rows @ rows.T @ rows
  statistic = rows.T @ (rows * np.asarray(eigenvalues[0], np.float64)[:, None])
  g = np.asarray(grad[0], np.float64)
  statistic = 0.95 * statistic + 0.05 * g @ g.T
  product = statistic @ rows.T
  largest = np.max(np.linalg.norm(product, axis=0))
  basis, r = np.linalg.qr(product + 1e-5 * largest * rows.T)
  basis = basis * np.sign(np.diag(r))
  return np.sum(basis * (statistic @ basis), axis=0)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--precisions", default=",".join(PRECISIONS))
  args = parser.parse_args(argv)
  rows, results = [], {}
  for count, order in STACKS:
    a, grad, q, eigenvalues = problem(count, order)
    del a
    want = reference(q, eigenvalues, grad)
    for name in args.precisions.split(","):
      update = statistics_update(PRECISIONS[name])
      new_rows, got = update(q, eigenvalues, grad)
      seconds = common.time_call(update, q, eigenvalues, grad, warmup=1,
                                 repeats=5)
      deviation = np.abs(np.asarray(got[0], np.float64) - want)
      error = float(np.max(deviation) / np.max(want))
      relative = float(np.median(deviation / np.abs(want)))
      orthogonality = float(
          linalg.orthogonality_error(new_rows[:1].astype(jnp.float32))[0])
      rows.append([
          f"{count} x {order}", name, seconds * 1e3, error, relative,
          orthogonality
      ])
      results[f"{count}x{order}_{name}"] = dict(
          seconds=seconds, eigenvalue_error=error,
          median_relative_eigenvalue_error=relative,
          orthogonality=orthogonality)
  table = common.print_table(
      f"Statistics update by product precision ({common.machine()})", [
          "stack", "precision", "ms", "eigenvalue error / max λ",
          "median relative eigenvalue error", "orthogonality error"
      ], rows)
  common.write_json("linalg_precision", {"results": results, "table": table})


if __name__ == "__main__":
  main()
