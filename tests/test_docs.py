"""Docs stay true: the API page matches the docstrings, and the README's snippet
runs."""

import os
import re
import sys

import jax
import jax.numpy as jnp

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
