"""4-bit AdamW's fused step (optax_shampoo4.fused) against the transformation's
own update + apply_updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_shampoo4 as o4
from helpers import assert_equal_to_fp32_rounding, kernel_launches, substate


def fused_adamw(learning_rate, second_moment, packed=None, **kwargs):
  packed = second_moment == "block" if packed is None else packed
  return o4.adamw_4bit(
      learning_rate,
      config=o4.AdamConfig(second_moment=second_moment, implementation="pallas",
                           packed=packed), **kwargs)


@pytest.mark.parametrize("second_moment", ["rank1", "block"])
def test_fused_step_equals_update_then_apply_updates(second_moment):
  """``o4.fused_step(adamw_4bit(..., implementation="pallas"))`` (kernels that
  also apply the update; the interpreter on CPU) gives the params and state of
  the same transformation's ``update`` + ``optax.apply_updates``, to fp32
  rounding: a schedule, a weight decay mask given as a function, a bf16 leaf, a
    ragged last row tile, a leaf below the quantization threshold; a NaN step
    changes the params not
  at all and the state as the update path does (only the counters)."""
  params = {
      "w": jax.random.normal(jax.random.PRNGKey(1), (48, 256)),
      "b": jnp.ones((256,)),
      "bf16": jnp.ones((64, 128), jnp.bfloat16),
      "ragged": jnp.ones((70, 128))
  }
  schedule = optax.linear_schedule(1e-2, 1e-3, 10)
  no_bias = lambda tree: {k: k != "b" for k in tree}
  opt = fused_adamw(schedule, second_moment, weight_decay=0.1, mask=no_bias)
  step = o4.fused_step(opt)
  assert step is opt.step
  # "ragged": 64 + 6 rows (rank-1), 64 + 6 rows of 128 (blocks)
  assert kernel_launches(step, params, opt.init(params), params) == {
      "rank1": 8,
      "block": 4
  }[second_moment]
  fused_step = jax.jit(step, donate_argnums=(1, 2))
  update = jax.jit(opt.update)
  state = reference_state = opt.init(params)
  fused_params = jax.tree.map(jnp.copy, params)
  reference = params
  key = jax.random.PRNGKey(0)
  for t in range(5):
    key, sub = jax.random.split(key)
    grads = jax.tree.map(
        lambda p: jax.random.normal(sub, p.shape).astype(p.dtype), params)
    if t == 2:
      grads["w"] = grads["w"].at[3, 7].set(jnp.inf)
    updates, reference_state = update(grads, reference_state, reference)
    reference = optax.apply_updates(reference, updates)
    before = jax.tree.map(np.asarray, fused_params)
    fused_params, state = fused_step(grads, state, fused_params)
    if t == 2:
      for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(fused_params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    for name in params:
      assert fused_params[name].dtype == params[name].dtype
      # bf16: the reference rounds to bf16 after each of its ops, the kernel
      # once (two bf16 steps near 1)
      tolerance = dict(rtol=0, atol=2**-6) if name == "bf16" else dict(
          rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(
          np.asarray(fused_params[name], np.float32),
          np.asarray(reference[name], np.float32), **tolerance)
    assert_equal_to_fp32_rounding({}, reference_state, {}, state)
  adam_state = substate(state, o4.ScaleByAdam4bitState)
  schedule_state = substate(state, optax.ScaleByScheduleState)
  assert int(adam_state.count) == 4 and int(
      adam_state.nonfinite_count) == 1 and int(schedule_state.count) == 4
  assert int(substate(state, optax.ApplyIfFiniteState).total_notfinite) == 1
  assert not np.allclose(
      np.asarray(fused_params["w"]), np.asarray(params["w"]))  # it trained


def test_apply_gradients_runs_the_fused_step_of_a_flax_train_state():
  """``o4.apply_gradients(state, grads)`` is ``TrainState.apply_gradients``
  through the fused kernels: the same params and state as Flax's own method, and
  the step counter advances."""
  from flax.training import train_state
  params = {
      "w": jax.random.normal(jax.random.PRNGKey(1), (16, 128)),
      "b": jnp.ones((128,))
  }
  grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  flax_state = train_state.TrainState.create(apply_fn=None, params=params,
                                             tx=fused_adamw(1e-2, "block"))
  fused, reference = o4.apply_gradients(
      flax_state, grads), flax_state.apply_gradients(grads=grads)
  assert int(fused.step) == int(reference.step) == 1
  for a, b in zip(
      jax.tree.leaves((fused.params, fused.opt_state)),
      jax.tree.leaves((reference.params, reference.opt_state))):
    np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6,
        atol=1e-7)
  # any other transformation: update + apply_updates
  plain = train_state.TrainState.create(apply_fn=None, params=params,
                                        tx=optax.adam(1e-2))
  np.testing.assert_array_equal(
      o4.apply_gradients(plain, grads).params["w"],
      plain.apply_gradients(grads=grads).params["w"])


def _mixed_params():
  """Quantized tensors (one bf16, one with a ragged last block), dense ones
  and one no multiple of 128 ("odd"), 17 in all."""
  return {
      "w":
          jax.random.normal(jax.random.PRNGKey(1), (48, 256)),
      "bias":
          jnp.ones((256,)),
      "bf16":
          jnp.ones((64, 128), jnp.bfloat16),
      "ragged":
          jnp.ones((70, 128)),
      "odd":
          jnp.ones((5001,)),
      "layers": [{
          "kernel": jnp.full((64, 128), 0.5),
          "scale": jnp.ones((128,))
      } for _ in range(6)]
  }


def _packed_and_per_tensor():
  schedule = optax.linear_schedule(1e-2, 1e-3, 10)
  return tuple(
      fused_adamw(schedule, "block", packed=p, weight_decay=0.1,
                  skip_nonfinite=False) for p in (True, False))


def test_packed_state_holds_the_per_tensor_state_in_a_few_arrays():
  """``packed=True`` stores each tensor's bytes of the per-tensor layout in a
  few shared arrays: the state has as many arrays for 17 tensors as for 3."""
  params = _mixed_params()
  packed, per_tensor = _packed_and_per_tensor()
  state = packed.init(params)
  mu = substate(state, o4.ScaleByAdam4bitState).mu
  assert isinstance(mu, o4.moments.PackedMoment)
  # codes of w (96 rows of 128 elements), bf16 (64), ragged (70, padded to 72)
  # and 6 kernels (64 each)
  assert mu.codes.shape == (96 + 64 + 72 + 6 * 64,
                            64) and mu.codes.dtype == jnp.uint8
  assert mu.dense.shape == (256 + 6 * 128,) and len(
      mu.others) == 1  # "odd": 5001 is no multiple of 128
  # count, 2 × (codes, scales, dense, odd's codes and scales), nonfinite_count,
  # the schedule's count
  assert len(jax.tree.leaves(state)) == 13
  # 10 quantized tensors (codes and scales of two moments), 7 fp32 moment pairs,
  # three counters
  assert len(jax.tree.leaves(per_tensor.init(params))) == 4 * 10 + 2 * 7 + 3


def test_packed_steps_equal_per_tensor_steps_through_a_nan_step():
  """The same params and, unpacked, the same moments as ``packed=False`` step
  by step (kernels on the covered tensors; the dense and "other" tensors
  through XLA), and a NaN step changes neither."""
  params = _mixed_params()
  packed, per_tensor = _packed_and_per_tensor()
  states = {
      "packed": packed.init(params),
      "per_tensor": per_tensor.init(params)
  }
  steps = {
      "packed": jax.jit(packed.step, donate_argnums=(1, 2)),
      "per_tensor": jax.jit(per_tensor.step)
  }
  current = {name: jax.tree.map(jnp.copy, params) for name in steps}
  key = jax.random.PRNGKey(0)
  for t in range(4):
    key, sub = jax.random.split(key)
    grads = jax.tree.map(
        lambda p: jax.random.normal(sub, p.shape).astype(p.dtype), params)
    if t == 2:
      grads["layers"][3]["scale"] = grads["layers"][3]["scale"].at[7].set(
          jnp.nan)
    for name in steps:
      current[name], states[name] = steps[name](grads, states[name],
                                                current[name])
    for a, b in zip(
        jax.tree.leaves(current["packed"]),
        jax.tree.leaves(current["per_tensor"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for moment in ("mu", "nu"):
      unpacked = getattr(states["packed"][0], moment).unpack()
      reference = getattr(states["per_tensor"][0], moment)
      assert jax.tree.structure(unpacked) == jax.tree.structure(reference)
      for a, b in zip(jax.tree.leaves(unpacked), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(states["packed"][0].count) == 3 and int(
      states["packed"][0].nonfinite_count) == 1
  assert not np.allclose(
      np.asarray(current["packed"]["w"]), np.asarray(params["w"]))


def test_a_packed_state_of_other_params_is_refused():
  """A state from other params is refused with a clear error, not a shape
  error deep in a kernel."""
  params = _mixed_params()
  packed, _ = _packed_and_per_tensor()
  with pytest.raises(ValueError, match="packed"):
    packed.step({"w": params["w"]}, packed.init(params), {"w": params["w"]})
