"""The quantizer against a plain numpy float64 reference written here
(docs/algorithms.md)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import optax_shampoo4 as o4
from optax_shampoo4 import codes as cd
from helpers import unpacked_codes
from optax_shampoo4 import quantization as qz


# ------------------------------------------------------------ references
def reference_codes(x, table, block_size):
  """numpy: per-row blocks, absmax scale, argmin |x/s − T| (np.argmin returns
  the first = lower index)."""
  x = np.asarray(x, np.float32)
  n = x.shape[-1]
  scales = np.zeros(x.shape[:-1] + (-(-n // block_size),), np.float32)
  normalized = np.zeros_like(x)
  for b in range(scales.shape[-1]):
    sl = slice(b * block_size, min(n, (b + 1) * block_size))
    s = np.max(np.abs(x[..., sl]), axis=-1)
    scales[..., b] = s
    with np.errstate(invalid="ignore", divide="ignore"):
      normalized[..., sl] = np.where(s[..., None] > 0,
                                     x[..., sl] / s[..., None], 0.0)
  distance = np.abs(
      normalized.astype(np.float64)[..., None] - np.asarray(table, np.float64))
  return np.argmin(distance, axis=-1), scales, normalized


# ------------------------------------------------------------ round trip
@pytest.mark.parametrize("codebook,bits", [("linear2", 4), ("dynamic_tree", 4),
                                           ("linear2", 8), ("dynamic_tree", 8)])
@pytest.mark.parametrize("shape", [(1,), (2,), (63,), (64,), (65,), (127,),
                                   (1200,), (1201,), (3, 65), (2, 3, 127),
                                   (2, 2, 3, 64)])
def test_codes_match_numpy_reference(codebook, bits, shape):
  rng = np.random.default_rng(sum(shape) + bits)
  x = (rng.standard_normal(shape) * rng.uniform(0.1, 10)).astype(np.float32)
  table = o4.codebook(codebook, bits)
  q = o4.quantize(x, codebook=codebook, bits=bits, block_size=64)
  expected_codes, expected_scales, normalized = reference_codes(x, table, 64)
  # Points within float32 rounding of a decision boundary may legitimately go
  # either way.
  midpoints = (table[:-1].astype(np.float64) + table[1:]) / 2
  ambiguous = np.min(np.abs(normalized[..., None] - midpoints), axis=-1) < 1e-6
  codes = unpacked_codes(q)
  assert codes.shape == shape
  np.testing.assert_array_equal(codes[~ambiguous], expected_codes[~ambiguous])
  np.testing.assert_array_equal(np.asarray(q.scales[0]), expected_scales)
  # error bound: half the widest gap times the block scale
  decoded = np.asarray(o4.dequantize(q))
  bound = cd.max_rounding_error(codebook, bits) * np.repeat(
      expected_scales, 64, axis=-1)[..., :shape[-1]]
  # no −1 code: a negative block maximum decodes to −0.8875·scale at 4 bits
  if codebook == "dynamic_tree":
    bound = np.maximum(bound, (1 + table[0]) *
                       np.repeat(expected_scales, 64, axis=-1)[..., :shape[-1]])
  float32_slack = 4e-6 * np.repeat(expected_scales, 64,
                                   axis=-1)[..., :shape[-1]]
  assert np.all(np.abs(decoded - x) <= bound + float32_slack)


def test_all_zero_blocks_decode_to_exact_zeros():
  x = np.zeros((3, 130), np.float32)
  x[1, 70:] = np.linspace(-2, 2, 60)
  for codebook in qz.CODEBOOKS:
    for normalization in ("block", "rank1"):
      q = o4.quantize(x, codebook=codebook, normalization=normalization)
      decoded = np.asarray(o4.dequantize(q))
      assert np.all(np.isfinite(decoded))
      np.testing.assert_array_equal(decoded[0], 0.0)
      np.testing.assert_array_equal(decoded[1, :64], 0.0)


def test_negative_block_max_under_dynamic_tree():
  x = np.array([-4.0, 1.0, 0.5, -0.1], np.float32)
  decoded = np.asarray(
      o4.dequantize(o4.quantize(x, codebook="dynamic_tree", bits=4)))
  np.testing.assert_allclose(decoded[0], -0.8875 * 4.0, rtol=1e-6)


def test_keep_diagonal_is_exact_and_excluded_from_scales():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((70, 70)).astype(np.float32) * 0.01
  np.fill_diagonal(a, 1000.0 + np.arange(70))
  q = o4.quantize(a, keep_diagonal=True)
  decoded = np.asarray(o4.dequantize(q))
  np.testing.assert_array_equal(np.diag(decoded), np.diag(a))
  assert np.max(np.asarray(
      q.scales[0])) < 0.1  # the huge diagonal did not enter any block scale
  off_diagonal = np.where(np.eye(70, dtype=bool), 0.0, a)
  _, scales, _ = reference_codes(off_diagonal, o4.codebook("linear2", 4), 64)
  bound = cd.max_rounding_error("linear2", 4) * np.repeat(scales, 64,
                                                          axis=-1)[:, :70]
  assert np.all(np.abs(decoded - a) <= bound + 1e-9)


def test_rank1_scales_match_reference_2d_and_3d():
  rng = np.random.default_rng(1)
  for shape in [(40, 130), (3, 20, 70)]:
    v = (rng.standard_normal(shape)**2).astype(np.float32)
    q = o4.quantize(v, codebook="linear_nozero", normalization="rank1")
    maxima = [
        np.max(v, axis=tuple(a
                             for a in range(v.ndim)
                             if a != d))
        for d in range(v.ndim)
    ]
    for got, want in zip(q.scales, maxima):
      np.testing.assert_array_equal(np.asarray(got), want)
    scale = maxima[0].reshape([-1] + [1] * (v.ndim - 1))
    for d in range(1, v.ndim):
      scale = np.minimum(
          scale, maxima[d].reshape([1] * d + [-1] + [1] * (v.ndim - d - 1)))
    table = o4.codebook("linear_nozero", 4)
    expected = np.argmin(
        np.abs((v / scale)[..., None].astype(np.float64) - table), axis=-1)
    np.testing.assert_array_equal(unpacked_codes(q), expected)
    assert q.nbytes == int(np.prod(shape[:-1])) * (
        (shape[-1] + 1) // 2) + 4 * sum(shape)
  q1 = o4.quantize(
      np.ones(300, np.float32), normalization="rank1", codebook="linear_nozero")
  assert q1.spec.normalization == "block" and q1.spec.block_size == 128


def test_triangular_normalization_round_trips_both_triangles():
  rng = np.random.default_rng(2)
  n = 150
  lower = np.tril(rng.standard_normal((n, n)), -1).astype(np.float32) * 3.0
  upper = np.triu(rng.standard_normal(
      (n, n)), 1).astype(np.float32) * 1e-3  # much smaller: own scales
  diagonal = np.abs(rng.standard_normal(n)).astype(np.float32) + 1
  packed = lower + upper + np.diag(diagonal)
  decoded = np.asarray(
      o4.dequantize(o4.quantize(packed, normalization="triangular")))
  np.testing.assert_array_equal(np.diag(decoded), diagonal)
  for part, mask in ((lower, np.tril(np.ones(
      (n, n), bool), -1)), (upper, np.triu(np.ones((n, n), bool), 1))):
    got, want = decoded[mask], part[mask]
    assert np.linalg.norm(got - want) / np.linalg.norm(
        want) < 0.15  # 4-bit linear2 relative error
    np.testing.assert_array_equal(
        np.sign(got[np.abs(want) > 0.2 * np.abs(want).max()]),
        np.sign(want[np.abs(want) > 0.2 * np.abs(want).max()]))


def test_storage_bytes_of_a_1200_matrix():
  q = o4.quantize(jnp.ones((1200, 1200)), bits=4, block_size=64)
  assert q.nbytes <= 1200 * 600 + 1200 * 19 * 4
  assert 1200 * 1200 * 4 / q.nbytes >= 7.0
  assert o4.state_nbytes({"a": q, "b": jnp.zeros(10)}) == q.nbytes + 40
  assert o4.state_nbytes(jax.eval_shape(lambda: {"a": q})) == q.nbytes
  assert o4.quantize(jnp.ones((1200, 1200)),
                     bits=8).nbytes == 1200 * 1200 + 1200 * 19 * 4


# ------------------------------------------------------------ transforms
def test_jit_vmap_and_eager_agree():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 5, 130))
  kwargs = dict(codebook="linear2", bits=4, block_size=64)
  eager = o4.quantize(x, **kwargs)
  jitted = jax.jit(lambda a: o4.quantize(a, **kwargs))(x)
  mapped = jax.vmap(lambda a: o4.quantize(a, **kwargs))(x)
  for other in (jitted, mapped):
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(other)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(
      np.asarray(o4.dequantize(mapped)), np.asarray(o4.dequantize(eager)))
  np.testing.assert_array_equal(
      np.asarray(jax.vmap(o4.dequantize)(mapped)),
      np.asarray(o4.dequantize(eager)))


def test_passes_through_scan_cond_and_tree_map():
  q = o4.quantize(jnp.arange(256.0).reshape(2, 128) - 100)

  def body(carry, _):
    return jax.tree.map(lambda a: a, carry), None

  scanned, _ = jax.lax.scan(body, q, None, length=3)
  chosen = jax.lax.cond(True, lambda a: a, lambda a: a, q)
  for other in (scanned, chosen, jax.tree.map(lambda a: a, q)):
    assert isinstance(other, o4.QuantizedArray) and other.spec == q.spec
    np.testing.assert_array_equal(
        np.asarray(o4.dequantize(other)), np.asarray(o4.dequantize(q)))


def test_nonfinite_values_poison_only_their_own_block():
  x = np.linspace(-1, 1, 256).astype(np.float32).reshape(2, 128)
  clean = np.asarray(o4.dequantize(o4.quantize(x)))
  for bad in (np.nan, np.inf, -np.inf):
    y = x.copy()
    y[0, 70] = bad
    decoded = np.asarray(o4.dequantize(o4.quantize(y)))
    assert not np.all(np.isfinite(
        decoded[0, 64:128]))  # the block holding the bad value is visibly bad
    np.testing.assert_array_equal(decoded[0, :64], clean[0, :64])
    np.testing.assert_array_equal(decoded[1], clean[1])


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=5), "bits"),
    (dict(codebook="foo"), "codebook"),
    (dict(block_size=0), "block_size"),
    (dict(block_size=63), "even"),
    (dict(block_size=2.0), "block_size"),
    (dict(normalization="x"), "normalization"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    o4.quantize(jnp.ones(8), **kwargs)


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="rank"):
    o4.quantize(jnp.ones(()))
  with pytest.raises(ValueError, match="square"):
    o4.quantize(jnp.ones((3, 4)), keep_diagonal=True)
  with pytest.raises(TypeError, match="floating"):
    o4.quantize(jnp.ones(8, jnp.int32))


# one compile per drawn shape (eager, every operation compiles for it);
# test_jit_vmap_and_eager_agree ties the jitted codes to the eager ones
@functools.partial(jax.jit, static_argnames=("codebook", "bits", "block_size"))
def _jitted_roundtrip(x, codebook, bits, block_size):
  return o4.dequantize(
      o4.quantize(x, codebook=codebook, bits=bits, block_size=block_size))


@settings(max_examples=25, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=150),
        elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False)),
    st.sampled_from([("linear2", 4), ("dynamic_tree", 4), ("linear2", 8)]),
    st.sampled_from([2, 64, 128]))
def test_property_roundtrip_error_is_bounded(x, codebook_bits, block_size):
  codebook, bits = codebook_bits
  decoded = np.asarray(
      _jitted_roundtrip(x, codebook=codebook, bits=bits, block_size=block_size))
  assert decoded.shape == x.shape and np.all(np.isfinite(decoded))
  _, scales, _ = reference_codes(x, o4.codebook(codebook, bits), block_size)
  scale = np.repeat(scales, block_size, axis=-1)[..., :x.shape[-1]]
  slack = (
      1 + o4.codebook(codebook, bits)[0]) if codebook == "dynamic_tree" else 0.0
  bound = max(cd.max_rounding_error(codebook, bits), slack) * scale
  # XLA flushes denormals to zero, so blocks whose absmax is near the smallest
  # normal float decode to 0.
  assert np.all(
      np.abs(decoded - x) <= bound + 4e-6 * scale +
      2 * np.finfo(np.float32).tiny)
