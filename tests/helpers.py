"""Problems and utilities the test modules share."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_shampoo4 import blocking
from optax_shampoo4.fused import find_state
from optax_shampoo4.quantization import unpack_nibbles


def substate(state, kind):
  """The one sub-state of type ``kind`` inside an optimizer state (chains,
  guards, injections)."""
  return find_state(state, kind)


def matrix_shapes(params):
  """Per leaf path (``keystr``): ``(shape, matrix shape)`` under the default
  blocking rule (``None`` for a leaf with no preconditioner)."""
  return {
      jax.tree_util.keystr(path):
          (tuple(p.shape), blocking.matrix_shape(p.shape))
      for path, p in jax.tree_util.tree_leaves_with_path(params)
  }


def digits_mlp_problem():
  """A tanh MLP on scikit-learn's digits (real data), trained on minibatches of
  64."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  order = np.random.default_rng(0).permutation(len(digits.target))
  x = jnp.asarray(digits.data[order][:1500] / 16.0, jnp.float32)
  y = jnp.asarray(digits.target[order][:1500])
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  params = {
      "w1": jax.random.normal(k1, (64, 128)) / 8,
      "b1": jnp.zeros(128),
      "w2": jax.random.normal(k2, (128, 64)) / 11,
      "b2": jnp.zeros(64),
      "w3": jnp.zeros((64, 10)),
      "b3": jnp.zeros(10)
  }

  def loss(p, xb, yb):
    h = jnp.tanh(jnp.tanh(xb @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"])
    return optax.softmax_cross_entropy_with_integer_labels(
        h @ p["w3"] + p["b3"], yb).mean()

  def batch(i):
    index = jax.random.randint(jax.random.PRNGKey(i), (64,), 0, 1500)
    return x[index], y[index]

  return loss, params, batch, (x, y)


def least_squares_problem(seed=0, n=512, d_in=96, d_out=64, decades=2.0):
  """Deterministic least squares with strongly correlated features (feature
  covariance condition 1e4)."""
  rng = np.random.default_rng(seed)
  mixing = rng.standard_normal((d_in, d_in)) * np.logspace(0, -decades, d_in)
  x = rng.standard_normal((n, d_in)) @ mixing.T
  y = x @ rng.standard_normal((d_in, d_out)) + 0.01 * rng.standard_normal(
      (n, d_out))
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

  def loss(p, *_):
    return jnp.mean((x @ p["w"] + p["b"] - y)**2)

  return loss, {
      "w": jnp.zeros((d_in, d_out)),
      "b": jnp.zeros(d_out)
  }, (lambda i: ()), ()


def loss_curve(tx, problem, steps, every=25):
  """The full-data loss every ``every`` steps of training ``tx`` on ``problem``,
  and the final state."""
  loss, params, batch, full = problem
  state = tx.init(params)

  @jax.jit
  def step(params, state, i):
    grads = jax.grad(loss)(params, *batch(i))
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  curve = []
  for i in range(steps):
    params, state = step(params, state, i)
    if (i + 1) % every == 0:
      curve.append(float(loss(params, *full)))
  return np.asarray(curve), state


def train(tx, problem, steps):
  """The full-data loss after ``steps`` steps, and the final state."""
  curve, state = loss_curve(tx, problem, steps, every=steps)
  return float(curve[-1]), state


def gpt2_small_shapes():
  d, vocab, context, layers = 768, 50257, 1024, 12
  shapes = {"wte": (vocab, d), "wpe": (context, d), "ln_f": (d,)}
  for i in range(layers):
    shapes.update({
        f"h{i}.attn": (d, 3 * d),
        f"h{i}.attn_b": (3 * d,),
        f"h{i}.proj": (d, d),
        f"h{i}.proj_b": (d,),
        f"h{i}.fc": (d, 4 * d),
        f"h{i}.fc_b": (4 * d,),
        f"h{i}.fc_proj": (4 * d, d),
        f"h{i}.fc_proj_b": (d,),
        f"h{i}.ln1": (d,),
        f"h{i}.ln2": (d,)
    })
  return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}


def assert_equal_to_fp32_rounding(xla_updates, xla_state, kernel_updates,
                                  kernel_state):
  """Both paths evaluate the same expressions, but compilers contract ``a·b +
  c·d`` into different fused multiply-adds, so moments may differ in the last
  bit: a value within rounding of a decision boundary then gets the neighbouring
    code, and its update moves with it. Anything beyond that is a bug."""
  for a, b in zip(jax.tree.leaves(xla_state), jax.tree.leaves(kernel_state)):
    a, b = np.asarray(a), np.asarray(b)
    # packed codes: a differing code is one step off, and rare
    if a.dtype == np.uint8:
      codes = [
          np.asarray(unpack_nibbles(x, 2 * x.shape[-1]), int) for x in (a, b)
      ]
      steps = np.abs(codes[0] - codes[1])
      assert steps.max() <= 1 and np.mean(steps > 0) <= 2e-3, (steps.max(),
                                                               np.mean(
                                                                   steps > 0))
    else:  # scales (maxima of the moments), counters
      np.testing.assert_allclose(a, b, rtol=3e-7, atol=0)
  for a, b in zip(
      jax.tree.leaves(xla_updates), jax.tree.leaves(kernel_updates)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
    close = np.isclose(a, b, rtol=2e-5, atol=1e-9) | ~np.isfinite(a)
    assert np.mean(~close) <= 2e-3, np.mean(~close)


def kernel_launches(fn, *args) -> int:
  """How many ``pallas_call`` s the traced ``fn(*args)`` makes, through nested
  jitted functions (a printed jaxpr shows a function called twice with the same
  signature once)."""

  def count(jaxpr):
    total = 0
    for eqn in jaxpr.eqns:
      total += eqn.primitive.name == "pallas_call"
      for value in eqn.params.values():
        for inner in value if isinstance(
            value, (tuple, list)) else (value,):  # cond: a tuple of branches
          inner = getattr(inner, "jaxpr", inner)
          if hasattr(inner, "eqns"):
            total += count(inner)
    return total

  return count(jax.make_jaxpr(fn)(*args).jaxpr)


def unpacked_codes(q):
  """The codes of a QuantizedArray, one per element (4-bit codes unpacked)."""
  return np.asarray(
      unpack_nibbles(q.codes, q.spec.shape[-1]) if q.spec.bits ==
      4 else q.codes)


# the state's fields that a skipped (NaN/Inf) step still advances
COUNTERS = ("count", "nonfinite_count", "notfinite_count", "total_notfinite",
            "last_finite")


def assert_state_kept_but_counters(old_state, new_state) -> int:
  """Every leaf of ``new_state`` but the counters equals ``old_state``'s bit
  for bit; returns how many leaves were compared."""
  leaves = lambda state: {
      jax.tree_util.keystr(path): leaf
      for path, leaf in jax.tree_util.tree_leaves_with_path(state)
  }
  old, new = leaves(old_state), leaves(new_state)
  assert old.keys() == new.keys()
  checked = 0
  for path, leaf in old.items():
    if not any(counter in path for counter in COUNTERS):
      np.testing.assert_array_equal(
          np.asarray(new[path]), np.asarray(leaf), err_msg=path)
      checked += 1
  return checked


# A 2-D kernel each way, a conv kernel and a bias: every kind of leaf that the
# sharding tests spread over devices
SHARDED_TEST_PARAMS = {
    "a": jnp.zeros((96, 80)),
    "b": jnp.zeros((80, 96)),
    "c": jnp.zeros((3, 3, 8, 96)),
    "bias": jnp.zeros(96)
}


def relative(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


# A collective in CPU HLO ("all-gather(") or in its GPU asynchronous form
# ("all-gather-start(").
COLLECTIVE = re.compile(
    r" (all-gather|collective-permute|all-to-all|all-reduce)(-start)?\(")


def result_shapes(line: str):
  """Every array shape an HLO instruction produces (one, or a tuple's for the
  async forms)."""
  result = line.split("=", 1)[1].split(COLLECTIVE.search(line).group(0), 1)[0]
  return [
      tuple(int(d)
            for d in dims.split(",")
            if d)
      for dims in re.findall(r"\w+\[([\d,]*)\]", result)
  ]


def assert_no_full_stack_gather(hlo: str, stacks) -> None:
  """No all-gather produces a whole stored stack, or a whole stack's dequantized
  fp32 form (k, n, n)."""
  stored = {
      tuple(leaf.shape) for leaf in jax.tree.leaves(stacks) if leaf.ndim >= 3
  }
  full_shapes = stored | {(k, n, n) for k, n, _ in stored}
  for line in hlo.splitlines():
    match = COLLECTIVE.search(line)
    if match and match.group(1) == "all-gather":
      for shape in result_shapes(line):
        assert shape not in full_shapes, line
