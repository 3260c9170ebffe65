"""Problems and utilities the test modules share."""

import jax


def substate(state, kind):
  """The one sub-state of type ``kind`` inside an optimizer state (chains, apply_if_finite, injections)."""
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kind)) if isinstance(s, kind)]
  assert len(found) == 1, f"expected one {kind.__name__}, found {len(found)}"
  return found[0]
