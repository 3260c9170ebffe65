"""Writes docs/api.md from the docstrings of the public API: ``python
docs/gen_api.py``."""

import inspect
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import optax_shampoo4  # noqa: E402


def render() -> str:
  lines = [
      "# API", "",
      "Generated from the docstrings by `python docs/gen_api.py` "
      "(checked by `tests/test_docs.py`).",
      ""
  ]
  # a function's repr holds its address: name it instead
  named = lambda text: re.sub(r"<function (\w+) at 0x[0-9a-f]+>", r"\1", text)
  for name in optax_shampoo4.__all__:
    obj = getattr(optax_shampoo4, name)
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
      lines += [f"## `{name}`", "", f"`{named(repr(obj))}`", ""]
      continue
    try:
      signature = named(str(inspect.signature(obj)))
    except (TypeError, ValueError):
      signature = "(...)"
    lines += [
        f"## `{name}{signature}`", "",
        inspect.cleandoc(obj.__doc__ or "").strip(), ""
    ]
  return "\n".join(lines)


if __name__ == "__main__":
  with open(os.path.join(os.path.dirname(__file__), "api.md"), "w") as f:
    f.write(render())
