"""State bytes (optax_shampoo4.memory): whole states, per parameter, and the
papers' per-parameter budgets."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_shampoo4 as o4
from helpers import gpt2_small_shapes


def test_memory_report_lists_quantized_arrays_as_one_entry():
  tree = {"q": o4.quantize(jnp.ones((100, 100))), "x": jnp.zeros((3, 4))}
  rows = {r.path: r for r in o4.memory_report(tree)}
  assert rows["['q']"].kind == "4-bit linear2/block" and rows[
      "['q']"].nbytes == tree["q"].nbytes
  assert rows["['x']"].nbytes == 48
  text = o4.format_memory_report(tree)
  assert "total" in text and f"{tree['q'].nbytes + 48:,}" in text


def test_memory_per_parameter():
  params = {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)}
  per_param = lambda tx: o4.state_nbytes(jax.eval_shape(tx.init, params)
                                        ) / 4096**2
  assert per_param(o4.scale_by_adam_4bit()) <= 1.1
  assert per_param(
      o4.scale_by_adam_4bit(config=o4.AdamConfig(
          second_moment="factored"))) <= 0.6
  assert per_param(o4.scale_by_adam_4bit(config=o4.AdamConfig(bits=8))) <= 2.1
  assert per_param(optax.scale_by_adam()) == pytest.approx(8.0)


def test_all_4bit_shampoo_state_is_at_most_half_of_adamw_on_gpt2_shapes():
  params = gpt2_small_shapes()
  assert 124e6 < sum(np.prod(p.shape) for p in params.values()) < 125e6
  adamw = o4.state_nbytes(jax.eval_shape(optax.adamw(1e-3).init, params))
  ours = o4.state_nbytes(
      jax.eval_shape(
          o4.shampoo_adamw(1e-3, shampoo=o4.ShampooConfig(bits=4),
                           adam=o4.AdamConfig(bits=4)).init, params))
  assert ours <= 0.5 * adamw, (ours, adamw)


def test_4bit_state_is_much_smaller_for_a_2048_square_weight():
  params = {"w": jax.ShapeDtypeStruct((2048, 2048), jnp.float32)}
  nbytes = {
      bits:
          o4.state_nbytes(
              jax.eval_shape(
                  o4.scale_by_shampoo(o4.ShampooConfig(bits=bits)).init,
                  params)) for bits in (4, 32)
  }
  assert nbytes[32] / nbytes[4] >= 6.5, nbytes
  chol = o4.state_nbytes(
      jax.eval_shape(
          o4.scale_by_shampoo(o4.ShampooConfig(storage="cholesky")).init,
          params))
  assert abs(chol - nbytes[4]) <= 0.10 * nbytes[4], (chol, nbytes[4])


def test_parameter_memory_splits_the_state_by_parameter():
  """Per parameter: its Adam moments (two fp32 copies) and its blocks' stack
  slots, counted by hand from the 32-bit eigenvector storage (eigenvectors,
  eigenvalues, inverse root per slot); the rows and the counters add up to the
  whole state."""
  params = {
      "a": jnp.ones((64, 96)),
      "b": jnp.ones((64, 64)),
      "bias": jnp.ones(96)
  }
  config = o4.ShampooConfig(bits=32)
  state = jax.eval_shape(o4.shampoo_adamw(1e-3, shampoo=config).init, params)
  slot = lambda n: 4 * (2 * n * n + n)  # one preconditioner of order n
  rows = {r.path: r for r in o4.parameter_memory(state, params, config)}
  assert rows["['a']"].moment_bytes == 2 * 4 * 64 * 96 and rows[
      "['bias']"].moment_bytes == 2 * 4 * 96
  assert rows["['a']"].preconditioner_bytes == slot(64) + slot(96)
  assert rows["['b']"].preconditioner_bytes == 2 * slot(64)
  assert rows["['bias']"].preconditioner_bytes == 0
  counters = o4.state_nbytes(state) - sum(r.nbytes for r in rows.values())
  assert 0 < counters <= 64  # a handful of int32 counters
  assert "['a']" in o4.format_parameter_memory(state, params, config)


def test_parameter_memory_counts_soaps_block_stacked_moments():
  """SOAP's moments live in block stacks: a leaf cut into two blocks of one
  group gets both blocks' bytes, and the rows still add up to the state."""
  params = {"a": jnp.ones((16, 8)), "b": jnp.ones((8, 8)), "bias": jnp.ones(8)}
  config = o4.ShampooConfig(bits=32, max_order=8)
  state = jax.eval_shape(
      o4.soap(1e-3, config=config, moments=o4.AdamConfig(bits=32)).init, params)
  rows = {r.path: r for r in o4.parameter_memory(state, params, config)}
  for name, size in (("a", 16 * 8), ("b", 8 * 8), ("bias", 8)):
    assert rows[f"['{name}']"].moment_bytes == 2 * 4 * size, name
  eigen = lambda n: 4 * (n * n + n)  # one fp32 basis: eigenvectors, eigenvalues
  assert rows["['a']"].preconditioner_bytes == 4 * eigen(8)
  counters = o4.state_nbytes(state) - sum(r.nbytes for r in rows.values())
  assert 0 <= counters <= 64, counters
