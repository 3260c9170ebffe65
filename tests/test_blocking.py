"""Blocking of real Flax parameter trees, the DimensionNumbers override, chunked
updates, working memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import optax_shampoo4 as o4
from optax_shampoo4 import blocking, chunks, linalg, stacks
from helpers import matrix_shapes


class Model(nn.Module):

  @nn.compact
  def __call__(self, tokens, image):
    x = nn.Embed(100, 32)(tokens)
    x = nn.MultiHeadDotProductAttention(4, qkv_features=64, out_features=32)(x)
    x = nn.DenseGeneral((4, 8))(x).reshape(x.shape)
    y = nn.Conv(16, (3, 3))(image)
    return x.sum() + y.sum()


def flax_params():
  return jax.eval_shape(Model().init, jax.random.PRNGKey(0),
                        jnp.zeros((1, 5), jnp.int32), jnp.zeros(
                            (1, 8, 8, 8)))["params"]


def test_default_rule_splits_every_flax_layout_where_its_sides_balance():
  params = flax_params()
  shapes = matrix_shapes(params)
  expected = {
      "['Embed_0']['embedding']": ((100, 32), (100, 32)),
      "['MultiHeadDotProductAttention_0']['query']['kernel']": (
          (32, 4, 16), (32, 64)),  # (d, heads, hd)
      "['MultiHeadDotProductAttention_0']['out']['kernel']": (
          (4, 16, 32), (64, 32)),  # (heads, hd, d)
      "['MultiHeadDotProductAttention_0']['query']['bias']": ((4, 16), (4, 16)),
      "['DenseGeneral_0']['kernel']": ((32, 4, 8), (32, 32)),
      "['Conv_0']['kernel']": ((3, 3, 8, 16), (72, 16)),  # (kh, kw, Cin, Cout)
      "['Conv_0']['bias']": ((16,), None),
  }
  for key, value in expected.items():
    assert shapes[key] == value, key
  # GPT-sized attention: the merged-axes rule gave (9216, 64); the balanced
  # split is square
  assert blocking.matrix_shape((768, 12, 64)) == (768, 768)
  assert blocking.matrix_shape((12, 64, 768)) == (768, 768)
  assert blocking.matrix_shape((3, 3, 64, 128)) == (576, 128)
  assert blocking.matrix_shape(
      (1, 5, 1, 7)) == (5, 7) and blocking.matrix_shape((7,)) is None


def reference_update(g, epsilon=1e-6, beta=0.95):
  """float64: one statistics + root step of fp32 classic Shampoo on the matrix
  g, grafted."""

  def root(a):
    a = beta * epsilon * np.eye(len(a)) + (1 - beta) * a
    w, v = np.linalg.eigh(a)
    return (v * (w + epsilon * w.max())**-0.25) @ v.T

  u = root(g @ g.T) @ g @ root(g.T @ g)
  return u * np.linalg.norm(g) / np.linalg.norm(u)


def one_step(config, params, grads):
  tx = o4.scale_by_shampoo(config, statistics_every=1, inverse_root_every=1)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  return updates


@pytest.mark.parametrize("override", [False, True])
def test_3d_kernel_update_matches_float64_reference(override):
  rng = np.random.default_rng(0)
  g = rng.standard_normal((32, 4, 16))
  exact = dict(bits=32, storage="matrix", inverse_root_method="eigh")
  if override:  # each head its own (32, 16) matrix
    config = o4.ShampooConfig(
        **exact,
        dimension_numbers={"k": o4.DimensionNumbers(rows=(0,), cols=(2,))})
    expected = np.stack([reference_update(g[:, h, :]) for h in range(4)],
                        axis=1)
    plan, _, _ = stacks.make_plan(config, {"k": g})
    assert dict(plan.stack_sizes) == {16: 4, 32: 4}
  else:
    config = o4.ShampooConfig(**exact)
    expected = reference_update(g.reshape(32, 64)).reshape(g.shape)
  got = one_step(config, {"k": jnp.zeros(g.shape)},
                 {"k": jnp.asarray(g, jnp.float32)})["k"]
  if override:  # grafting is per whole tensor: compare directions per head
    for h in range(4):
      a, b = np.asarray(got)[:, h], expected[:, h]
      np.testing.assert_allclose(a / np.linalg.norm(a), b / np.linalg.norm(b),
                                 rtol=1e-3, atol=1e-5)
  else:
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-3, atol=5e-5)


def test_unpreconditioned_biases_pass_linen_and_nnx_biases_to_the_base():
  """By default every leaf named ``bias`` (linen's path ends in it, nnx's in
  ``bias`` then ``value``, a flattened tree's key in ``/bias`` or
  ``['bias']``) gets no preconditioner: its update is the gradient itself,
  while the shape rule (``dimension_numbers=None``) preconditions a 2-D
  attention bias; the kernels' updates are the same under both."""
  import flax
  from flax import nnx
  assert o4.ShampooConfig().dimension_numbers is o4.unpreconditioned_biases
  random_like = lambda tree: jax.tree.map(
      lambda p: jax.random.normal(jax.random.PRNGKey(p.size), p.shape), tree)
  bits32 = dict(bits=32, storage="matrix", inverse_root_method="eigh")

  def updates(params, spec):
    config = o4.ShampooConfig(**bits32, dimension_numbers=spec)
    return jax.tree_util.tree_leaves_with_path(
        one_step(config, params, random_like(params)))

  linen = jax.tree.map(jnp.zeros_like, flax_params())
  two_d_biases = 0
  for (path, g), (_, shape_rule), (_, default) in zip(
      jax.tree_util.tree_leaves_with_path(random_like(linen)),
      updates(linen, None), updates(linen, o4.unpreconditioned_biases)):
    key = jax.tree_util.keystr(path)
    if key.endswith("['bias']"):
      np.testing.assert_array_equal(np.asarray(default), np.asarray(g), key)
      if g.ndim == 2:  # query, key, value and DenseGeneral: (heads, head_dim)
        two_d_biases += 1
        assert not np.allclose(np.asarray(shape_rule), np.asarray(g)), key
    else:
      np.testing.assert_array_equal(
          np.asarray(default), np.asarray(shape_rule), key)
  assert two_d_biases == 4

  attention = nnx.MultiHeadAttention(num_heads=4, in_features=32,
                                     qkv_features=64, decode=False,
                                     rngs=nnx.Rngs(0))
  params = nnx.state(attention, nnx.Param)
  for (path, g), (_, default) in zip(
      jax.tree_util.tree_leaves_with_path(random_like(params)),
      updates(params, o4.unpreconditioned_biases)):
    biased = jax.tree_util.keystr(path).endswith("['bias'].value")
    assert np.array_equal(np.asarray(default), np.asarray(g)) == biased, path

  flat = flax.traverse_util.flatten_dict(linen)
  for name in (lambda path: "/".join(path), lambda path: jax.tree_util.keystr(
      tuple(jax.tree_util.DictKey(k) for k in path))):
    spec = o4.unpreconditioned_biases({name(p): x for p, x in flat.items()})
    assert {k for k, v in spec.items() if v is not None
           } == {name(p) for p in flat if p[-1] == "bias"}


def test_bad_dimension_numbers_raise_naming_the_problem():
  with pytest.raises(ValueError, match="or neither"):
    o4.DimensionNumbers(rows=(0,), cols=())
  with pytest.raises(ValueError, match="overlap"):
    o4.DimensionNumbers(rows=(0,), cols=(0,)).resolve(3)
  with pytest.raises(ValueError, match="out of range"):
    o4.DimensionNumbers(rows=(0,), cols=(5,)).resolve(3)
  with pytest.raises(TypeError, match="rows"):
    o4.DimensionNumbers(rows="0", cols=(1,))
  config = o4.ShampooConfig(dimension_numbers={"a": None})
  with pytest.raises(ValueError, match="dimension_numbers has 1 leaves for 2"):
    o4.scale_by_shampoo(config).init({
        "a": jnp.zeros((8, 8)),
        "b": jnp.zeros((8, 8))
    })


@pytest.mark.parametrize("storage,bits,tolerance", [("matrix", 32, 1e-5),
                                                    ("cholesky", 32, 1e-5),
                                                    ("eigenvectors", 32, 1e-4),
                                                    ("eigenvectors", 4, None)])
def test_chunked_updates_equal_whole_stack_updates(storage, bits, tolerance,
                                                   monkeypatch):
  # The Cholesky-QR correction is chosen per chunk by a lax.cond; off, both runs
  # take the same passes.
  monkeypatch.setattr(linalg, "CHOLESKY_QR_CORRECTION_TOLERANCE", None)
  # Stacks of two or more (orders 40 and 48) hold only sides whose first Gram
  # matrix has full rank. A rank-deficient one has a null space whose basis the
  # fp32 rounding picks, and XLA:CPU may round a stack of one and a stack of
  # two differently; the later, unconverged subspace steps then differ by far
  # more than rounding. Those sides (orders 96 and 120) sit alone in a stack.
  params = {
      "a": jnp.zeros((48, 96)),
      "b": jnp.zeros((40, 40)),
      "c": jnp.zeros((3, 40, 48))
  }
  txs = [
      o4.scale_by_shampoo(
          o4.ShampooConfig(bits=bits, storage=storage, min_quantized_size=0,
                           working_set_bytes=w), statistics_every=1,
          inverse_root_every=2) for w in (None, 1)
  ]
  states = [tx.init(params) for tx in txs]
  steps = [jax.jit(tx.update) for tx in txs]
  for i in range(4):
    grads = jax.tree.map(
        lambda p: jax.random.normal(jax.random.PRNGKey(i), p.shape), params)
    outs = []
    for k in range(2):
      updates, states[k] = steps[k](grads, states[k], params)
      outs.append(updates)
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
      if tolerance is not None:
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=0, atol=tolerance)
      else:  # a 4-bit code may flip on fp32 rounding: compare the direction
        cosine = float(
            jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
        assert cosine > 0.999, cosine


def test_map_chunks_overlaps_its_last_chunk_instead_of_padding():
  # 7 entries at most 3 at a time: chunks of 3 starting at 0, 3 and 4 (entry 4
  # done twice, same value); fn sees no padded chunk and no other size.
  sizes = []

  def fn(x, quantized):
    sizes.append(x.shape[0])
    return x * 2.0, quantized.dequantize().sum(axis=(1, 2))

  x = jnp.arange(7 * 8 * 8, dtype=jnp.float32).reshape(7, 8, 8)
  quantized = o4.quantize(
      jax.random.normal(jax.random.PRNGKey(0), (7, 8, 8)), bits=4,
      block_size=16)
  doubled, sums = chunks.map_chunks(fn, 3, x, quantized)
  assert set(sizes) == {3}
  np.testing.assert_array_equal(np.asarray(doubled), 2.0 * np.asarray(x))
  np.testing.assert_allclose(
      np.asarray(sums),
      np.asarray(quantized.dequantize()).sum(axis=(1, 2)), rtol=1e-6)
  # one loop of three iterations, no concatenation of the inputs
  jaxpr = str(
      jax.make_jaxpr(lambda a, q: chunks.map_chunks(fn, 3, a, q))(x, quantized))
  assert "concatenate" not in jaxpr and "length=3" in jaxpr, jaxpr


def test_map_chunks_writes_tiling_chunks_over_their_inputs():
  """8 entries 4 at a time: each output shaped like an input array starts as
  that input (no zero-filled stack in the program) and every entry comes from
  the input as it was, also when one array is passed as two arguments."""

  def fn(x, y, quantized):
    return x * 2.0 + y, x - y, quantized.dequantize().sum(axis=(1, 2))

  x = jnp.arange(8 * 8 * 8, dtype=jnp.float32).reshape(8, 8, 8)
  y = jnp.cos(x)
  quantized = o4.quantize(
      jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8)), bits=4,
      block_size=16)
  for args in ((x, y, quantized), (x, x, quantized)):
    got = chunks.map_chunks(fn, 4, *args)
    want = fn(*args)
    for a, b in zip(got, want):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  jaxpr = str(
      jax.make_jaxpr(lambda *a: chunks.map_chunks(fn, 4, *a))(x, y, quantized))
  # the two (8, 8, 8) outputs start as x and y; only the sums' (8,) buffer is
  # zero-filled
  assert "f32[8,8,8] = broadcast_in_dim" not in jaxpr, jaxpr
  assert "f32[8] = broadcast_in_dim" in jaxpr, jaxpr


class Tiny(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(256, 128)(tokens)
    for _ in range(2):
      x = x + nn.MultiHeadDotProductAttention(4, qkv_features=128)(
          nn.LayerNorm()(x))
      x = x + nn.Dense(128)(nn.gelu(nn.Dense(512)(nn.LayerNorm()(x))))
    return nn.Dense(256)(x)


def test_chunked_training_step_extra_temp_within_three_shampoo_states_on_cpu():
  """Compiled on CPU: with a 1 MiB working set the step's temp bytes over
  AdamW's stay within 3× the Shampoo state's bytes, and below what whole stacks
  need (on this 1 M-param model the default 1 GiB budget covers whole stacks:
  about 5.5× the state). On an H100, GPT of 85.6 M params at the default, the
  extra temp was 0.02× the state: docs/benchmarks.md."""
  model = Tiny()
  tokens = jnp.zeros((4, 32), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), tokens)["params"]

  def temp_bytes(tx):

    def step(params, state):
      grads = jax.grad(lambda p: model.apply({
          "params": p
      }, tokens).mean())(
          params)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    state = tx.init(params)
    compiled = jax.jit(step).lower(params, state).compile()
    return compiled.memory_analysis().temp_size_in_bytes, o4.state_nbytes(state)

  adamw_temp, _ = temp_bytes(optax.adamw(1e-3))
  shampoo = lambda budget: o4.shampoo_adamw(
      1e-3, shampoo=o4.ShampooConfig(working_set_bytes=budget))
  chunked_temp, state_bytes = temp_bytes(shampoo(2**20))
  whole_temp, _ = temp_bytes(shampoo(None))
  assert chunked_temp - adamw_temp <= 3.0 * state_bytes, (chunked_temp,
                                                          adamw_temp,
                                                          state_bytes)
  assert chunked_temp < whole_temp, (chunked_temp, whole_temp)


def test_blocking_rules():
  assert blocking.chunk_sizes(3072, 1200) == (1200, 1200, 672)
  assert blocking.matrix_shape(
      (3, 3, 16, 32)) == (144, 32)  # Flax conv (kh, kw, Cin, Cout)
  assert blocking.matrix_shape((1, 5, 1, 7)) == (5, 7)
  assert blocking.matrix_shape((7,)) is None and blocking.matrix_shape(
      ()) is None
  assert blocking.matrix_shape((1, 7)) is None and blocking.matrix_shape(
      (0, 7)) is None
  plan = blocking.make_plan(((3072, 768), (768,), (50, 2500)), 1200)
  assert dict(plan.stack_sizes) == {1200: 4, 672: 1, 768: 3, 50: 3, 100: 1}
  assert plan.preconditioned_leaves == (0, 2)
  assert plan.unpreconditioned_leaves == (1,)


def test_oriented_blocks_give_each_slot_its_statistic():
  """The Grams of ``oriented_blocks`` (what sharded statistics steps take) are,
  slot by slot, the fp64 ``G Gᵀ`` / ``Gᵀ G`` of the block each slot's
  preconditioner belongs to; padding slots are zero."""
  shapes = ((300, 96), (96,), (96, 250), (40, 96))
  plan = blocking.make_plan(shapes, 128, 4)
  rng = np.random.default_rng(0)
  matrices = [
      rng.standard_normal(s).astype(np.float32) if len(s) == 2 else None
      for s in shapes
  ]
  group_blocks = blocking.gather_blocks(
      plan, [None if m is None else jnp.asarray(m)[None] for m in matrices])
  for order, count in plan.stack_sizes:
    grams = np.asarray(
        linalg.gram(blocking.oriented_blocks(plan, order, group_blocks)),
        np.float64)
    assert grams.shape == (plan.stack_length(order), order, order)
    expected = np.zeros_like(grams)
    for group in plan.groups:
      for k, b in enumerate(group.blocks):
        block = matrices[b.leaf][b.row_start:b.row_start + b.rows,
                                 b.col_start:b.col_start + b.cols].astype(
                                     np.float64)
        if group.rows == order:
          expected[group.left_offset + k] = block @ block.T
        if group.cols == order:
          expected[group.right_offset + k] = block.T @ block
    np.testing.assert_allclose(grams, expected, rtol=1e-4,
                               atol=1e-3 * np.abs(expected).max())
    assert list(blocking.padding_slots(
        plan, order)) == [i >= count for i in range(plan.stack_length(order))]
