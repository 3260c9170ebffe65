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
:func:`compile_scheduled` compiles those programs ahead of the loop, side by
side.

Each of those programs holds the whole model. A loop may instead split the
step in two programs, the model's gradient (compiled once) and the optimizer's
update (one program per ``due``), so that the update programs compile without
the model::

  grad_step = jax.jit(jax.value_and_grad(loss))
  update_step = jax.jit(o4.apply_scheduled_gradients, donate_argnums=0,
                        static_argnames="due")
  updates = o4.compile_scheduled(update_step, dues, state, state.params)
  ...
  loss, grads = grad_step(state.params, batch)
  state = updates[due](state, grads)

The results are the same; the gradient stays in memory between the two
programs (``docs/benchmarks.md``, "A loop that splits the step", measures the
compile, the step and the peak memory).

Each update program holds the plain step as well. A split loop may instead run
every Shampoo preconditioner update as a program of its own
(:func:`update_preconditioners`), followed by the plain update, so that no
program compiles the plain step twice::

  part_step = jax.jit(o4.apply_scheduled_part, donate_argnums=0,
                      static_argnames="due")
  parts = o4.compile_scheduled(
      part_step, {part for due in dues for part in o4.scheduled_parts(due)},
      state, state.params)
  ...
  loss, grads = grad_step(state.params, batch)
  for part in o4.scheduled_parts(due):
    state = parts[part](state, grads)
"""

from __future__ import annotations

import types
from concurrent import futures
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_shampoo4 import _checks

#: The keyword of ``update`` that carries the host's schedule.
DUE_KEYWORD = "preconditioner_due"
#: XLA options that :func:`compile_scheduled` gives the update programs on a
#: GPU unless told otherwise: their matrix products go to cuBLAS instead of
#: Triton's GEMM fusions, whose autotuning took most of the statistics program's
#: compile, with no measured cost to the step (``docs/benchmarks.md``, "XLA
#: options of the update programs").
GPU_UPDATE_COMPILER_OPTIONS = types.MappingProxyType(
    {"xla_gpu_enable_triton_gemm": False})
#: One step's schedule: (statistics, roots) or, for SOAP, (refresh, unused);
#: None where the transformations schedule themselves.
Due = Optional[Tuple[bool, bool]]
#: The class attribute of a transformation's state that names the fields a
#: preconditioner update changes (:func:`update_preconditioners`); empty where
#: the update cannot run apart from the step.
PRECONDITIONER_FIELDS = "preconditioner_fields"


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
  _check_due(DUE_KEYWORD, due)
  return bool(due[0]), bool(due[1])


def _check_due(name: str, due) -> None:
  if (not isinstance(due, tuple) or len(due) != 2 or
      not all(isinstance(d, (bool, np.bool_)) for d in due)):
    raise TypeError(
        f"{name} must be a pair of Python bools (statistics, roots) "
        "computed on the host and passed as a static argument of the jitted "
        f"step, got {type(due).__name__} {due!r}")


def compile_scheduled(step: Any, dues: Iterable[Due], *args,
                      compiler_options: Optional[Dict[str, Any]] = None,
                      update_compiler_options: Optional[Dict[str, Any]] = None,
                      **kwargs) -> Dict[Due, "jax.stages.Compiled"]:
  """The compiled program of every distinct ``due``, compiled concurrently.

  The programs of a host-scheduled loop (the plain step and the update steps,
  each a whole training step) are lowered one after the other, each compiled in
  a thread as soon as it is lowered, since XLA releases the GIL while it
  compiles. The compiles slow each other down: on a GPU the split loop's four
  programs took about as long compiled as soon as lowered as lowered first
  (``docs/benchmarks.md``, "Each program alone, with the update programs'
  options").

  Args:
    step: a ``jax.jit``-wrapped training step whose keyword ``due`` is static
      (``static_argnames="due"``) and passed on as ``preconditioner_due``.
    dues: the values of ``due`` the loop will pass, e.g. ``{(o4.due_at(s, 100),
      o4.due_at(s, 500)) for s in range(1, 501)}``; pairs of Python bools, or
      None for a step whose transformations schedule themselves.
    *args, **kwargs: example arguments of ``step`` (arrays or
      ``jax.ShapeDtypeStruct``), as for ``step.lower``.
    compiler_options: XLA options of every program, as for
      ``Lowered.compile``. None (default): XLA's own.
    update_compiler_options: XLA options of the programs that update the
      preconditioners (a ``due`` with a true entry), which run once in every
      ``statistics_every`` steps, over ``compiler_options``. None (default):
      :data:`GPU_UPDATE_COMPILER_OPTIONS` on a GPU, which roughly halves their
      compile there, and nothing elsewhere; ``{}``: XLA's own.
      ``{"xla_gpu_autotune_level": 0}`` alone slows the statistics step
      several times (``docs/benchmarks.md``).

  Returns:
    ``{due: compiled}``; call ``compiled(*args, **kwargs)`` without ``due``.

  Raises:
    TypeError: if ``step`` is not jitted or a ``due`` is neither None nor a
      pair of bools.
  """
  if not hasattr(step, "lower"):
    raise TypeError("step must be a jax.jit-wrapped function with a static "
                    f"keyword 'due', got {type(step).__name__}")
  dues = list(dict.fromkeys(dues))
  for due in dues:
    if due is not None:
      _check_due("each entry of dues", due)
  if update_compiler_options is None and jax.default_backend() == "gpu":
    update_compiler_options = dict(GPU_UPDATE_COMPILER_OPTIONS)
  update_options = {
      **(compiler_options or {}),
      **(update_compiler_options or {})
  } or None
  # Tracing holds the GIL and XLA's compile does not: each program compiles as
  # soon as it is lowered, while the next one lowers, the programs with the
  # most updates (the longest compiles) first.
  with futures.ThreadPoolExecutor(max(len(dues), 1)) as pool:
    pending = {}
    for due in sorted(dues, key=lambda due: -sum(due or ())):
      lowered = step.lower(*args, due=due, **kwargs)
      pending[due] = pool.submit(
          lowered.compile,
          update_options if due and any(due) else compiler_options)
    return {due: pending[due].result() for due in dues}


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


def scheduled_parts(due: Due) -> Tuple[Due, ...]:
  """The programs, in order, of a step that runs each preconditioner update
  apart (:func:`apply_scheduled_part`): ``((True, False), (False, True),
  (False, False))`` for ``due = (True, True)``, the statistics, then the roots,
  then the plain update; ``(due,)`` for a plain step or None.

  Raises:
    TypeError: unless ``due`` is None or a pair of bools.
  """
  if due is None:
    return (None,)
  _check_due("due", due)
  updates = tuple(part for part, wanted in (((True, False), due[0]),
                                            ((False, True), due[1])) if wanted)
  return updates + ((False, False),)


def apply_scheduled_part(train_state: Any, grads: optax.Updates,
                         due: Due) -> Any:
  """One program of a step split by :func:`scheduled_parts`: the plain update
  (:func:`apply_scheduled_gradients`) where no entry of ``due`` is true, else
  :func:`update_preconditioners`. One jitted function thus gives
  :func:`compile_scheduled` every program of the loop.

  Raises:
    TypeError: unless ``due`` is None or a pair of bools.
  """
  if due is None:
    return apply_scheduled_gradients(train_state, grads, due)
  _check_due("due", due)
  if not any(due):
    return apply_scheduled_gradients(train_state, grads, due)
  return update_preconditioners(train_state, grads, due)


def update_preconditioners(train_state: Any, grads: optax.Updates,
                           due: Tuple[bool, bool]) -> Any:
  """A Flax ``TrainState`` whose Shampoo preconditioners (and failure counts)
  took the updates that ``due`` asks for, and nothing else: its params, step,
  counters and base optimizer's state are unchanged, so
  ``apply_scheduled_gradients(state, grads, (False, False))`` must follow.

  The two equal ``apply_scheduled_gradients(state, grads, due)``. Jitted, XLA
  drops the unused update and base optimizer from the program, so no update
  program compiles the plain step again.

  Raises:
    TypeError: unless ``due`` is a pair of bools.
    ValueError: if the optimizer state holds no Shampoo state, or holds a
      state whose update changes more than its preconditioners (SOAP's refresh
      projects its second moment, which the step then advances).
  """
  _check_due("due", due)
  _, opt_state = train_state.tx.update(grads, train_state.opt_state,
                                       train_state.params, **{DUE_KEYWORD: due})
  return train_state.replace(
      opt_state=_with_new_preconditioners(train_state.opt_state, opt_state))


def _with_new_preconditioners(old: Any, new: Any) -> Any:
  """``old`` with the :data:`PRECONDITIONER_FIELDS` of every state that names
  them taken from ``new`` (two trees of one structure)."""
  owner = lambda x: hasattr(x, PRECONDITIONER_FIELDS)
  found = []

  def take(new, old):
    if not owner(new):
      return old
    fields = getattr(new, PRECONDITIONER_FIELDS)
    if not fields:
      raise ValueError(
          f"{type(new).__name__}'s preconditioner update cannot run apart "
          "from the step; pass its due to apply_scheduled_gradients")
    found.append(fields)
    return old._replace(**{field: getattr(new, field) for field in fields})

  merged = jax.tree.map(take, new, old, is_leaf=owner)
  if not found:
    raise ValueError("train_state.opt_state holds no Shampoo state whose "
                     "preconditioners update_preconditioners could update")
  return merged
