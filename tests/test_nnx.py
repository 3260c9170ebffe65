"""Flax NNX: parameter trees of ``nnx`` modules are blocked as their Linen
counterparts are, ``nnx.Optimizer`` steps equal the optimizers' functional
updates of the same params as a plain dict, and an Orbax round trip of the
NNX state resumes bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_shampoo4 as o4
from optax_shampoo4 import stacks
from helpers import matrix_shapes


class Model(nnx.Module):
  """Every layout the default blocking rule must handle, as NNX lays it out."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(100, 32, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(num_heads=4, in_features=32,
                                            qkv_features=64, out_features=32,
                                            decode=False, rngs=rngs)
    self.general = nnx.LinearGeneral(32, (4, 8), rngs=rngs)
    self.linear = nnx.Linear(32, 16, rngs=rngs)
    self.conv = nnx.Conv(8, 16, (3, 3), rngs=rngs)


def abstract_params():
  """The model's params as shapes (``nnx.eval_shape``: no initializer runs)."""
  return nnx.state(nnx.eval_shape(lambda: Model(nnx.Rngs(0))), nnx.Param)


def test_nnx_layouts_split_where_their_sides_balance():
  params = nnx.to_pure_dict(abstract_params())
  shapes = matrix_shapes(params)
  expected = {
      "['embed']['embedding']": ((100, 32), (100, 32)),
      # (d, heads, head_dim) and (heads, head_dim, d): square-ish, not the
      # merged (d·heads, head_dim)
      "['attention']['query']['kernel']": ((32, 4, 16), (32, 64)),
      "['attention']['out']['kernel']": ((4, 16, 32), (64, 32)),
      "['attention']['query']['bias']": ((4, 16), (4, 16)),
      "['general']['kernel']": ((32, 4, 8), (32, 32)),
      "['linear']['kernel']": ((32, 16), (32, 16)),
      "['conv']['kernel']": ((3, 3, 8, 16), (72, 16)),  # (kh, kw, Cin, Cout)
      "['conv']['bias']": ((16,), None),
  }
  for key, value in expected.items():
    assert shapes[key] == value, key


def test_nnx_state_and_its_plain_dict_get_the_same_plan():
  """The Variables that wrap NNX params are pytree nodes: Shampoo's plan (its
  leaves, orders and block groups) must not see them."""
  state = abstract_params()
  config = o4.ShampooConfig(max_order=48)
  from_state, _, leaves = stacks.make_plan(config, state)
  from_dict, _, _ = stacks.make_plan(config, nnx.to_pure_dict(state))
  assert from_state == from_dict
  assert len(leaves) == len(jax.tree.leaves(nnx.to_pure_dict(state)))
  # 64 > max_order: the attention kernels' 64-wide sides are cut in two
  assert 32 in from_state.orders and 64 not in from_state.orders


class Small(nnx.Module):
  """An attention layer (3-D kernels) and a dense layer, for the steps."""

  def __init__(self, rngs: nnx.Rngs):
    self.attention = nnx.MultiHeadAttention(num_heads=2, in_features=16,
                                            qkv_features=16, decode=False,
                                            rngs=rngs)
    self.linear = nnx.Linear(16, 8, rngs=rngs)

  def __call__(self, x):
    return jnp.mean(jnp.square(self.linear(self.attention(x))))


OPTIMIZERS = {
    # Shampoo's stacks beside 4-bit Adam's moments, which follow the params'
    # tree (Variables and all)
    "all-4-bit":
        lambda: o4.shampoo_adamw(3e-3, statistics_every=1, inverse_root_every=2,
                                 adam=o4.AdamConfig()),
    "soap":
        lambda: o4.soap(3e-3, precondition_every=2),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_nnx_optimizer_steps_equal_the_functional_update(name):
  """Three steps (preconditioner updates at steps 1–3, roots or bases at step
  2) through ``nnx.Optimizer`` under ``nnx.jit`` against ``tx.update`` +
  ``optax.apply_updates`` on the params as a plain dict."""
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 16))
  model = Small(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, OPTIMIZERS[name](), wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer):
    optimizer.update(model, nnx.grad(lambda m: m(x))(model))

  graph, params, rest = nnx.split(model, nnx.Param, ...)
  plain = jax.tree.map(jnp.copy, nnx.to_pure_dict(params))
  initial = plain
  tx = OPTIMIZERS[name]()

  @jax.jit
  def plain_step(plain, state):
    loss = lambda p: nnx.merge(graph, nnx.State(p), rest)(x)
    updates, state = tx.update(jax.grad(loss)(plain), state, plain)
    return optax.apply_updates(plain, updates), state

  state = tx.init(plain)
  for _ in range(3):
    nnx_step(model, optimizer)
    plain, state = plain_step(plain, state)

  stepped = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for path, want in jax.tree_util.tree_leaves_with_path(plain):
    got = dict(jax.tree_util.tree_leaves_with_path(stepped))[path]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
  # every param was updated, not left in place
  for a, b in zip(jax.tree.leaves(stepped), jax.tree.leaves(initial)):
    assert float(jnp.max(jnp.abs(a - b))) > 0


def test_nnx_optimizer_state_survives_an_orbax_round_trip(tmp_path):
  """The NNX checkpoint recipe (``nnx.state`` saved, restored into the state of
  an ``nnx.eval_shape`` copy, ``nnx.update``) on the all-4-bit state: the
  restored run continues bit for bit."""
  import orbax.checkpoint as ocp
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 16))

  def make():
    model = Small(nnx.Rngs(0))
    return model, nnx.Optimizer(model, OPTIMIZERS["all-4-bit"](), wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer):
    optimizer.update(model, nnx.grad(lambda m: m(x))(model))

  model, optimizer = make()
  for _ in range(3):
    nnx_step(model, optimizer)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", nnx.state((model, optimizer)))
  checkpointer.wait_until_finished()

  restored_model, restored_optimizer = nnx.eval_shape(make)
  target = nnx.state((restored_model, restored_optimizer))
  nnx.update((restored_model, restored_optimizer),
             checkpointer.restore(tmp_path / "ckpt", target))
  for _ in range(2):
    nnx_step(model, optimizer)
    nnx_step(restored_model, restored_optimizer)
  for a, b in zip(
      jax.tree.leaves(nnx.state((model, optimizer))),
      jax.tree.leaves(nnx.state((restored_model, restored_optimizer)))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
