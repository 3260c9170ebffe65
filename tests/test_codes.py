"""Codebooks and codes (optax_shampoo4.codes) against the papers' tables and a
plain numpy float64 reference written here (docs/algorithms.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_shampoo4 as o4
from helpers import unpacked_codes
from optax_shampoo4 import codes as cd

SPEC_LINEAR2 = [
    -1, -0.7511, -0.5378, -0.36, -0.2178, -0.1111, -0.04, 0, 0.0044, 0.04,
    0.1111, 0.2178, 0.36, 0.5378, 0.7511, 1
]
SPEC_DT = sorted([
    s * v
    for v in (0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875)
    for s in (1, -1)
] + [0.0, 1.0])
SPEC_DT_UNSIGNED = [
    0, 0.00325, 0.00775, 0.02125, 0.04375, 0.06625, 0.08875, 0.15625, 0.26875,
    0.38125, 0.49375, 0.60625, 0.71875, 0.83125, 0.94375, 1.0
]


@pytest.mark.parametrize("name,expected",
                         [("linear2", SPEC_LINEAR2), ("dynamic_tree", SPEC_DT),
                          ("dynamic_tree_unsigned", SPEC_DT_UNSIGNED),
                          ("linear_nozero", [(i + 1) / 16 for i in range(16)])])
def test_codebooks_equal_spec(name, expected):
  np.testing.assert_allclose(
      o4.codebook(name, 4), expected, atol=1e-4 if name == "linear2" else 1e-6)


def test_linear2_exact_formula_and_8bit():
  x = np.linspace(-1, 1, 16)
  x[7] = 0
  np.testing.assert_allclose(
      o4.codebook("linear2", 4),
      np.sign(x) * x**2, atol=1e-7)
  x8 = np.linspace(-1, 1, 256)
  x8[127] = 0
  np.testing.assert_allclose(
      o4.codebook("linear2", 8),
      np.sign(x8) * x8**2, atol=1e-7)
  for name in ("dynamic_tree", "dynamic_tree_unsigned", "linear2"):
    table = o4.codebook(name, 8)
    assert table.shape == (256,) and np.all(
        np.diff(table) > 0) and table[-1] == 1.0
  assert o4.codebook("dynamic_tree",
                     8).min() > -1.0  # no −1 code, like the 4-bit map


@pytest.mark.parametrize("bits", [4, 8])
def test_linear2_decodes_from_the_code_without_selects_or_lookups(bits):
  """Linear-2 decodes every code to its table entry, computed in the program
  from the code: no chain of selects (one per code) and no gather."""
  codes = jnp.arange(2**bits, dtype=jnp.uint8)
  decode = jax.jit(lambda c: cd.decode(c, "linear2", bits))
  np.testing.assert_array_equal(
      np.asarray(decode(codes)), o4.codebook("linear2", bits))
  program = decode.lower(codes).as_text()
  # one comparison, for the exact zero (jnp.where lowers to one shared call,
  # so the comparisons count the selects)
  assert program.count("stablehlo.compare") == 1
  assert "gather" not in program


@pytest.mark.parametrize("codebook", cd.CODEBOOKS)
def test_8bit_encoder_looks_up_one_midpoint(codebook):
  """The 8-bit encoder's program reads the midpoint table once per element (a
  binary search would read it eight times)."""
  encode = jax.jit(lambda x: cd.encode(x, codebook, 8))
  program = encode.lower(jnp.linspace(-1, 1, 64)).as_text()
  assert program.count("\"stablehlo.gather\"(") == 1


@pytest.mark.parametrize(
    "bad", [dict(name="nope", bits=4),
            dict(name="linear2", bits=3)])
def test_codebook_rejects_bad_arguments(bad):
  with pytest.raises(ValueError, match="codebook|bits"):
    o4.codebook(**bad)


@pytest.mark.parametrize(
    "codebook",
    ["linear2", "dynamic_tree", "dynamic_tree_unsigned", "linear_nozero"])
def test_4bit_binary_search_counts_exceeded_midpoints(codebook):
  """The 4-bit encoder's binary search against a numpy count of ``x >
  fl32(midpoint_k · scale)`` on hard
  inputs: scales from 1e-30 to 1e30, zero / NaN / inf scales, points exactly on
    a boundary, NaN / inf.
  (Denormal products are left out: XLA flushes them to zero, numpy does not.)"""
  rng = np.random.default_rng(7)
  n = 50_000
  scale = (np.abs(rng.standard_normal(n)) *
           10.0**rng.uniform(-30, 30, n)).astype(np.float32)
  scale[:50], scale[50:100], scale[100:150] = 0, np.nan, np.inf
  x = (rng.uniform(-1.1, 1.1, n) * scale).astype(np.float32)
  midpoints = cd.decision_boundaries(codebook, 4)
  on_boundary = slice(200, 200 + 15 * 50)
  x[on_boundary] = np.repeat(midpoints, 50) * scale[on_boundary]
  x[-150:-100], x[-100:-50], x[-50:] = np.nan, np.inf, -np.inf
  positive = scale > 0
  safe_scale = np.where(positive, scale, np.float32(1))
  with np.errstate(invalid="ignore"):
    expected = np.sum(
        np.where(positive, x, 0)[:, None]
        > midpoints[None, :] * safe_scale[:, None], axis=1)
  codes = jax.jit(lambda a, b: cd.encode_scaled(a, b, codebook, 4))(x, scale)
  np.testing.assert_array_equal(np.asarray(codes), expected)


@pytest.mark.parametrize("codebook", cd.CODEBOOKS)
def test_8bit_code_counts_exceeded_midpoints(codebook):
  """The 8-bit encoder (the formula's lower code and one midpoint) against a numpy
  count of ``x > midpoint_k`` on uniform values, values spread over twelve
  decades, every midpoint and the floats just above and below it, a dense
  grid around every midpoint, ±1, ±0, denormals, NaN and ±inf."""
  rng = np.random.default_rng(3)
  midpoints = cd.decision_boundaries(codebook, 8)
  x = np.concatenate([
      rng.uniform(-1.05, 1.05, 20_000),
      rng.standard_normal(20_000) * 10.0**rng.uniform(-12, 0, 20_000),
      midpoints,
      np.nextafter(midpoints, np.float32(np.inf)),
      np.nextafter(midpoints, np.float32(-np.inf)),
      np.outer(midpoints, 1 + np.linspace(-2e-3, 2e-3, 41)).ravel(),
      [0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, np.nan, np.inf, -np.inf]
  ]).astype(np.float32)
  with np.errstate(invalid="ignore"):
    expected = np.sum(x[:, None] > midpoints[None, :], axis=1)
  codes = jax.jit(lambda a: cd.encode(a, codebook, 8))(x)
  np.testing.assert_array_equal(np.asarray(codes), expected)


def test_ties_go_to_the_lower_code():
  # linear_nozero's entries (i + 1)/16 and their midpoints (2i + 3)/32 are exact
  # in binary: exact ties.
  midpoints = (2 * np.arange(15) + 3) / 32
  x = np.concatenate([[1.0], midpoints
                     ]).astype(np.float32)  # block max 1.0: normalized == value
  codes = unpacked_codes(
      o4.quantize(x, codebook="linear_nozero", bits=4, block_size=64))
  np.testing.assert_array_equal(codes[1:], np.arange(15))


@pytest.mark.parametrize("codebook", ["dynamic_tree", "linear2"])
def test_8bit_ties_go_to_the_lower_code_and_the_next_float_up_to_the_upper(
    codebook):
  """The 8-bit encoder on every fp32 midpoint of its codebook exactly (block max
  1.0, so the normalized value is the input) and on the next fp32 number above
  it."""
  table = o4.codebook(codebook, 8).astype(np.float32)
  midpoints = cd.decision_boundaries(codebook, 8)
  above = np.nextafter(midpoints, np.float32(np.inf))
  x = np.concatenate([[1.0], midpoints, [1.0], above]).astype(np.float32)
  q = o4.quantize(x, codebook=codebook, bits=8, block_size=256)
  decoded = np.asarray(o4.dequantize(q))
  np.testing.assert_array_equal(decoded[1:256], table[:-1])
  np.testing.assert_array_equal(decoded[257:], table[1:])


def test_packing_puts_even_elements_low_and_never_shares_bytes_between_rows():
  codes = jnp.asarray([[1, 2, 3], [4, 5, 6]], jnp.uint8)
  packed = np.asarray(cd.pack_nibbles(codes))
  np.testing.assert_array_equal(packed, [[1 | 2 << 4, 3], [4 | 5 << 4, 6]])
  np.testing.assert_array_equal(
      np.asarray(cd.unpack_nibbles(jnp.asarray(packed), 3)), codes)


def test_halves_pairing_round_trips_and_pairs_columns_64_apart():
  codes = np.arange(2 * 256, dtype=np.uint8).reshape(2, 256) % 16
  packed = np.asarray(cd.pack_nibbles(jnp.asarray(codes), "halves"))
  assert packed.shape == (2, 128)
  np.testing.assert_array_equal(packed[:, 0], codes[:, 0] | (codes[:, 64] << 4))
  np.testing.assert_array_equal(packed[:, 64],
                                codes[:, 128] | (codes[:, 192] << 4))
  np.testing.assert_array_equal(
      np.asarray(cd.unpack_nibbles(jnp.asarray(packed), 256, "halves")), codes)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 256))
  a = o4.quantize(x, codebook="dynamic_tree", block_size=128)
  b = o4.quantize(x, codebook="dynamic_tree", block_size=128, pairing="halves")
  np.testing.assert_array_equal(
      np.asarray(o4.dequantize(a)), np.asarray(o4.dequantize(b)))
  with pytest.raises(ValueError, match="pairing"):
    o4.quantize(jnp.ones((3, 100)), pairing="halves")
