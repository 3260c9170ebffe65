"""Quantize / dequantize throughput of a 4096×4096 fp32 matrix against a
device-to-device copy.

Run: ``PYTHONPATH=. python benchmarks/quantization.py``. Bytes counted are those
each operation must read and write (fp32 input, packed codes, fp32 block
scales); the copy reads and writes the fp32 matrix.
"""

import argparse

import jax
import jax.numpy as jnp

from benchmarks import common
from optax_shampoo4 import dequantize, quantize


def main(n: int = 4096):
  x = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  copy = jax.jit(lambda a: a + 0.0)  # a real read + write of every byte
  copy_time = common.time_call(copy, x, repeats=30)
  copy_bandwidth = 2 * x.nbytes / copy_time
  rows = [[
      "copy (fp32)", copy_time * 1e3, 2 * x.nbytes / 1e6, copy_bandwidth / 1e9,
      100.0
  ]]
  results = {"copy": {"seconds": copy_time, "bytes": 2 * x.nbytes}}
  for bits, codebook in ((4, "linear2"), (8, "linear2"), (4, "dynamic_tree"),
                         (8, "dynamic_tree")):
    encode = jax.jit(
        lambda a: quantize(a, bits=bits, codebook=codebook, block_size=64))
    decode = jax.jit(dequantize)
    q = encode(x)
    stored = q.nbytes
    for name, fn, arg, moved in (("quantize", encode, x, x.nbytes + stored),
                                 ("dequantize", decode, q, x.nbytes + stored)):
      seconds = common.time_call(fn, arg, repeats=30)
      rows.append([
          f"{name} {bits}-bit {codebook}", seconds * 1e3, moved / 1e6,
          moved / seconds / 1e9, 100 * moved / seconds / copy_bandwidth
      ])
      results[f"{name}_{bits}bit_{codebook}"] = {
          "seconds": seconds,
          "bytes": moved
      }
    round_trip = results[f"quantize_{bits}bit_{codebook}"]["seconds"] + results[
        f"dequantize_{bits}bit_{codebook}"]["seconds"]
    moved = 2 * (x.nbytes + stored)
    rows.append([
        f"round trip {bits}-bit {codebook}", round_trip * 1e3, moved / 1e6,
        moved / round_trip / 1e9, 100 * moved / round_trip / copy_bandwidth
    ])
  table = common.print_table(
      f"Quantization throughput, {n}x{n} fp32 ({common.machine()})",
      ["operation", "ms", "MB moved", "GB/s", "% of copy"], rows)
  common.write_json("quantization", {"results": results, "table": table})


if __name__ == "__main__":
  # no options; --help describes the script instead of running it
  argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
  main()
