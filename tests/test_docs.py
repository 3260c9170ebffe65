"""Docs stay true: the API page matches the docstrings, and the README's snippets
run."""

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_shampoo4 as o4
from helpers import substate

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(ROOT, "docs"))


def test_api_page_is_generated_from_current_docstrings():
  import gen_api
  with open(os.path.join(ROOT, "docs", "api.md")) as f:
    assert f.read() == gen_api.render(), "run: python docs/gen_api.py"


def test_every_public_function_has_a_docstring():
  import optax_shampoo4
  for name in optax_shampoo4.__all__:
    obj = getattr(optax_shampoo4, name)
    if callable(obj):
      assert (obj.__doc__ or "").strip(), name


def test_readme_usage_snippet_runs():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  snippet = re.search(r"## Usage\n\n```python\n(.*?)```", readme, re.S).group(1)
  params = {"w": jnp.ones((64, 96)), "b": jnp.zeros(96)}
  grads = jax.tree.map(jnp.ones_like, params)
  namespace = {"params": params, "grads": grads}
  exec(snippet, namespace)  # noqa: S102 - our own README
  assert set(namespace["updates"]) == {"w", "b"}


def test_readme_host_schedule_snippet_runs_and_updates_the_params():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  snippet = re.search(
      r"schedule the preconditioner updates.*?```python\n(.*?)```", readme,
      re.S).group(1)
  params = {"w": jnp.ones((16, 24)), "b": jnp.zeros(24)}
  xs = jax.random.normal(jax.random.PRNGKey(0), (8, 16))
  loss = lambda p, x: jnp.sum(jnp.tanh(x @ p["w"] + p["b"])**2)
  tx = o4.shampoo_adamw(1e-2)
  namespace = dict(params=params, opt_state=tx.init(params), tx=tx, loss=loss,
                   batches=iter([xs] * 3), steps=3)
  exec(snippet, namespace)  # noqa: S102 - our own README
  assert int(substate(namespace["opt_state"], o4.ShampooState).count) == 3
  assert not np.allclose(namespace["params"]["w"], params["w"])


def _documented_commands(script: str):
  """Every command line ``python benchmarks/<script> ...`` quoted in the README
  and ``docs/benchmarks.md`` (code spans may wrap, indented in lists), as
  argument lists."""
  import shlex
  commands = []
  for page in ("README.md", os.path.join("docs", "benchmarks.md")):
    with open(os.path.join(ROOT, page)) as f:
      text = f.read()
    for span in re.findall(
        r"`(python\s+benchmarks/" + re.escape(script) + r"[^`]*)`", text):
      # Markdown reads a line break and its indent as one space
      commands.append(shlex.split(re.sub(r"\s+", " ", span))[2:])
  return commands


@pytest.mark.parametrize("script,least", [("train_lm", 10),
                                          ("compile_phases", 2)])
def test_documented_benchmark_commands_name_variants_that_exist(script, least):
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  sys.path.insert(0, ROOT)
  import importlib
  import train_lm
  parser = importlib.import_module(script).parser
  commands = _documented_commands(script + ".py")
  assert len(commands) >= least
  for argv in commands:
    args = parser().parse_args(argv)
    for name in filter(None, (args.only or "").split(";")):
      try:
        train_lm.lookup(name, args)
      except KeyError:
        pytest.fail(f"unknown variant {name!r} in {argv}")


@pytest.mark.parametrize(
    "flags,variant,column,due",
    [(("--inverse-root-every", "300", "--inverse-root-every-after", "600:500"),
      "shampoo 4-bit, host-scheduled updates", 1, [300, 600, 1000]),
     (("--inverse-root-every", "500", "--inverse-root-every-after",
       "500:100"), "shampoo 4-bit, host-scheduled updates", 1,
      [500, 600, 700, 800, 900, 1000, 1100, 1200]),
     (("--precondition-every", "20", "--precondition-every-after",
       "300:40"), "soap 4-bit lr 1e-3, host-scheduled refresh", 0,
      list(range(20, 301, 20)) + list(range(320, 1201, 40)))])
def test_the_loops_interval_flags_give_the_documented_schedules(
    flags, variant, column, due):
  """The steps at which ``train_lm.py``'s loop runs the roots (Shampoo) or the
  refresh (SOAP) under the flags docs/benchmarks.md describes them with."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import train_lm
  from train_lm_variants import host_schedule
  args = train_lm.parser().parse_args(
      ["--statistics-every", "100", "--steps", "1200", *flags])
  schedule = host_schedule(variant, args)
  assert [s for s in range(1, 1201) if schedule(s)[column]] == due


def test_documented_profile_commands_parse():
  sys.path.insert(0, ROOT)
  from benchmarks import profile
  commands = _documented_commands("profile.py")
  assert len(commands) >= 2
  for argv in commands:
    profile.parse_args(argv)
