"""SOAP (docs/algorithms.md §7) against a float64 numpy SOAP, convergence
against AdamW, and state bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_shampoo4 as o4
from helpers import digits_mlp_problem, gpt2_small_shapes, substate, train
from optax_shampoo4.preconditioners import make_codec
from references import adam_updates, bjorck, rotated_adam_step, soap_updates

FP32 = dict(
    config=o4.ShampooConfig(bits=32, max_order=8),
    moments=o4.AdamConfig(bits=32))
CONSTANTS = dict(b1=0.9, b2=0.95, eps=1e-8)


@pytest.mark.parametrize("moment_on_refresh", ["project", "keep"])
def test_fp32_matches_float64_numpy_soap_through_refreshes(moment_on_refresh):
  """Every leaf of a mixed tree, 12 steps with a basis refresh every 3rd: a
  plain matrix, one cut into two blocks at ``max_order`` 8, a 3-D kernel with
  per-head dimension numbers, a bias and a 2-D leaf marked ``NO_PRECONDITIONER``
  (both plain Adam). Square blocks: a block's first statistic is then
  full-rank, so fp32 and float64 agree to 1e-4."""
  rng = np.random.default_rng(0)
  shapes = {
      "w": (8, 8),
      "tall": (16, 8),
      "heads": (8, 2, 8),
      "b": (5,),
      "head_b": (2, 8)
  }
  dims = {
      "w": None,
      "tall": None,
      "heads": o4.DimensionNumbers(rows=0, cols=2),
      "b": None,
      "head_b": o4.NO_PRECONDITIONER
  }
  config = o4.ShampooConfig(bits=32, max_order=8, dimension_numbers=dims)
  tx = o4.scale_by_soap(**CONSTANTS, config=config,
                        moments=o4.AdamConfig(bits=32), precondition_every=3,
                        moment_on_refresh=moment_on_refresh)
  stream = [{
      k: rng.standard_normal(s) for k, s in shapes.items()
  } for _ in range(12)]
  state = tx.init({k: jnp.zeros(s) for k, s in shapes.items()})
  ours = []
  for grads in stream:
    updates, state = jax.jit(tx.update)(jax.tree.map(
        lambda g: jnp.asarray(g, jnp.float32), grads), state)
    ours.append(jax.tree.map(np.asarray, updates))
  assert int(state.failure_count) == 0
  hp = dict(CONSTANTS, beta=0.95, every=3,
            project=moment_on_refresh == "project")
  expected = {
      "w": soap_updates([g["w"] for g in stream], **hp),
      "tall": [
          np.concatenate(blocks) for blocks in zip(
              soap_updates([g["tall"][:8] for g in stream], **hp),
              soap_updates([g["tall"][8:] for g in stream], **hp))
      ],
      "heads": [
          np.stack(heads, axis=1)
          for heads in zip(*(soap_updates([g["heads"][:, h]
                                           for g in stream], **hp)
                             for h in range(2)))
      ],
      "b": adam_updates([g["b"] for g in stream], **CONSTANTS),
      "head_b": adam_updates([g["head_b"] for g in stream], **CONSTANTS),
  }
  for name in shapes:
    for step, (got, want) in enumerate(
        zip([u[name] for u in ours], expected[name]), start=1):
      scale = np.max(np.abs(want))
      np.testing.assert_allclose(got / scale, want / scale, atol=1e-4,
                                 err_msg=f"{name}, step {step}")
  # the refreshes did rotate: the update is not the unrotated Adam update
  unrotated = adam_updates([g["w"] for g in stream], **CONSTANTS)[-1]
  assert np.max(np.abs(ours[-1]["w"] - unrotated)) > 0.1


@pytest.mark.parametrize("use_steps", [None, 1])
def test_each_step_rotates_with_the_decoded_basis_after_its_bjorck_steps(
    use_steps):
  """A plain step after a refresh of 4-bit bases, against float64 numpy from
  the same stored state: the rotations use the decoded rows after
  ``bjorck_steps[1]`` Björck steps, none by default (``None``)."""
  config = o4.ShampooConfig(
      bjorck_steps=None if use_steps is None else (1, use_steps))
  tx = o4.scale_by_soap(**CONSTANTS, config=config,
                        moments=o4.AdamConfig(bits=32), precondition_every=2)
  rng = np.random.default_rng(0)
  grads = [{"w": rng.standard_normal((96, 64))} for _ in range(3)]
  state = tx.init({"w": jnp.zeros((96, 64))})
  update = jax.jit(tx.update)
  for g in grads[:2]:  # the second refreshes the bases
    _, state = update(jax.tree.map(jnp.float32, g), state)
  stored = {n: state.bases[f"order_{n}"].eigenvectors for n in (96, 64)}
  assert all(isinstance(x, o4.QuantizedArray) for x in stored.values())
  decoded = {
      n: np.asarray(make_codec(config, n).load(x), np.float64)[0]
      for n, x in stored.items()
  }
  got = np.asarray(update(jax.tree.map(jnp.float32, grads[2]), state)[0]["w"])

  mu, nu = o4.soap_moments(state, {"w": jnp.zeros((96, 64))}, config)

  def expected(steps):
    return rotated_adam_step(
        bjorck(decoded[96], steps), bjorck(decoded[64], steps),
        np.asarray(mu["w"], np.float64), np.asarray(nu["w"], np.float64),
        grads[2]["w"], 3, **CONSTANTS)[0]

  steps = use_steps or 0
  want, other = expected(steps), expected(1 - steps)
  scale = np.max(np.abs(want))
  np.testing.assert_allclose(got / scale, want / scale, atol=1e-4)
  # the rectification is visible at this tolerance
  assert np.max(np.abs(want - other)) / scale > 1e-3


def test_a_refresh_projects_v_through_the_rectified_change_of_basis():
  """A refresh of 4-bit bases, against float64 numpy from the same stored
  states: ``V`` moves by ``P∘P`` with ``P`` one Björck step on ``Ũ_new
  Ũ_oldᵀ`` of the decoded rows (``bjorck_steps[0]``), and this step's
  gradient is added in the decoded new bases. To first order that ``P`` is the
  product of the rectified bases: the two land ten times closer together than
  the product of the unrectified ones does."""
  config = o4.ShampooConfig()
  tx = o4.scale_by_soap(**CONSTANTS, config=config,
                        moments=o4.AdamConfig(bits=32), precondition_every=2)
  rng = np.random.default_rng(0)
  grads = [
      rng.standard_normal((96, 64)) * np.linspace(0.1, 3.0, 64)
      for _ in range(4)
  ]
  params = {"w": jnp.zeros((96, 64))}
  update = jax.jit(tx.update)
  states = [tx.init(params)]
  for g in grads:  # steps 2 and 4 refresh the bases
    states.append(update({"w": jnp.float32(g)}, states[-1])[1])

  def decoded(state, n):
    stored = state.bases[f"order_{n}"].eigenvectors
    return np.asarray(make_codec(config, n).load(stored), np.float64)[0]

  old, new = ({n: decoded(state, n) for n in (96, 64)} for state in states[3:])
  errors = [
      np.max(np.abs(u @ u.T - np.eye(len(u))))
      for u in (*old.values(), *new.values())
  ]
  assert min(errors) > 0.05  # 4-bit rows: the rectification has work to do
  nu = [
      np.asarray(o4.soap_moments(state, params, config)[1]["w"], np.float64)
      for state in states[3:]
  ]

  def expected(change):
    left, right = change(96), change(64)
    return (0.95 * left**2 @ nu[0] @ (right**2).T + 0.05 *
            (new[96] @ grads[3] @ new[64].T)**2)

  want = expected(lambda n: bjorck(new[n] @ old[n].T, 1))
  scale = np.max(np.abs(want))
  np.testing.assert_allclose(nu[1] / scale, want / scale, atol=1e-5)
  rectified_bases = expected(lambda n: bjorck(new[n], 1) @ bjorck(old[n], 1).T)
  decoded_bases = expected(lambda n: new[n] @ old[n].T)
  distance = lambda v: np.max(np.abs(v - want))
  assert distance(rectified_bases) < 0.2 * distance(decoded_bases)


@pytest.mark.parametrize("moment_bits", [8, 4])
def test_4bit_bases_track_fp32_soap_and_both_beat_adamw(moment_bits):
  problem = digits_mlp_problem()
  kwargs = dict(learning_rate=3e-3, weight_decay=0.0, precondition_every=5)
  adamw, _ = train(
      optax.adamw(3e-3, b1=0.95, b2=0.95, weight_decay=0.0), problem, 400)
  fp32, _ = train(
      o4.soap(**kwargs, config=o4.ShampooConfig(bits=32),
              moments=o4.AdamConfig(bits=32)), problem, 400)
  quantized, state = train(
      o4.soap(**kwargs, moments=o4.AdamConfig(bits=moment_bits)), problem, 400)
  soap_state = substate(state, o4.SoapState)
  assert int(soap_state.failure_count) == 0
  is_quantized = lambda x: isinstance(x, o4.QuantizedArray)
  assert all(
      is_quantized(soap_state.bases[key].eigenvectors)
      for key in ("order_64", "order_128"))
  # groups by block shape: w3 (64, 10) is below the quantization threshold, w1
  # (64, 128) and w2 (128, 64) are not
  for moment in (soap_state.mu, soap_state.nu):
    assert [is_quantized(g) for g in moment.groups] == [False, True, True]
  assert quantized <= 1.05 * fp32, (quantized, fp32)
  assert fp32 < 0.5 * adamw and quantized < 0.5 * adamw, (fp32, quantized,
                                                          adamw)


def test_bf16_rotations_stay_within_two_percent_of_fp32_rotations():
  # Same gradients through refreshes (every 3 steps); the bases come from the
  # statistics alone, so only the rotations' rounding separates the runs
  # (measured: 0.3-0.7 %).
  params = {"w": jnp.zeros((96, 64))}
  txs = [
      o4.scale_by_soap(
          config=o4.ShampooConfig(preconditioning_precision=precision),
          precondition_every=3) for precision in ("highest", "bf16")
  ]
  states = [tx.init(params) for tx in txs]
  steps = [jax.jit(tx.update) for tx in txs]
  for i in range(8):
    grads = {
        "w":
            jax.random.normal(jax.random.PRNGKey(i),
                              (96, 64)) * jnp.linspace(0.1, 3.0, 64)
    }
    outs = []
    for k in range(2):
      updates, states[k] = steps[k](grads, states[k])
      outs.append(updates["w"])
    error = jnp.linalg.norm(outs[1] - outs[0]) / jnp.linalg.norm(outs[0])
    assert 0 < float(error) < 0.02, (i, float(error))


def test_state_bytes_per_parameter_on_gpt2_shapes():
  params = gpt2_small_shapes()
  count = sum(np.prod(p.shape) for p in params.values())
  per_param = lambda tx: o4.state_nbytes(jax.eval_shape(tx.init, params)
                                        ) / count
  adamw = per_param(optax.adamw(1e-3))
  default = per_param(o4.soap())  # 4-bit bases, 8-bit moments
  all4 = per_param(o4.soap(moments=o4.AdamConfig(bits=4)))
  soap32 = per_param(
      o4.soap(config=o4.ShampooConfig(bits=32), moments=o4.AdamConfig(bits=32)))
  shampoo4 = per_param(o4.shampoo_adamw(1e-3, adam=o4.AdamConfig()))
  assert adamw == pytest.approx(8.0)
  assert default <= 0.45 * adamw and all4 <= 0.3 * adamw, (
      default, all4)  # bases 0.5625 B per entry
  assert all4 < default < shampoo4 and default < soap32 / 5, (all4, default,
                                                              shampoo4, soap32)


def test_state_bytes_per_parameter_on_the_benchmark_transformer():
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
  import lm
  size = lm.SIZES["base"]
  model = lm.ByteTransformer(size["width"], size["layers"], size["heads"],
                             size["context"])
  params = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  count = sum(np.prod(p.shape) for p in jax.tree.leaves(params))
  assert 85e6 < count < 86e6
  per_param = lambda tx: o4.state_nbytes(jax.eval_shape(tx.init, params)
                                        ) / count
  default, adamw = per_param(o4.soap()), per_param(optax.adamw(1e-3))
  all4 = per_param(o4.soap(moments=o4.AdamConfig(bits=4)))
  assert default <= 0.45 * adamw and all4 <= 0.3 * adamw, (default, all4)
  assert all4 < per_param(o4.shampoo_adamw(1e-3, adam=o4.AdamConfig()))


def test_moments_stay_where_the_algorithm_keeps_them():
  """The first moment is the EMA of the raw gradient; the second lives in the
  rotated basis (fp32 moments)."""
  tx = o4.scale_by_soap(**CONSTANTS, **FP32, precondition_every=1)
  rng = np.random.default_rng(1)
  grads = [{
      "w": jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)
  } for _ in range(2)]
  params = {"w": jnp.zeros((8, 8))}
  state = tx.init(params)
  for g in grads:
    _, state = tx.update(g, state)
  mu, nu = o4.soap_moments(state, params, FP32["config"])
  np.testing.assert_allclose(mu["w"],
                             0.1 * 0.9 * grads[0]["w"] + 0.1 * grads[1]["w"],
                             rtol=1e-5)
  rows = [np.asarray(state.bases["order_8"].eigenvectors[i]) for i in range(2)]
  np.testing.assert_allclose(rows[0] @ rows[0].T, np.eye(8), atol=1e-5)
  rotated = rows[0] @ np.asarray(grads[1]["w"]) @ rows[1].T
  assert np.all(np.asarray(nu["w"]) >= 0.05 * rotated**2 - 1e-6)


def test_a_failed_basis_update_is_counted_and_keeps_the_old_basis():
  tx = o4.scale_by_soap(**CONSTANTS, **FP32, precondition_every=1)
  state = tx.init({"w": jnp.zeros((8, 8))})
  _, state = tx.update({"w": jnp.ones((8, 8))}, state)
  before = state.bases
  huge = {
      "w": jnp.full((8, 8), 1e30, jnp.float32)
  }  # finite, but G Gᵀ overflows
  _, after = tx.update(huge, state)
  assert int(after.failure_count) == int(state.failure_count) + 2
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after.bases)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kwargs,match", [
    (dict(config=o4.ShampooConfig(storage="matrix")), "config.storage"),
    (dict(moments=o4.AdamConfig(second_moment="factored")), "moments"),
    (dict(precondition_every=0), "precondition_every"),
    (dict(moment_on_refresh="reset"), "moment_on_refresh"),
    (dict(shampoo_beta=1.0), "shampoo_beta"),
    (dict(config="4bit"), "config"),
])
def test_bad_arguments_raise_at_construction(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    o4.soap(1e-3, **kwargs)


def test_soap_moments_rejects_params_or_config_that_block_differently():
  params = {"w": jnp.zeros((16, 8)), "b": jnp.zeros(8)}
  config = o4.ShampooConfig(max_order=8)
  state = o4.scale_by_soap(config=config).init(params)
  mu, nu = o4.soap_moments(state, params, config)
  assert mu["w"].shape == nu["w"].shape == (16, 8) and mu["b"].shape == (8,)
  for other_params, other_config, match in [
      (params, o4.ShampooConfig(max_order=16), "config"),  # one block, not two
      ({
          "w": jnp.zeros((16, 8))
      }, config, "params"),
  ]:
    with pytest.raises(ValueError, match=match):
      o4.soap_moments(state, other_params, other_config)
  with pytest.raises(TypeError, match="state"):
    o4.soap_moments(params, params, config)
