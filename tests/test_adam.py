"""4-bit AdamW and 4-bit Factor (docs/algorithms.md) against optax.adamw."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_shampoo4 as o4
from helpers import digits_mlp_problem, gpt2_small_shapes, least_squares_problem, loss_curve, substate
from optax_shampoo4.quantization import unpack_nibbles


@pytest.fixture(scope="module")
def big_mlp_problem():
  """The digits MLP with a 64×128 and a 128×64 layer: both above the 4096-element threshold."""
  return digits_mlp_problem()


@pytest.mark.parametrize("second_moment", ["rank1", "block", "factored"])
def test_4bit_adamw_tracks_optax_adamw_on_real_data(big_mlp_problem, second_moment):
  reference, _ = loss_curve(optax.adamw(3e-3, weight_decay=1e-4), big_mlp_problem, 300)
  curve, state = loss_curve(o4.adamw_4bit(3e-3, weight_decay=1e-4, config=o4.AdamConfig(second_moment=second_moment)),
                            big_mlp_problem, 300)
  assert isinstance(substate(state, o4.ScaleByAdam4bitState).mu["w1"], o4.QuantizedArray)
  # Every 25 steps from step 50 on (losses 0.33 down to 0.036), within 10 % of optax.adamw's (measured ≤ 5.6 %).
  np.testing.assert_allclose(curve[1:], reference[1:], rtol=0.1, atol=0)


def minibatch_least_squares(n=4096, d_in=96, d_out=64, batch=64):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, d_in)), jnp.float32)
  y = x @ jnp.asarray(rng.standard_normal((d_in, d_out)), jnp.float32) + 0.1 * jnp.asarray(
      rng.standard_normal((n, d_out)), jnp.float32)

  def loss(p, xb, yb):
    return jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)

  def sample(i):
    index = jax.random.randint(jax.random.PRNGKey(i), (batch,), 0, n)
    return x[index], y[index]

  return loss, {"w": jnp.zeros((d_in, d_out)), "b": jnp.zeros(d_out)}, sample, (x, y)


def test_4bit_adamw_on_minibatch_least_squares():
  """Measured: on linear regression 4-bit AdamW converges but more slowly than optax.adamw (loss 1.4 vs
  0.5 after 400 steps, from 66: 2.8×); 8-bit stays within 10 % of optax.adamw at every checkpoint."""
  problem = minibatch_least_squares()
  initial = float(problem[0](problem[1], *problem[3]))
  reference, _ = loss_curve(optax.adamw(1e-2, weight_decay=0.0), problem, 400, every=50)
  eight, _ = loss_curve(o4.adamw_4bit(1e-2, weight_decay=0.0, config=o4.AdamConfig(bits=8)), problem, 400, every=50)
  four, _ = loss_curve(o4.adamw_4bit(1e-2, weight_decay=0.0), problem, 400, every=50)
  np.testing.assert_allclose(eight, reference, rtol=0.15, atol=0)
  assert np.all(four <= 3.5 * reference) and np.all(four >= reference), (four, reference)
  assert np.all(np.diff(four) < 0) and four[-1] < 0.03 * initial


def test_first_moment_dead_zone_on_an_ill_conditioned_quadratic():
  """Known limit, measured: on a deterministic quadratic, m's per-step EMA increments are smaller than the
  4-bit dynamic-tree code spacing, so entries stall between codes and 4-bit AdamW lags; 8-bit does not.
  (With fp32 m and 4-bit v the curve tracks optax.adamw: the first moment is the cause.)"""
  problem = least_squares_problem(d_in=96, d_out=64, decades=1.0)
  reference, _ = loss_curve(optax.adamw(1e-2, weight_decay=0.0), problem, 200, every=200)
  eight, _ = loss_curve(o4.adamw_4bit(1e-2, weight_decay=0.0, config=o4.AdamConfig(bits=8)), problem, 200, every=200)
  four, _ = loss_curve(o4.adamw_4bit(1e-2, weight_decay=0.0), problem, 200, every=200)
  assert abs(eight[-1] - reference[-1]) <= 0.1 * reference[-1]
  assert four[-1] > 1.5 * reference[-1]


def test_small_tensors_are_exactly_optax_adamw():
  params = {"w": jnp.ones((32, 64)), "b": jnp.zeros(64)}  # 2048 elements: below the threshold
  ours, theirs = o4.adamw_4bit(1e-2), optax.adamw(1e-2, weight_decay=1e-4)
  s1, s2 = ours.init(params), theirs.init(params)
  key = jax.random.PRNGKey(0)
  for _ in range(5):
    key, sub = jax.random.split(key)
    g = jax.tree.map(lambda p: jax.random.normal(sub, p.shape), params)
    u1, s1 = jax.jit(ours.update)(g, s1, params)
    u2, s2 = jax.jit(theirs.update)(g, s2, params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


def test_zero_point_makes_the_update_explode_and_linear_nozero_does_not():
  """[A4] §4.1: a second-moment codebook with a zero decodes small v to 0 and 1/(√v + ε) explodes.

  Steady gradients of 1, then one entry per block of 128 jumps to 2000 (v's block max grows 4e6-fold,
  m's only 2000-fold: m stays representable, v of the other entries rounds to the zero code), then a step
  where those entries get a zero gradient (a sparse gradient, as for an embedding).
  """
  n = 8192
  spikes = np.zeros(n, np.float32)
  spikes[::128] = 2000.0
  stream = [np.ones(n, np.float32)] * 50 + [np.where(spikes > 0, spikes, 1.0)] + [np.where(spikes > 0, 1.0, 0.0)]
  largest = {}
  for codebook in ("dynamic_tree_unsigned", "linear_nozero", None):
    tx = (optax.scale_by_adam() if codebook is None else
          o4.scale_by_adam_4bit(config=o4.AdamConfig(second_moment="block", second_moment_codebook=codebook)))
    state = tx.init(jnp.zeros(n))
    for g in stream:
      update, state = tx.update(jnp.asarray(g), state)
    largest[codebook] = float(jnp.max(jnp.abs(update)))
  assert largest[None] < 2.0  # fp32 Adam: m̂/√v̂ stays O(1)
  assert largest["dynamic_tree_unsigned"] > 1e4, largest  # explodes
  assert largest["linear_nozero"] < 2.0, largest  # bounded


def test_memory_per_parameter():
  params = {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)}
  per_param = lambda tx: o4.state_nbytes(jax.eval_shape(tx.init, params)) / 4096**2
  assert per_param(o4.scale_by_adam_4bit()) <= 1.1
  assert per_param(o4.scale_by_adam_4bit(config=o4.AdamConfig(second_moment="factored"))) <= 0.6
  assert per_param(o4.scale_by_adam_4bit(config=o4.AdamConfig(bits=8))) <= 2.1
  assert per_param(optax.scale_by_adam()) == pytest.approx(8.0)


def test_all_4bit_shampoo_state_is_at_most_half_of_adamw_on_gpt2_shapes():
  params = gpt2_small_shapes()
  assert 124e6 < sum(np.prod(p.shape) for p in params.values()) < 125e6
  adamw = o4.state_nbytes(jax.eval_shape(optax.adamw(1e-3).init, params))
  ours = o4.state_nbytes(jax.eval_shape(o4.shampoo_adamw(1e-3, shampoo=o4.ShampooConfig(bits=4), adam=o4.AdamConfig(bits=4)).init, params))
  assert ours <= 0.5 * adamw, (ours, adamw)


@pytest.mark.parametrize("kwargs,match", [
    (dict(b1=1.0), "b1"), (dict(b2=-0.1), "b2"), (dict(eps=-1.0), "eps"), (dict(bits=5), "bits"),
    (dict(second_moment="diag"), "second_moment"), (dict(block_size=0), "block_size"),
    (dict(min_quantized_size=-1), "min_quantized_size"), (dict(second_moment_codebook="x"), "codebook"),
    (dict(implementation="triton"), "implementation"),
])
def test_bad_arguments(kwargs, match):
  numeric = {"b1", "b2", "eps"}
  with pytest.raises((ValueError, TypeError), match=match) as error:
    if numeric.issuperset(kwargs):
      o4.scale_by_adam_4bit(**kwargs)
    else:  # structure is validated by the config, when it is built
      o4.AdamConfig(**kwargs)
  assert "unexpected keyword" not in str(error.value)  # the check ran, not the signature


def assert_equal_to_fp32_rounding(xla_updates, xla_state, kernel_updates, kernel_state):
  """Both paths evaluate the same expressions, but compilers contract ``a·b + c·d`` into different fused
  multiply-adds, so moments may differ in the last bit: a value within rounding of a decision boundary
  then gets the neighbouring code, and its update moves with it. Anything beyond that is a bug."""
  for a, b in zip(jax.tree.leaves(xla_state), jax.tree.leaves(kernel_state)):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype == np.uint8:  # packed codes: a differing code is one step off, and rare
      codes = [np.asarray(unpack_nibbles(x, 2 * x.shape[-1]), int) for x in (a, b)]
      steps = np.abs(codes[0] - codes[1])
      assert steps.max() <= 1 and np.mean(steps > 0) <= 2e-3, (steps.max(), np.mean(steps > 0))
    else:  # scales (maxima of the moments), counters
      np.testing.assert_allclose(a, b, rtol=3e-7, atol=0)
  for a, b in zip(jax.tree.leaves(xla_updates), jax.tree.leaves(kernel_updates)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
    close = np.isclose(a, b, rtol=2e-5, atol=1e-9) | ~np.isfinite(a)
    assert np.mean(~close) <= 2e-3, np.mean(~close)


def kernel_launches(fn, *args) -> int:
  """How many ``pallas_call`` s the traced ``fn(*args)`` makes, through nested jitted functions (a printed
  jaxpr shows a function called twice with the same signature once)."""
  def count(jaxpr):
    total = 0
    for eqn in jaxpr.eqns:
      total += eqn.primitive.name == "pallas_call"
      for value in eqn.params.values():
        for inner in value if isinstance(value, (tuple, list)) else (value,):  # cond: a tuple of branches
          inner = getattr(inner, "jaxpr", inner)
          if hasattr(inner, "eqns"):
            total += count(inner)
    return total
  return count(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("second_moment", ["rank1", "block"])
def test_fused_kernels_match_the_xla_path(second_moment):
  """The Pallas kernels (run by the interpreter on CPU) compute the same step and store the same codes as
  the XLA path, up to fp32 rounding: bf16 gradients, a ragged last row tile, leaves the kernels skip (4-D
  rank-1), a NaN step that must keep the state, and a traced b1 (inject_hyperparams)."""
  params = {"tiles": jnp.zeros((80, 256)), "ragged": jnp.zeros((70, 256)), "bf16": jnp.zeros((64, 128), jnp.bfloat16),
            "conv": jnp.zeros((3, 3, 16, 128)), "vector": jnp.zeros((8192,))}
  factories = {i: optax.inject_hyperparams(o4.adamw_4bit)(
      learning_rate=1e-2, b1=0.8, config=o4.AdamConfig(second_moment=second_moment, implementation=i)) for i in ("xla", "pallas")}
  states = {i: tx.init(params) for i, tx in factories.items()}
  steps = {i: jax.jit(tx.update) for i, tx in factories.items()}
  # rank-1: two kernels for each of three matrices, and two more for the 6 rows of "ragged" past its last
  # whole tile of 8 (one zero-padded tile); blocks (one 128-element block per row of the view): one kernel for
  # each of the five leaves, one more for the 4 rows of "ragged" (140 rows of 128) past its last whole tile
  for i, count in (("pallas", {"rank1": 8, "block": 6}[second_moment]), ("xla", 0)):
    assert kernel_launches(factories[i].update, params, states[i], params) == count, i
  key = jax.random.PRNGKey(0)
  for t in range(5):
    key, sub = jax.random.split(key)
    grads = jax.tree.map(lambda p: (jax.random.normal(sub, p.shape) * (1 + t)).astype(p.dtype), params)
    if t == 3:
      grads["tiles"] = grads["tiles"].at[79, 200].set(jnp.nan)
    updates = {}
    for i in factories:
      updates[i], states[i] = steps[i](grads, states[i], params)
    assert_equal_to_fp32_rounding(updates["xla"], states["xla"], updates["pallas"], states["pallas"])
  adam_state = substate(states["pallas"], o4.ScaleByAdam4bitState)
  # the NaN step is skipped whole by apply_if_finite (the default), which counts it
  assert int(adam_state.count) == 4
  assert int(substate(states["pallas"], optax.ApplyIfFiniteState).total_notfinite) == 1


def fused_adamw(learning_rate, second_moment, packed=None, **kwargs):
  packed = second_moment == "block" if packed is None else packed
  return o4.adamw_4bit(learning_rate, config=o4.AdamConfig(second_moment=second_moment, implementation="pallas",
                                                          packed=packed), **kwargs)


@pytest.mark.parametrize("second_moment", ["rank1", "block"])
def test_fused_step_equals_update_then_apply_updates(second_moment):
  """``o4.fused_step(adamw_4bit(..., implementation="pallas"))`` (kernels that also apply the update; the
  interpreter on CPU) gives the params and state of the same transformation's ``update`` +
  ``optax.apply_updates``, to fp32 rounding: a schedule, a weight decay mask given as a function, a bf16
  leaf, a ragged last row tile, a leaf below the quantization threshold; a NaN step changes the params not
  at all and the state as the update path does (only the guard's counters)."""
  params = {"w": jax.random.normal(jax.random.PRNGKey(1), (48, 256)), "b": jnp.ones((256,)),
            "bf16": jnp.ones((64, 128), jnp.bfloat16), "ragged": jnp.ones((70, 128))}
  schedule = optax.linear_schedule(1e-2, 1e-3, 10)
  no_bias = lambda tree: {k: k != "b" for k in tree}
  opt = fused_adamw(schedule, second_moment, weight_decay=0.1, mask=no_bias)
  step = o4.fused_step(opt)
  assert step is opt.step
  # "ragged": 64 + 6 rows (rank-1), 64 + 6 rows of 128 (blocks)
  assert kernel_launches(step, params, opt.init(params), params) == {"rank1": 8, "block": 4}[second_moment]
  fused_step = jax.jit(step, donate_argnums=(1, 2))
  update = jax.jit(opt.update)
  state = reference_state = opt.init(params)
  fused_params = jax.tree.map(jnp.copy, params)
  reference = params
  key = jax.random.PRNGKey(0)
  for t in range(5):
    key, sub = jax.random.split(key)
    grads = jax.tree.map(lambda p: jax.random.normal(sub, p.shape).astype(p.dtype), params)
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
      # bf16: the reference rounds to bf16 after each of its ops, the kernel once (two bf16 steps near 1)
      tolerance = dict(rtol=0, atol=2**-6) if name == "bf16" else dict(rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(np.asarray(fused_params[name], np.float32), np.asarray(reference[name], np.float32),
                                 **tolerance)
    assert_equal_to_fp32_rounding({}, reference_state, {}, state)
  adam_state = substate(state, o4.ScaleByAdam4bitState)
  schedule_state = substate(state, optax.ScaleByScheduleState)
  assert int(adam_state.count) == 4 and int(adam_state.nonfinite_count) == 0 and int(schedule_state.count) == 4
  assert int(substate(state, optax.ApplyIfFiniteState).total_notfinite) == 1
  assert not np.allclose(np.asarray(fused_params["w"]), np.asarray(params["w"]))  # it trained


def test_apply_gradients_runs_the_fused_step_of_a_flax_train_state():
  """``o4.apply_gradients(state, grads)`` is ``TrainState.apply_gradients`` through the fused kernels: the
  same params and state as Flax's own method, and the step counter advances."""
  from flax.training import train_state
  params = {"w": jax.random.normal(jax.random.PRNGKey(1), (16, 128)), "b": jnp.ones((128,))}
  grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  flax_state = train_state.TrainState.create(apply_fn=None, params=params, tx=fused_adamw(1e-2, "block"))
  fused, reference = o4.apply_gradients(flax_state, grads), flax_state.apply_gradients(grads=grads)
  assert int(fused.step) == int(reference.step) == 1
  for a, b in zip(jax.tree.leaves((fused.params, fused.opt_state)),
                  jax.tree.leaves((reference.params, reference.opt_state))):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6, atol=1e-7)
  # any other transformation: update + apply_updates
  plain = train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-2))
  np.testing.assert_array_equal(o4.apply_gradients(plain, grads).params["w"],
                                plain.apply_gradients(grads=grads).params["w"])


def test_packed_state_holds_the_per_tensor_state_in_a_few_arrays():
  """``packed=True`` stores each tensor's bytes of
  the per-tensor layout in a few shared arrays: the same params and, unpacked, the same moments as
  ``packed=False`` step by step (kernels on the covered tensors; the dense and "other" tensors through XLA),
  a NaN step changes neither, and the state has as many arrays for 17 tensors as for 3."""
  params = {"w": jax.random.normal(jax.random.PRNGKey(1), (48, 256)), "bias": jnp.ones((256,)),
            "bf16": jnp.ones((64, 128), jnp.bfloat16), "ragged": jnp.ones((70, 128)), "odd": jnp.ones((5001,)),
            "layers": [{"kernel": jnp.full((64, 128), 0.5), "scale": jnp.ones((128,))} for _ in range(6)]}
  schedule = optax.linear_schedule(1e-2, 1e-3, 10)
  packed, per_tensor = (fused_adamw(schedule, "block", packed=p, weight_decay=0.1, skip_nonfinite=False)
                        for p in (True, False))
  states = {"packed": packed.init(params), "per_tensor": per_tensor.init(params)}
  mu = substate(states["packed"], o4.ScaleByAdam4bitState).mu
  assert isinstance(mu, o4.adam.PackedMoment)
  # codes of w (96 rows of 128 elements), bf16 (64), ragged (70, padded to 72) and 6 kernels (64 each)
  assert mu.codes.shape == (96 + 64 + 72 + 6 * 64, 64) and mu.codes.dtype == jnp.uint8
  assert mu.dense.shape == (256 + 6 * 128,) and len(mu.others) == 1  # "odd": 5001 is no multiple of 128
  # count, 2 × (codes, scales, dense, odd's codes and scales), nonfinite_count, the schedule's count
  assert len(jax.tree.leaves(states["packed"])) == 13
  # 10 quantized tensors (codes and scales of two moments), 7 fp32 moment pairs, three counters
  assert len(jax.tree.leaves(states["per_tensor"])) == 4 * 10 + 2 * 7 + 3
  steps = {"packed": jax.jit(packed.step, donate_argnums=(1, 2)), "per_tensor": jax.jit(per_tensor.step)}
  current = {name: jax.tree.map(jnp.copy, params) for name in steps}
  key = jax.random.PRNGKey(0)
  for t in range(4):
    key, sub = jax.random.split(key)
    grads = jax.tree.map(lambda p: jax.random.normal(sub, p.shape).astype(p.dtype), params)
    if t == 2:
      grads["layers"][3]["scale"] = grads["layers"][3]["scale"].at[7].set(jnp.nan)
    for name in steps:
      current[name], states[name] = steps[name](grads, states[name], current[name])
    for a, b in zip(jax.tree.leaves(current["packed"]), jax.tree.leaves(current["per_tensor"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for moment in ("mu", "nu"):
      unpacked = getattr(states["packed"][0], moment).unpack()
      reference = getattr(states["per_tensor"][0], moment)
      assert jax.tree.structure(unpacked) == jax.tree.structure(reference)
      for a, b in zip(jax.tree.leaves(unpacked), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(states["packed"][0].count) == 3 and int(states["packed"][0].nonfinite_count) == 1
  assert not np.allclose(np.asarray(current["packed"]["w"]), np.asarray(params["w"]))
  # a state from other params is refused with a clear error, not a shape error deep in a kernel
  with pytest.raises(ValueError, match="packed"):
    packed.step({"w": params["w"]}, states["packed"], {"w": params["w"]})


@pytest.mark.parametrize("kwargs", [dict(second_moment="rank1"), dict(implementation="xla"), dict(bits=8)])
def test_packed_needs_the_block_kernels(kwargs):
  arguments = {**dict(second_moment="block", implementation="pallas", packed=True), **kwargs}
  with pytest.raises(ValueError, match="packed"):
    o4.AdamConfig(**arguments)
  with pytest.raises(TypeError, match="packed"):
    o4.scale_by_adam_4bit(config=o4.AdamConfig(second_moment="block", implementation="pallas", packed=1))
