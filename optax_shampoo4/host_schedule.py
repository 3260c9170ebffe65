"""Preconditioner updates scheduled by the host, so that the step has no
conditional.

By default Shampoo and SOAP decide inside the step, from the traced step count,
whether the statistics and roots (or bases) are due, and run them in a
``lax.cond``. XLA:GPU copies a conditional's predicate to the host and waits for
it, so the host cannot run ahead of the GPU: every millisecond the host spends
on a step (returning its outputs, the training loop, dispatching the next
step) becomes GPU idle time (``docs/benchmarks.md``, "The host's wait at the
conditional").

A training loop that knows the step number can pass the schedule instead, as a
static argument of its jitted step::

  @functools.partial(jax.jit, static_argnames="due")
  def train_step(params, opt_state, batch, due):
    grads = jax.grad(loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   preconditioner_due=due)
    return optax.apply_updates(params, updates), opt_state

  for step in range(1, steps + 1):
    due = (o4.due_at(step, 100), o4.due_at(step, 500))
    params, opt_state = train_step(params, opt_state, next(batches), due)

Each distinct ``due`` compiles once (a plain step and, at most, two update
steps), and none of them holds a conditional. ``optax.chain``,
``optax.inject_hyperparams`` and the aliases pass the keyword through; a Flax
``TrainState`` steps with :func:`apply_scheduled_gradients`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_shampoo4 import _checks

#: The keyword of ``update`` that carries the host's schedule.
DUE_KEYWORD = "preconditioner_due"


def due_at(step: int, every: int, start_step: int = 1) -> bool:
  """Whether an update with interval ``every`` is due at the 1-based ``step``.
  The transformations apply the same rule to their traced step count; on the
  host a step skipped for a NaN/Inf gradient still counts.

  Raises:
    TypeError, ValueError: unless ``every`` is a positive int (or an array, as
      ``optax.inject_hyperparams`` passes it).
  """
  _checks.check_interval("every", every)
  return (step >= start_step) & (step % every == 0)


def run_when_due(due, update: Callable, unchanged: Callable, operands,
                 scheduled: Optional[bool] = None):
  """``update(*operands)`` where ``due`` holds, else ``unchanged(*operands)``.

  Without a host schedule (``scheduled`` None) this is one ``lax.cond``. With
  one (a Python bool) there is no conditional: nothing runs unless
  ``scheduled``, and a scheduled update is kept where ``due`` (then the step's
  own gate, e.g. its finiteness) holds, by a select.
  """
  if scheduled is None:
    return lax.cond(due, update, unchanged, *operands)
  if not scheduled:
    return unchanged(*operands)
  return jax.tree.map(lambda a, b: jnp.where(due, a, b), update(*operands),
                      unchanged(*operands))


def scheduled_due(extra_args: Dict[str, Any]) -> Optional[Tuple[bool, bool]]:
  """The ``(statistics, roots)`` pair that the caller passed as
  ``preconditioner_due``, or None when the transformation schedules itself.

  Raises:
    TypeError: unless it is a pair of Python bools (a traced value would need
      the conditional this keyword exists to avoid).
  """
  due = extra_args.get(DUE_KEYWORD)
  if due is None:
    return None
  if (not isinstance(due, tuple) or len(due) != 2 or
      not all(isinstance(d, (bool, np.bool_)) for d in due)):
    raise TypeError(
        f"{DUE_KEYWORD} must be a pair of Python bools (statistics, roots) "
        "computed on the host and passed as a static argument of the jitted "
        f"step, got {type(due).__name__} {due!r}")
  return bool(due[0]), bool(due[1])


def apply_scheduled_gradients(train_state: Any, grads: optax.Updates,
                              due: Optional[Tuple[bool, bool]]) -> Any:
  """``train_state.apply_gradients(grads=grads)`` for a Flax ``TrainState``,
  with ``due`` passed to ``tx.update`` as ``preconditioner_due`` (None: the
  transformations schedule themselves)."""
  # without a schedule no keyword: a plain GradientTransformation takes none
  extra = {} if due is None else {DUE_KEYWORD: due}
  updates, opt_state = train_state.tx.update(grads, train_state.opt_state,
                                             train_state.params, **extra)
  return train_state.replace(
      step=train_state.step + 1,
      params=optax.apply_updates(train_state.params,
                                 updates), opt_state=opt_state)
