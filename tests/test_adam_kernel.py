"""The Pallas kernels of 4-bit Adam (optax_shampoo4.adam_kernel; the interpreter
on CPU) against the XLA path."""

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_shampoo4 as o4
from helpers import assert_equal_to_fp32_rounding, kernel_launches, substate


@pytest.mark.parametrize("second_moment", ["rank1", "block"])
def test_fused_kernels_match_the_xla_path(second_moment):
  """The Pallas kernels (run by the interpreter on CPU) compute the same step
  and store the same codes as the XLA path, up to fp32 rounding: bf16 gradients,
  a ragged last row tile, leaves the kernels skip (4-D rank-1), a NaN step that
  must keep the state, and a traced b1 (inject_hyperparams)."""
  params = {
      "tiles": jnp.zeros((80, 256)),
      "ragged": jnp.zeros((70, 256)),
      "bf16": jnp.zeros((64, 128), jnp.bfloat16),
      "conv": jnp.zeros((3, 3, 16, 128)),
      "vector": jnp.zeros((8192,))
  }
  factories = {
      i:
          optax.inject_hyperparams(o4.adamw_4bit)
          (learning_rate=1e-2, b1=0.8,
           config=o4.AdamConfig(second_moment=second_moment, implementation=i))
      for i in ("xla", "pallas")
  }
  states = {i: tx.init(params) for i, tx in factories.items()}
  steps = {i: jax.jit(tx.update) for i, tx in factories.items()}
  # rank-1: two kernels for each of three matrices, and two more for the 6 rows
  # of "ragged" past its last whole tile of 8 (one zero-padded tile); blocks
  # (one 128-element block per row of the view): one kernel for each of the five
  # leaves, one more for the 4 rows of "ragged" (140 rows of 128) past its last
  # whole tile
  for i, count in (("pallas", {
      "rank1": 8,
      "block": 6
  }[second_moment]), ("xla", 0)):
    assert kernel_launches(factories[i].update, params, states[i],
                           params) == count, i
  key = jax.random.PRNGKey(0)
  for t in range(5):
    key, sub = jax.random.split(key)
    grads = jax.tree.map(
        lambda p: (jax.random.normal(sub, p.shape) * (1 + t)).astype(p.dtype),
        params)
    if t == 3:
      grads["tiles"] = grads["tiles"].at[79, 200].set(jnp.nan)
    updates = {}
    for i in factories:
      updates[i], states[i] = steps[i](grads, states[i], params)
    assert_equal_to_fp32_rounding(updates["xla"], states["xla"],
                                  updates["pallas"], states["pallas"])
  adam_state = substate(states["pallas"], o4.ScaleByAdam4bitState)
  # the NaN step is skipped whole by apply_if_finite (the default), which counts
  # it
  assert int(adam_state.count) == 4
  assert int(
      substate(states["pallas"], optax.ApplyIfFiniteState).total_notfinite) == 1
