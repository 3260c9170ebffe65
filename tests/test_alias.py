"""Numerical faults, the Optax contract, and checkpoints (issue: reliability and
ecosystem fit)."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_shampoo4 as o4
from helpers import assert_state_kept_but_counters, substate

PARAMS = {"w": jnp.ones((64, 80)) * 0.1, "b": jnp.zeros(80)}


def small_optimizers():
  """Every alias under its default arguments (NaN safety included), with short
  intervals."""
  kw = dict(statistics_every=1, inverse_root_every=2)
  return {
      "shampoo_adamw":
          o4.shampoo_adamw(1e-2, **kw),
      "shampoo_all4":
          o4.shampoo_adamw(1e-2, **kw, adam=o4.AdamConfig(bits=4)),
      "shampoo_sgdm":
          o4.shampoo_sgdm(1e-2, **kw,
                          shampoo=o4.ShampooConfig(storage="cholesky")),
      "adamw_4bit":
          o4.adamw_4bit(1e-2),
      # both moments of all tensors in a few arrays (the fused kernels; the
      # Pallas interpreter on CPU)
      "adamw_4bit_packed":
          o4.adamw_4bit(
              1e-2, config=o4.AdamConfig(second_moment="block",
                                         implementation="pallas", packed=True)),
      "soap":
          o4.soap(1e-2, precondition_every=1)
  }


def grads_at(i, params=PARAMS):
  return jax.tree.map(
      lambda p: jax.random.normal(jax.random.PRNGKey(i), p.shape, p.dtype),
      params)


@pytest.mark.parametrize("name", list(small_optimizers()))
@pytest.mark.parametrize(
    "where", ["w", "b"])  # a matrix leaf, and a bias (no preconditioner)
def test_nonfinite_gradients_leave_the_whole_state_bit_identical(name, where):
  """Under default arguments every leaf of the alias's whole state (Shampoo,
  Adam/momentum, schedule) but the counters survives a NaN/Inf gradient bit for
  bit, and the params stay finite."""
  tx = small_optimizers()[name]
  state = tx.init(PARAMS)
  step = jax.jit(tx.update)
  for i in range(3):  # past statistics and inverse-root steps
    _, state = step(grads_at(i), state, PARAMS)
  for bad in (jnp.nan, jnp.inf):
    grads = grads_at(9)
    grads[where] = grads[where].at[(3, 5) if where == "w" else 5].set(bad)
    updates, new_state = step(grads, state, PARAMS)
    params = optax.apply_updates(PARAMS, updates)
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
    # moments / preconditioners were compared, not only counters
    assert assert_state_kept_but_counters(state, new_state) >= 3


PUBLIC_FACTORIES = {
    "shampoo_adamw": (o4.shampoo_adamw,
                      dict(statistics_every=1, inverse_root_every=2, beta=0.9,
                           epsilon=1e-5, adam=o4.AdamConfig())),
    "shampoo_sgdm": (o4.shampoo_sgdm,
                     dict(statistics_every=1, inverse_root_every=2,
                          error_feedback_beta=0.5,
                          shampoo=o4.ShampooConfig(storage="cholesky"))),
    "adamw_4bit": (o4.adamw_4bit, dict(b1=0.8)),
    "scale_by_shampoo": (o4.scale_by_shampoo,
                         dict(statistics_every=1, inverse_root_every=2,
                              start_step=2)),
    "scale_by_adam_4bit": (o4.scale_by_adam_4bit, dict(b2=0.99)),
    "soap": (o4.soap, dict(precondition_every=1, b1=0.9, shampoo_beta=0.9)),
    "scale_by_soap": (o4.scale_by_soap,
                      dict(precondition_every=2,
                           moments=o4.AdamConfig(bits=32))),
}


@pytest.mark.parametrize("name", list(PUBLIC_FACTORIES))
def test_plain_inject_hyperparams_gives_identical_updates(name):
  """``optax.inject_hyperparams(factory)(...)`` with no static_args: every
  numeric default (ints too) is traced, structure stays in the configs, and the
  updates equal the plain factory's."""
  factory, kwargs = PUBLIC_FACTORIES[name]
  parameters = inspect.signature(factory).parameters
  if "learning_rate" in parameters:
    kwargs = dict(kwargs, learning_rate=1e-2)
  # Equal float32 values on both sides, the float defaults included:
  # inject_hyperparams turns a Python float into a float32 array, and a 4-bit
  # code can flip on a differently rounded hyperparameter.
  floats = {
      k: p.default
      for k, p in parameters.items()
      if isinstance(p.default, float)
  }
  f32 = {
      k: (jnp.asarray(v, jnp.float32) if isinstance(v, float) else v)
      for k, v in {
          **floats,
          **kwargs
      }.items()
  }
  plain, injected = factory(**f32), optax.inject_hyperparams(factory)(**f32)
  s1, s2 = plain.init(PARAMS), injected.init(PARAMS)
  assert "learning_rate" not in kwargs or "learning_rate" in s2.hyperparams
  for interval in ("statistics_every", "precondition_every"):
    if interval in kwargs:
      assert s2.hyperparams[interval].dtype == jnp.int32  # an int, traced
  for i in range(3):
    u1, s1 = jax.jit(plain.update)(grads_at(i), s1, PARAMS)
    u2, s2 = jax.jit(injected.update)(grads_at(i), s2, PARAMS)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      # constants fold into fused multiply-adds that traced values do not: an
      # ulp or two on O(1) updates
      np.testing.assert_allclose(
          np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(u2))


@pytest.mark.parametrize("name", list(small_optimizers()))
def test_optax_contract(name):
  tx = small_optimizers()[name]
  # extra args accepted, bf16 dtype preserved, no recompilation on the second
  # call
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
  state = tx.init(params)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  tx.update(grads_at(0, params), state, params,
            some_extra_arg=1.0)  # extra keyword arguments are accepted
  update = jax.jit(tx.update)
  updates, state = update(grads_at(0, params), state, params)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  signature = lambda tree: (jax.tree.structure(tree),
                            [(x.shape, x.dtype) for x in jax.tree.leaves(tree)])
  before = signature(state)
  updates, state = update(grads_at(1, params), state, params)
  assert signature(state) == before
  assert update._cache_size() == 1
  # MultiSteps: nothing on the first micro-step; twice the same gradient is one
  # step on it
  multi = optax.MultiSteps(tx, every_k_schedule=2)
  ms = multi.init(params)
  one_step, _ = update(grads_at(0, params), tx.init(params),
                       params)  # jitted on both sides: same rounding
  for i in range(2):
    multi_updates, ms = jax.jit(multi.update)(grads_at(0, params), ms, params)
    want = one_step if i else jax.tree.map(jnp.zeros_like, one_step)
    for a, b in zip(jax.tree.leaves(multi_updates), jax.tree.leaves(want)):
      np.testing.assert_array_equal(
          np.asarray(a, np.float32), np.asarray(b, np.float32))
  # masked: the bias passes through untouched, the matrix gets the optimizer run
  # on it alone
  masked = optax.masked(tx, {"w": True, "b": False})
  masked_updates, _ = masked.update(
      grads_at(0, params), masked.init(params), params)
  only_w, _ = tx.update({"w": grads_at(0, params)["w"]},
                        tx.init({"w": params["w"]}), {"w": params["w"]})
  np.testing.assert_array_equal(
      np.asarray(masked_updates["b"]), np.asarray(grads_at(0, params)["b"]))
  np.testing.assert_allclose(
      np.asarray(masked_updates["w"], np.float32),
      np.asarray(only_w["w"], np.float32), rtol=1e-6)

  def body(carry, i):
    p, s = carry
    u, s = tx.update(grads_at(0, p), s, p)
    return (optax.apply_updates(p, u), s), None

  (final, _), _ = jax.lax.scan(body, (params, tx.init(params)), jnp.arange(3))
  assert all(
      bool(jnp.all(jnp.isfinite(x.astype(jnp.float32))))
      for x in jax.tree.leaves(final))


# Learning rates other than small_optimizers()': SGD's step is the (grafted)
# gradient itself, and Rosenbrock's gradients reach hundreds, as in Optax's own
# convergence tests; SOAP's step on the matrix parabola is Adam's in the
# gradient's singular bases, about one lr per singular value (64 of them) rather
# than per entry (5,120), so it needs a larger one.
CONVERGENCE_OPTIMIZERS = {
    "shampoo_sgdm":
        lambda: o4.shampoo_sgdm(5e-4, statistics_every=1, inverse_root_every=2,
                                shampoo=o4.ShampooConfig(storage="cholesky")),
    "soap":
        lambda: o4.soap(1e-1, precondition_every=1),
}


@pytest.mark.parametrize("name", list(small_optimizers()))
def test_rosenbrock_and_matrix_parabola_converge(name):
  """Both terms must fall on their own: the matrix term (5,133 at the start) and
  Rosenbrock's (1.0)."""
  tx = CONVERGENCE_OPTIMIZERS.get(name, lambda: small_optimizers()[name])()
  target = jnp.asarray(
      np.random.default_rng(0).standard_normal((64, 80)), jnp.float32)

  def terms(p):
    x, y = p["b"][0], p["b"][1]
    return jnp.sum((p["w"] - target)**2), (1 - x)**2 + 100 * (y - x**2)**2

  params, state = PARAMS, tx.init(PARAMS)
  step = jax.jit(lambda p, s: (lambda g: tx.update(g, s, p))
                 (jax.grad(lambda q: sum(terms(q)))(p)))
  start = [float(t) for t in terms(params)]
  for _ in range(400):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  end = [float(t) for t in terms(params)]
  assert end[0] < 0.05 * start[0] and end[1] < 0.05 * start[1], (start, end)


def checkpointed_optimizers():
  """Every small optimizer, and the fp32 and statistic-storage baselines of
  Shampoo."""
  kw = dict(statistics_every=1, inverse_root_every=2)
  return dict(
      small_optimizers(),
      shampoo32=o4.shampoo_adamw(1e-2, **kw, shampoo=o4.ShampooConfig(bits=32)),
      shampoo_matrix=o4.shampoo_adamw(
          1e-2, **kw, shampoo=o4.ShampooConfig(storage="matrix")))


@pytest.mark.parametrize("name", list(checkpointed_optimizers()))
def test_orbax_checkpoint_resume_is_bit_identical(tmp_path, name):
  """Restored as a fresh process would: into ``jax.eval_shape(tx.init, ...)``
  targets, not a live state."""
  import orbax.checkpoint as ocp
  tx = checkpointed_optimizers()[name]
  step = jax.jit(lambda p, s, g: (lambda u_s: (optax.apply_updates(p, u_s[0]),
                                               u_s[1]))(tx.update(g, s, p)))
  params, state = PARAMS, tx.init(PARAMS)
  for i in range(3):
    params, state = step(params, state, grads_at(i))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": params, "state": state})
  checkpointer.wait_until_finished()
  target = {
      "params": jax.eval_shape(lambda: PARAMS),
      "state": jax.eval_shape(tx.init, PARAMS)
  }
  restored = checkpointer.restore(tmp_path / "ckpt", target)
  p1, s1, p2, s2 = params, state, restored["params"], restored["state"]
  assert jax.tree.structure(s2) == jax.tree.structure(s1)
  for i in range(3, 6):
    p1, s1 = step(p1, s1, grads_at(i))
    p2, s2 = step(p2, s2, grads_at(i))
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restoring_into_an_incompatible_configuration_fails_clearly(tmp_path):
  import orbax.checkpoint as ocp
  state = o4.shampoo_adamw(1e-2).init(PARAMS)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", state)
  checkpointer.wait_until_finished()
  # a new learning rate is compatible: same state structure
  restored = checkpointer.restore(tmp_path / "ckpt",
                                  o4.shampoo_adamw(3e-2).init(PARAMS))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  # the 4-bit eigenvectors are QuantizedArrays, the fp32 ones plain arrays:
  # Orbax names the leaf
  with pytest.raises(
      ValueError,
      match=r"tree structures do not "
          r"match(.|\n)*preconditioners\.order_64\.eigenvectors"
  ):
    checkpointer.restore(
        tmp_path / "ckpt",
        o4.shampoo_adamw(1e-2, shampoo=o4.ShampooConfig(bits=32)).init(PARAMS))


def test_map_params_and_reduce_on_plateau():
  tx = o4.shampoo_adamw(1e-2, statistics_every=1, inverse_root_every=2,
                        adam=o4.AdamConfig(bits=4))
  state = tx.init(PARAMS)
  # Adam's quantized moments are params-shaped trees of QuantizedArrays: map
  # over them as units.
  is_quantized = lambda x: isinstance(x, o4.QuantizedArray)
  seen = []
  mapped = optax.tree.map_params(tx, lambda p: seen.append(type(p)) or p, state,
                                 is_leaf=is_quantized)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)
  # the 4-bit first moment of "w" was visited as a params leaf
  assert o4.QuantizedArray in seen
  # a loss stuck at 1.0 for more than `patience` steps halves the updates of the
  # chain
  plateau = optax.chain(tx,
                        optax.contrib.reduce_on_plateau(patience=2, factor=0.5))
  pstate, state = plateau.init(PARAMS), tx.init(PARAMS)
  for i in range(
      3):  # the best value, then `patience` steps without improvement
    updates, pstate = plateau.update(
        grads_at(i), pstate, PARAMS, value=jnp.asarray(1.0))
    plain, state = tx.update(grads_at(i), state, PARAMS)
  assert float(pstate[1].scale) == 0.5
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(plain)):
    np.testing.assert_allclose(np.asarray(a), 0.5 * np.asarray(b), rtol=1e-6)


def test_long_bf16_run_with_schedule_stays_finite_and_decodable():
  from helpers import digits_mlp_problem
  loss, params, batch, full = digits_mlp_problem()
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 100, 1500)
  tx = o4.shampoo_adamw(schedule, statistics_every=10, inverse_root_every=50,
                        adam=o4.AdamConfig(bits=4))
  state = tx.init(params)

  @jax.jit
  def step(params, state, i):
    grads = jax.grad(lambda p: loss(
        jax.tree.map(lambda x: x.astype(jnp.float32), p), *batch(i)))(
            params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(1500):
    params, state = step(params, state, i)
  assert all(p.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(p)))
             for p in jax.tree.leaves(params))
  assert int(substate(state, o4.ShampooState).failure_count) == 0 and int(
      substate(state, o4.ShampooState).count) == 1500
  for q in jax.tree.leaves(state,
                           is_leaf=lambda x: isinstance(x, o4.QuantizedArray)):
    if isinstance(q, o4.QuantizedArray):
      assert bool(jnp.all(jnp.isfinite(o4.dequantize(q))))
  final = float(
      loss(jax.tree.map(lambda x: x.astype(jnp.float32), params), *full))
  assert final < 0.2


FUZZ_SHAPES = [(), (0,), (1,), (5,), (1, 1), (0, 7), (3, 1, 70), (66, 65),
               (2, 3, 4, 5), (1, 130, 1, 2)]


@settings(max_examples=6, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(FUZZ_SHAPES),
            st.sampled_from(["float32", "bfloat16"])), min_size=1, max_size=4),
    st.sampled_from(["shampoo_all4", "adamw_4bit", "adamw_4bit_packed"]))
def test_fuzz_random_pytrees(leaves, name):
  params = {
      "group": [jnp.ones(shape, dtype) * 0.1 for shape, dtype in leaves[1:]],
      "first": jnp.ones(leaves[0][0], leaves[0][1]) * 0.1
  }
  tx = small_optimizers()[name]
  state = tx.init(params)
  for i in range(2):
    grads = jax.tree.map(
        lambda p: jax.random.normal(jax.random.PRNGKey(i), p.shape, p.dtype),
        params)
    updates, state = tx.update(grads, state, params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.shape == p.shape and u.dtype == p.dtype
    assert bool(jnp.all(jnp.isfinite(u.astype(jnp.float32))))


@pytest.mark.parametrize("factory,kwargs,match", [
    (o4.shampoo_sgdm, dict(learning_rate=0.1, momentum=1.0), "momentum"),
    (o4.shampoo_sgdm, dict(learning_rate=-0.1), "learning_rate"),
    (o4.shampoo_adamw, dict(learning_rate=1e-3,
                            weight_decay=-1.0), "weight_decay"),
    (o4.AdamConfig, dict(bits=16), "bits"),
    (o4.ShampooConfig, dict(bits=2), "bits"),
    (o4.adamw_4bit, dict(learning_rate="fast"), "learning_rate"),
    (o4.adamw_4bit, dict(learning_rate=1e-3,
                         skip_nonfinite="yes"), "skip_nonfinite"),
    # shampoo_adamw's default base is optax.scale_by_adam, which checks nothing
    (o4.shampoo_adamw, dict(learning_rate=1e-3, b1=1.5), "b1"),
    (o4.shampoo_adamw, dict(learning_rate=1e-3, b2=1.0), "b2"),
    (o4.shampoo_adamw, dict(learning_rate=1e-3, eps=-1e-8), "eps"),
    (o4.soap, dict(learning_rate=1e-3, shampoo_beta=1.2), "shampoo_beta"),
])
def test_aliases_validate_their_arguments(factory, kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match) as error:
    factory(**kwargs)
  assert "unexpected keyword" not in str(
      error.value)  # the check ran, not Python's signature binding
