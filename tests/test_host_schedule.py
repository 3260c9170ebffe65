"""Preconditioner updates scheduled by the training loop
(``optax_shampoo4.host_schedule``): the same results as the conditional that the
transformations use by default, a step with no conditional, NaN safety, and the
keyword's check."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_shampoo4 as o4
from helpers import assert_state_kept_but_counters, substate

PARAMS = {
    "w": jnp.zeros((24, 40)),
    "heads": jnp.zeros((8, 2, 12)),
    "b": jnp.zeros(40)
}
INTERVALS = dict(statistics_every=2, inverse_root_every=4)
OPTIMIZERS = {
    "shampoo_adamw":
        lambda: o4.shampoo_adamw(1e-2, **INTERVALS),
    "all-4-bit, injected":
        lambda: optax.inject_hyperparams(o4.shampoo_adamw)
        (learning_rate=1e-2, adam=o4.AdamConfig(), **INTERVALS),
    "soap":
        lambda: o4.soap(1e-2, precondition_every=2),
}


def grads_at(step):
  return jax.tree.map(
      lambda p: jax.random.normal(jax.random.PRNGKey(step), p.shape), PARAMS)


def host_due(step):
  return (o4.due_at(step, 2), o4.due_at(step, 4))


def scheduled_update(tx):
  return jax.jit(tx.update, static_argnames="preconditioner_due")


# shampoo_adamw itself: test_compiled_scheduled_programs_step_a_flax_train_state
@pytest.mark.parametrize("name", ["all-4-bit, injected", "soap"])
def test_the_host_schedule_equals_the_conditional_without_one(name):
  """Six steps (statistics, roots and bases updates among them): the updates
  and every state leaf match the self-scheduled run to fp32 rounding, and the
  lowered plain step holds no conditional where the default one does."""
  tx = OPTIMIZERS[name]()
  own = scheduled = tx.init(PARAMS)
  default_update, host_update = jax.jit(tx.update), scheduled_update(tx)
  for step in range(1, 7):
    want, own = default_update(grads_at(step), own, PARAMS)
    got, scheduled = host_update(
        grads_at(step), scheduled, PARAMS, preconditioner_due=host_due(step))
    for a, b in zip(
        jax.tree.leaves((got, scheduled)), jax.tree.leaves((want, own))):
      np.testing.assert_allclose(
          np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5,
          atol=1e-6, err_msg=f"step {step}")
  assert "stablehlo.case" in default_update.lower(grads_at(1), own,
                                                  PARAMS).as_text()
  plain = host_update.lower(
      grads_at(1), scheduled, PARAMS,
      preconditioner_due=(False, False)).as_text()
  assert "stablehlo.case" not in plain


@pytest.mark.parametrize("name", ["shampoo_adamw", "soap"])
def test_a_nonfinite_gradient_on_a_scheduled_update_changes_no_state(name):
  tx = OPTIMIZERS[name]()
  update = scheduled_update(tx)
  state = tx.init(PARAMS)
  for step in range(1, 5):
    _, state = update(
        grads_at(step), state, PARAMS, preconditioner_due=host_due(step))
  for bad in (jnp.nan, jnp.inf):
    grads = grads_at(9)
    grads["w"] = grads["w"].at[3, 5].set(bad)
    updates, new_state = update(grads, state, PARAMS,
                                preconditioner_due=(True, True))
    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
    assert assert_state_kept_but_counters(state, new_state) >= 3


def test_preconditioner_due_must_be_two_static_bools():
  tx = o4.shampoo_adamw(1e-2)
  state = tx.init(PARAMS)
  for bad in ((1, 0), True, (True,)):
    with pytest.raises(TypeError, match="preconditioner_due"):
      tx.update(grads_at(1), state, PARAMS, preconditioner_due=bad)
  traced = jax.jit(functools.partial(tx.update, grads_at(1), state, PARAMS))
  with pytest.raises(TypeError, match="preconditioner_due"):
    traced(preconditioner_due=(jnp.array(True), jnp.array(False)))


def test_due_at_follows_the_transformations_own_rule():
  assert [s for s in range(1, 13) if o4.due_at(s, 4)] == [4, 8, 12]
  assert [s for s in range(1, 13) if o4.due_at(s, 4, start_step=5)] == [8, 12]
  with pytest.raises(ValueError, match="every"):
    o4.due_at(4, 0)
  with pytest.raises(TypeError, match="every"):
    o4.due_at(4, 2.5)


def test_compiled_scheduled_programs_step_a_flax_train_state():
  """A loop split as ``host_schedule`` shows it, a gradient program and the
  programs of ``o4.compile_scheduled`` over ``o4.apply_scheduled_gradients``
  (one per distinct ``due``, the state donated), equals a whole step
  through ``TrainState.apply_gradients`` (the transformation scheduling
  itself) over four steps with a roots update; with no schedule it passes no
  keyword, as a plain GradientTransformation needs."""
  from flax.training import train_state
  tx = o4.shampoo_adamw(1e-2, statistics_every=1, inverse_root_every=2)
  # a copy: the update programs donate the state
  create = lambda tx: train_state.TrainState.create(
      apply_fn=None, params=jax.tree.map(jnp.copy, PARAMS), tx=tx)
  loss = lambda p, g: sum(
      jnp.sum(jnp.sin(p[k] + 0.1) * g[k]) for k in sorted(p))
  grad_step = jax.jit(jax.value_and_grad(loss))
  update_step = jax.jit(o4.apply_scheduled_gradients, donate_argnums=0,
                        static_argnames="due")
  dues = [(True, o4.due_at(i, 2)) for i in range(1, 5)]
  programs = o4.compile_scheduled(
      update_step, dues, create(tx), PARAMS,
      update_compiler_options={"xla_gpu_autotune_level": 0})
  assert set(programs) == {(True, False), (True, True)}
  whole_step = jax.jit(
      lambda s, g: s.apply_gradients(grads=jax.grad(loss)(s.params, g)))
  whole = split = create(tx)
  for i, due in enumerate(dues, start=1):
    whole = whole_step(whole, grads_at(i))
    _, grads = grad_step(split.params, grads_at(i))
    split = programs[due](split, grads)
  for a, b in zip(jax.tree.leaves(split), jax.tree.leaves(whole)):
    np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5,
        atol=1e-6)
  assert int(split.step) == 4
  assert not np.allclose(split.params["w"], PARAMS["w"])
  plain = optax.GradientTransformation(*optax.scale(-0.5))
  moved = o4.apply_scheduled_gradients(create(plain), grads_at(1), None)
  np.testing.assert_allclose(moved.params["w"], -0.5 * grads_at(1)["w"])


def test_preconditioner_updates_apart_equal_the_whole_update():
  """The parts of ``o4.scheduled_parts`` (the statistics, the roots, then the
  plain update, each its own program of ``o4.apply_scheduled_part``) equal the
  whole update of every ``due`` over five steps with roots and a NaN gradient,
  leaf by leaf to fp32 rounding, under ``inject_hyperparams`` and the 4-bit
  Adam base; the preconditioner programs hold no plain step (the statistics'
  and the roots' FLOPs together are the whole update's of a roots step less
  at least 90 % of the plain update's)."""
  from flax.training import train_state
  tx = optax.inject_hyperparams(o4.shampoo_adamw)(learning_rate=1e-2,
                                                  adam=o4.AdamConfig(),
                                                  statistics_every=1,
                                                  inverse_root_every=2)
  create = lambda: train_state.TrainState.create(
      apply_fn=None, params=jax.tree.map(jnp.copy, PARAMS), tx=tx)
  jit = lambda f: jax.jit(f, donate_argnums=0, static_argnames="due")
  dues = [(True, o4.due_at(i, 2)) for i in range(1, 6)]
  compile_all = lambda f, dues: o4.compile_scheduled(
      jit(f), dues, create(), PARAMS)
  whole = compile_all(o4.apply_scheduled_gradients, dues)
  parts = compile_all(o4.apply_scheduled_part,
                      [p for due in dues for p in o4.scheduled_parts(due)])
  assert set(parts) == {(True, False), (False, True), (False, False)}
  # each its own copy: the programs donate the state
  at_once, apart = create(), create()
  for i, due in enumerate(dues, start=1):
    grads = grads_at(i)
    if i == 4:
      grads["w"] = grads["w"].at[3, 5].set(jnp.nan)
    at_once = whole[due](at_once, grads)
    for part in o4.scheduled_parts(due):
      apart = parts[part](apart, grads)
  for a, b in zip(jax.tree.leaves(apart), jax.tree.leaves(at_once)):
    np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5,
        atol=1e-6)
  shampoo = substate(apart.opt_state, o4.ShampooState)
  assert (int(apart.step), int(shampoo.count),
          int(shampoo.nonfinite_count)) == (5, 4, 1)
  flops = lambda program: program.cost_analysis()["flops"]
  assert (flops(parts[(True, False)]) + flops(parts[(False, True)])
          <= flops(whole[(True, True)]) - 0.9 * flops(parts[(False, False)]))


def test_update_preconditioners_needs_shampoo_alone_and_a_static_due():
  """SOAP's refresh (which moves its second moment) and a state without
  Shampoo raise a ValueError; a due that is not two bools a TypeError."""
  from flax.training import train_state
  create = lambda tx: train_state.TrainState.create(apply_fn=None,
                                                    params=PARAMS, tx=tx)
  assert o4.scheduled_parts(
      (True, True)) == ((True, False), (False, True), (False, False))
  assert o4.scheduled_parts((False, True)) == ((False, True), (False, False))
  assert o4.scheduled_parts(None) == (None,)
  alone = lambda tx, due: jax.eval_shape(
      functools.partial(o4.update_preconditioners, due=due), create(tx), PARAMS)
  for tx, match in ((OPTIMIZERS["soap"](), "SoapState"), (optax.adamw(1e-2),
                                                          "no Shampoo state")):
    with pytest.raises(ValueError, match=match):
      alone(tx, (True, False))
  with pytest.raises(TypeError, match="due"):
    alone(OPTIMIZERS["shampoo_adamw"](), (1, 0))
  with pytest.raises(TypeError, match="due"):
    o4.scheduled_parts(True)
  with pytest.raises(TypeError, match="pair of Python bools"):
    o4.apply_scheduled_part(create(OPTIMIZERS["shampoo_adamw"]()), PARAMS, True)


def test_compile_scheduled_gives_update_options_to_update_programs_only():
  """An unknown XLA option in ``update_compiler_options`` leaves the plain
  program's compile alone and fails an update program's; one in
  ``compiler_options`` fails the plain program's too; bad arguments raise a
  TypeError that names them."""
  step = jax.jit(lambda x, due: x + 1.0
                 if due and any(due) else 2.0 * x, static_argnames="due")
  bad = {"xla_no_such_option": 1}
  compile_with = lambda dues, **options: o4.compile_scheduled(
      step, dues, jnp.ones(3), **(options or dict(update_compiler_options=bad)))
  programs = compile_with([None, (False, False), None])
  assert set(programs) == {None, (False, False)}
  np.testing.assert_array_equal(programs[(False, False)](jnp.ones(3)), 2.0)
  with pytest.raises(Exception, match="xla_no_such_option"):
    compile_with([(False, False), (False, True)])
  with pytest.raises(Exception, match="xla_no_such_option"):
    compile_with([(False, False)], compiler_options=bad)
  with pytest.raises(TypeError, match="dues"):
    compile_with([(1, 0)])
  with pytest.raises(TypeError, match="step must be"):
    o4.compile_scheduled(lambda x, due: x, [None], jnp.ones(3))


def test_compile_scheduled_compiles_the_programs_at_once():
  """Three programs whose compile takes 0.5 s each are ready in well under
  their 1.5 s sum, each compiled with its own options: the update programs'
  over every program's (a stand-in for a jitted step, so that only the
  scheduling is timed)."""
  import threading
  import time

  class Lowered:

    def __init__(self, due):
      self.due = due

    def compile(self, options):
      time.sleep(0.5)
      return (self.due, options, threading.get_ident())

  class Step:

    def lower(self, *args, due):
      del args
      return Lowered(due)

  start = time.perf_counter()
  programs = o4.compile_scheduled(Step(), [(False, False), (True, False),
                                           (True, True)], jnp.ones(3),
                                  compiler_options=dict(level=4, triton=False),
                                  update_compiler_options=dict(level=0))
  assert time.perf_counter() - start < 1.0
  update_options = dict(level=0, triton=False)
  assert [p[:2] for p in programs.values()] == [((False, False),
                                                 dict(level=4, triton=False)),
                                                ((True, False), update_options),
                                                ((True, True), update_options)]
  assert len({p[2] for p in programs.values()}) == 3


def test_compile_scheduled_compiles_gpu_update_programs_without_triton_gemms(
    monkeypatch):
  """On a GPU the update programs get ``GPU_UPDATE_COMPILER_OPTIONS`` over
  ``compiler_options`` unless ``update_compiler_options`` is given (``{}``:
  XLA's own); the plain program keeps ``compiler_options``; elsewhere nothing
  is added."""

  class Step:

    def lower(self, *args, due):
      del args
      return types.SimpleNamespace(compile=lambda options: options)

  dues = [(False, False), (True, False)]
  compile_with = lambda **kw: list(
      o4.compile_scheduled(Step(), dues, jnp.ones(3), **kw).values())
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert compile_with() == [None, None]
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert compile_with() == [None, {"xla_gpu_enable_triton_gemm": False}]
  assert compile_with(compiler_options=dict(level=4)) == [
      dict(level=4),
      dict(level=4, xla_gpu_enable_triton_gemm=False)
  ]
  assert compile_with(update_compiler_options={}) == [None, None]
  assert compile_with(update_compiler_options=dict(level=0)) == [
      None, dict(level=0)
  ]
