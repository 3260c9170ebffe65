"""eigh vs coupled Newton for the inverse 4th root of stacked statistics (matrix
/ Cholesky storages).

Run: ``PYTHONPATH=. python benchmarks/inverse_root.py``. Stacks shaped like
GPT-2 small's largest order classes; statistics are EMAs of G Gᵀ with a
decaying spectrum. Accuracy:
relative Frobenius error against a float64 eigendecomposition of the same fp32
matrices (first matrix of each stack).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from optax_shampoo4 import linalg


def statistics(count, order, seed=0):
  key = jax.random.PRNGKey(seed)
  g = jax.random.normal(key, (count, order, 2 * order)) * jnp.logspace(
      0, -3, order)[:, None]
  return linalg.gram(g) / (2 * order)


def reference(a):
  w, v = np.linalg.eigh(np.asarray(a, np.float64))
  return (v * (np.maximum(w, 0) + 1e-6 * w.max())**-0.25) @ v.T


def main():
  # no options; --help describes the script instead of running it
  argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
  rows, results = [], {}
  for count, order in ((163, 768), (101, 1200), (24, 672)):
    a = statistics(count, order)
    want = reference(a[0])
    for name, fn in (("eigh", linalg.inverse_root_eigh),
                     ("newton", linalg.inverse_root_newton)):
      jitted = jax.jit(fn)
      seconds = common.time_call(jitted, a, warmup=1, repeats=3)
      got = np.asarray(jitted(a)[0], np.float64)
      error = float(np.linalg.norm(got - want) / np.linalg.norm(want))
      rows.append([f"{count} x {order}", name, seconds * 1e3, error])
      results[f"{count}x{order}_{name}"] = {
          "seconds": seconds,
          "relative_error": error
      }
  table = common.print_table(
      f"Inverse 4th root of stacked statistics ({common.machine()})",
      ["stack", "method", "ms", "relative error vs float64"], rows)
  common.write_json("inverse_root", {"results": results, "table": table})


if __name__ == "__main__":
  main()
