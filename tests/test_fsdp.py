"""Params, gradients and optimizer state sharded along rows over 8 virtual CPU
devices (FSDP; conftest sets the device count): results equal one device's."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import optax_shampoo4 as o4
from helpers import (SHARDED_TEST_PARAMS as PARAMS, assert_no_full_stack_gather,
                     relative, substate)
from optax_shampoo4.sharding import optimizer_state_sharding

pytestmark = pytest.mark.skipif(jax.device_count() < 8,
                                reason="needs 8 devices")


def fsdp_runs(tx, params, steps, shardable=lambda p: True):
  """``steps`` steps of ``tx`` with params, gradients and state sharded along
  rows over an 8-device ``"fsdp"`` axis (leaves ``shardable`` rejects are
  replicated), and the same steps on one device. Returns ``(params_sharding,
  sharded step, (params, state) sharded, (params, state) single, last
  grads)``."""
  mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
  rows = lambda p: NamedSharding(
      mesh,
      PartitionSpec("fsdp", *([None] * (p.ndim - 1)))
      if shardable(p) else PartitionSpec())
  params_sharding = jax.tree.map(rows, params)
  state_sharding = optimizer_state_sharding(
      jax.eval_shape(tx.init, params), mesh, "fsdp", params_sharding)

  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  sharded = jax.jit(
      step, in_shardings=(params_sharding, state_sharding, params_sharding),
      out_shardings=(params_sharding, state_sharding))
  single = jax.jit(step)
  p_sharded, s_sharded = jax.device_put(params,
                                        params_sharding), jax.device_put(
                                            tx.init(params), state_sharding)
  p_single, s_single = params, tx.init(params)
  for i in range(steps):
    grads = jax.tree.map(
        lambda p: jax.random.normal(jax.random.PRNGKey(i), p.shape), params)
    p_sharded, s_sharded = sharded(p_sharded, s_sharded,
                                   jax.device_put(grads, params_sharding))
    p_single, s_single = single(p_single, s_single, grads)
  return params_sharding, sharded, (p_sharded, s_sharded), (p_single,
                                                            s_single), grads


@pytest.mark.parametrize("second_moment", ["rank1", "block", "factored"])
def test_fsdp_sharded_params_and_4bit_adam_moments(second_moment):
  """Params and gradients sharded along their rows over 8 devices (FSDP); the
  4-bit moments follow them (codes and row scales sharded, no block across two
  devices); results equal the single-device run."""
  params = {
      "a": jnp.zeros((96, 256)),
      "b": jnp.zeros((64, 128)),
      "odd": jnp.zeros((72, 100)),
      "bias": jnp.zeros(256)
  }
  params = jax.tree.map(lambda p: p + 0.1, params)
  _, _, (p_sharded, s_sharded), (p_single, s_single), _ = fsdp_runs(
      o4.adamw_4bit(1e-2, config=o4.AdamConfig(second_moment=second_moment)),
      params, 4)
  for a, b in zip(jax.tree.leaves(p_sharded), jax.tree.leaves(p_single)):
    np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  for a, b in zip(jax.tree.leaves(s_sharded), jax.tree.leaves(s_single)):
    if a.dtype == jnp.uint8:  # codes: identical
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # fp32 scales / factors: sharded mean reductions round differently
    # (factored: 1e-7)
    else:
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)
  adam_state = substate(s_sharded, o4.ScaleByAdam4bitState)
  mu_a, nu_a = adam_state.mu["a"], adam_state.nu["a"]
  assert mu_a.codes.sharding.shard_shape(
      mu_a.codes.shape) == (mu_a.codes.shape[0] // 8,)
  assert mu_a.scales[0].sharding.shard_shape(
      mu_a.scales[0].shape)[0] == mu_a.scales[0].shape[0] // 8
  if second_moment == "rank1":
    assert nu_a.codes.sharding.shard_shape(nu_a.codes.shape) == (
        12, 128)  # 96 rows / 8, 256 codes / 2
  # row factors along rows; column factors (means over all rows) replicated
  if second_moment == "factored":
    assert nu_a.row.sharding.shard_shape(
        nu_a.row.shape) == (12,) and nu_a.col.sharding.is_fully_replicated
  # "odd" (72 × 100): 900 elements per device is not a multiple of 128-element
  # blocks -> replicated
  assert adam_state.mu["odd"].codes.sharding.is_fully_replicated
  total = o4.state_nbytes(s_sharded)
  per_device = o4.state_nbytes(s_sharded, per_device=True)
  odd = o4.state_nbytes(adam_state.mu["odd"]) + o4.state_nbytes(
      adam_state.nu["odd"])
  assert per_device <= total / 8 + odd + 4 * (256 + 128 + 256) + 64, (
      per_device, total)


def test_shampoo_with_fsdp_sharded_params_equals_single_device():
  """Params, gradients and 4-bit Adam moments sharded along rows (FSDP),
  Shampoo's stacks over the same mesh axis: three steps with statistics and
  inverse-root updates match the single-device run, and the compiled step
  gathers no full preconditioner stack."""
  params = jax.tree.map(lambda p: p + 0.1, {
      **PARAMS, "wide": jnp.zeros((64, 256))
  })
  tx = o4.shampoo_adamw(
      1e-3, statistics_every=1, inverse_root_every=2,
      shampoo=o4.ShampooConfig(bits=32, storage="matrix",
                               shard_blocks=8), adam=o4.AdamConfig(bits=4))
  params_sharding, sharded, (p_sharded, s_sharded), (
      p_single, s_single), grads = fsdp_runs(
          tx, params, 3, shardable=lambda p: p.ndim and p.shape[0] % 8 == 0)
  # Sharded products round differently (~1e-6); a 4-bit Adam code then
  # occasionally lands on the other side of a midpoint, which moves that
  # element's update by a code step: measured 2e-3 of the total parameter change
  # after three steps (a misplaced block or scale would be of order 1).
  for key in params:
    moved = np.asarray(p_single[key]) - np.asarray(params[key])
    assert relative(
        np.asarray(p_sharded[key]) - np.asarray(params[key]), moved) < 1e-2, key
    assert p_sharded[key].sharding.is_equivalent_to(params_sharding[key],
                                                    p_sharded[key].ndim)
  adam_state = substate(s_sharded, o4.ScaleByAdam4bitState)
  wide = adam_state.mu[
      "wide"]  # 8 rows x 256 per device: whole 128-element blocks -> sharded
  assert wide.codes.sharding.shard_shape(
      wide.codes.shape)[0] == 64 * 256 // 2 // 8
  assert adam_state.mu[
      # 12 x 80 = 960 per device: not whole blocks
      "a"].codes.sharding.is_fully_replicated
  stacks = substate(s_sharded, o4.ShampooState).preconditioners
  assert o4.state_nbytes(stacks,
                         per_device=True) <= o4.state_nbytes(stacks) / 8 * 1.01
  hlo = sharded.lower(p_sharded, s_sharded,
                      jax.device_put(grads,
                                     params_sharding)).compile().as_text()
  assert_no_full_stack_gather(hlo, stacks)


HANG_REPRO = """
import os
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")
import jax, jax.numpy as jnp, numpy as np
import optax_shampoo4 as o4
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("fsdp",))
params = {"w1": jnp.ones((256, 512)) * 0.01,
          "w2": jnp.ones((512, 256)) * 0.01, "b": jnp.zeros(256)}
params = jax.device_put(params, {"w1": NamedSharding(mesh, P(None, "fsdp")),
                                 "w2": NamedSharding(mesh, P("fsdp", None)),
                                 "b": NamedSharding(mesh, P())})
tx = o4.shampoo_adamw(1e-3, shampoo=o4.ShampooConfig(bits=32),
                      statistics_every=5, inverse_root_every=10)
noise = lambda i, p: jax.random.normal(jax.random.PRNGKey(i), p.shape) * 0.1
state, step = jax.jit(tx.init)(params), jax.jit(tx.update)
for i in range(10):
  grads = jax.tree.map(lambda p: noise(i, p), params)
  updates, state = step(grads, state, params)
assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
# the stacks spread over the mesh by a NamedSharding (Cholesky-QR of the 4-bit
# eigenvector updates); several matrices per device and order
config = o4.ShampooConfig(shard_blocks=NamedSharding(mesh, P("fsdp")))
tx = o4.shampoo_adamw(1e-3, shampoo=config, statistics_every=2,
                      inverse_root_every=4)
params = {f"w{i}": jnp.ones((64, 96)) * 0.01 for i in range(16)}
params = jax.device_put(params, NamedSharding(mesh, P()))
state, step = jax.jit(tx.init)(params), jax.jit(tx.update)
for i in range(4):
  grads = jax.tree.map(lambda p: noise(i, p), params)
  updates, state = step(grads, state, params)
assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
print("done")
"""


def test_fsdp_sharded_statistics_and_root_steps_finish():
  """8 CPU devices, FSDP-sharded params, 32-bit eigenvector storage, steps 5 and
  10 update the preconditioners; then 4-bit stacks spread by a NamedSharding:
  both hung forever when every device thread ran a batched LAPACK kernel at once
  (linalg.per_matrix). Run in its own process, so that a hang fails the test
  instead of the suite.

  A second attempt is made only when XLA:CPU's own collective runtime aborts the
  process at its rendezvous deadline (seen once in CI, in an all-reduce inside a
  conditional, with 7 of 8 device threads arrived; not reproduced in 20 local
  runs, up to 8 of them side by side and 6 beside the test suite). That abort is
  XLA's thread scheduling, not the LAPACK hang named above, which never ends and
  so fails at the 240 s limit."""
  import subprocess
  import sys
  for _ in range(2):
    done = subprocess.run([sys.executable, "-c", HANG_REPRO],
                          capture_output=True, text=True, timeout=240)
    if "Termination timeout for" not in done.stderr:
      break
  assert done.returncode == 0 and "done" in done.stdout, done.stderr[-2000:]


def test_soap_sharded_over_8_devices_equals_one_device():
  """SOAP's bases sharded slot-wise over the 8 devices of the FSDP axis (a
  NamedSharding, constrained inside the refresh), its moments sharded along rows
  with the params: four steps with two basis refreshes match a true one-device
  run, and each device holds an eighth of the bases."""
  params = {
      "a": jnp.full((96, 80), 0.1),
      "b": jnp.full((80, 96), 0.1),
      "bias": jnp.zeros(96)
  }
  config = o4.ShampooConfig(bits=32)
  soap = lambda config: o4.soap(1e-2, config=config, moments=o4.AdamConfig(
      bits=32), precondition_every=2)
  fsdp = NamedSharding(
      Mesh(np.array(jax.devices()[:8]), ("fsdp",)),
      PartitionSpec("fsdp"))  # fsdp_runs' mesh
  _, _, (p_sharded, s_sharded), _, _ = fsdp_runs(
      soap(dataclasses.replace(config, shard_blocks=fsdp)), params, 4,
      shardable=lambda p: p.ndim and p.shape[0] % 8 == 0)
  single, state = soap(config), None
  p_single, state = params, single.init(params)
  for i in range(4):
    grads = jax.tree.map(
        lambda p: jax.random.normal(jax.random.PRNGKey(i), p.shape), params)
    updates, state = jax.jit(single.update)(grads, state, p_single)
    p_single = optax.apply_updates(p_single, updates)
  for key in params:
    moved = np.asarray(p_single[key]) - np.asarray(params[key])
    assert relative(
        np.asarray(p_sharded[key]) - np.asarray(params[key]), moved) < 3e-2, key
  soap_state = substate(s_sharded, o4.SoapState)
  assert int(soap_state.failure_count) == 0 and int(soap_state.count) == 4
  for leaf in jax.tree.leaves(soap_state.bases):
    assert leaf.sharding.spec[0] == "fsdp"
  assert o4.state_nbytes(
      soap_state.bases,
      per_device=True) <= o4.state_nbytes(soap_state.bases) / 8 * 1.01
  # one block per group: each block's moment is sharded along its rows
  for group in soap_state.mu.groups + soap_state.nu.groups:
    assert group.sharding.spec[:2] == (None, "fsdp"), group.sharding


def test_soaps_quantized_block_moments_shard_along_blocks_or_rows():
  """8-bit moments in block stacks: a group of eight blocks is sharded along
  its blocks; a one-block group along its rows (codes and row maxima; the
  column maxima span all rows and stay whole). Two sharded steps give the
  one-device moments (square blocks: a one-gradient statistic is then
  full-rank, so both runs find the same bases). Without the params'
  shardings, the groups shard the same and a bias's moments are replicated."""
  params = {"many": jnp.full((8 * 80, 80), 0.1), "one": jnp.full((72, 72), 0.1)}
  config = o4.ShampooConfig(max_order=80)
  tx = o4.soap(1e-2, config=config, precondition_every=1)
  _, _, (_, sharded), (_, single), _ = fsdp_runs(tx, params, 2)
  soap_state = substate(sharded, o4.SoapState)
  one, many = soap_state.nu.groups  # by block shape: (72, 72), (80, 80)
  for a in jax.tree.leaves(many):
    assert a.sharding.spec[0] == "fsdp", (a.shape, a.sharding)
  assert one.codes.sharding.spec[:2] == (None, "fsdp")
  assert one.scales[0].sharding.spec[:2] == (None, "fsdp")
  assert one.scales[1].sharding.is_fully_replicated
  for a, b in zip(
      o4.soap_moments(soap_state, params, config),
      o4.soap_moments(substate(single, o4.SoapState), params, config)):
    for name in params:
      assert relative(np.asarray(a[name]), np.asarray(b[name])) < 1e-2, name
  # without the params' shardings the groups shard alike, and the moments of a
  # tensor without a preconditioner are replicated
  mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
  state = jax.eval_shape(tx.init, dict(params, bias=jnp.zeros(72)))
  shardings = substate(
      optimizer_state_sharding(state, mesh, "fsdp"), o4.SoapState)
  assert shardings.nu.groups[0].codes.spec[:2] == (None, "fsdp")
  assert all(s.is_fully_replicated for s in jax.tree.leaves(shardings.nu.plain))
