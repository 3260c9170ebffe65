"""The compiled programs of ``train_lm.py``'s training loop, one per entry of
the host's schedule: a whole training step each, or (for a variant whose name
ends in ``SPLIT_STEP``) one gradient program of the model shared by all entries
and, per entry, a program of the optimizer alone (for ``SPLIT_UPDATES``, the
programs of the entry's parts, ``o4.scheduled_parts``). Compiled one after the
other (seconds per program) or side by side by ``o4.compile_scheduled``
(seconds: the wall-clock of all)."""

from __future__ import annotations

import time
from concurrent import futures
from typing import Any, NamedTuple

from train_lm_variants import split_of


class SplitProgram(NamedTuple):
  """A training step run as separate programs: the model's loss and gradient,
  then the optimizer's programs on the Flax ``TrainState``
  (``o4.apply_scheduled_gradients``, or the parts of
  ``o4.apply_scheduled_part``). Called like a whole step's compiled program."""
  gradient: Any  # compiled (params, x, y) -> (loss, grads)
  updates: Any  # compiled (state, grads) -> state each, the state donated

  def __call__(self, state, x, y):
    loss, grads = self.gradient(state.params, x, y)
    for update in self.updates:
      state = update(state, grads)
    return state, loss

  def programs(self):
    return (self.gradient,) + tuple(self.updates)

  def as_text(self) -> str:
    return "\n".join(program.as_text() for program in self.programs())

  def memory_analysis(self):
    """The analysis of the program with the largest temp buffers (they run
    one after the other)."""
    return max((program.memory_analysis() for program in self.programs()),
               key=lambda analysis: analysis.temp_size_in_bytes)


def compile_whole(jitted_step, state, dues, xy, options=None):
  """``({due: compiled}, seconds)`` of a jitted whole step with a static
  ``due``; ``options``: ``compile_scheduled``'s keywords, or None to compile
  one program after the other."""
  import optax_shampoo4 as o4
  if options is not None:
    start = time.perf_counter()
    programs = o4.compile_scheduled(jitted_step, dues, state, *xy, **options)
    return programs, [time.perf_counter() - start]
  programs, seconds = {}, []
  for due in dict.fromkeys(dues):
    start = time.perf_counter()
    programs[due] = jitted_step.lower(state, *xy, due=due).compile()
    seconds.append(time.perf_counter() - start)
  return programs, seconds


def split_step(loss_fn, apart=False):
  """``(gradient, update, parts)``: the split step's two jitted functions,
  the loss and gradient of ``loss_fn(params, x, y)`` and the optimizer's
  update with the state donated and ``due`` static
  (``o4.apply_scheduled_gradients``, or with ``apart``
  ``o4.apply_scheduled_part``), and the function that gives a ``due``'s
  programs in order (``o4.scheduled_parts`` with ``apart``)."""
  import jax
  import optax_shampoo4 as o4
  if apart:
    update, parts = o4.apply_scheduled_part, o4.scheduled_parts
  else:
    update, parts = o4.apply_scheduled_gradients, lambda due: (due,)
  return jax.jit(jax.value_and_grad(loss_fn)), jax.jit(
      update, donate_argnums=0, static_argnames="due"), parts


def compile_split(loss_fn, state, dues, xy, options=None, apart=False):
  """``({due: SplitProgram}, seconds)``: the gradient of ``loss_fn(params, x,
  y)`` compiled once, then the optimizer's programs (with ``apart``, those of
  every part of a ``due``), as :func:`compile_whole` compiles whole steps;
  side by side, the gradient program compiles while the optimizer's programs
  lower and compile."""
  import jax
  import optax_shampoo4 as o4
  gradient, update, parts = split_step(loss_fn, apart)
  grads = jax.eval_shape(lambda params: params, state.params)
  part_dues = [part for due in dues for part in parts(due)]
  start = time.perf_counter()
  lowered = gradient.lower(state.params, *xy)
  if options is None:
    compiled = lowered.compile()
    seconds = [time.perf_counter() - start]
    updates, update_s = compile_whole(update, state, part_dues, (grads,))
    seconds += update_s
  else:
    with futures.ThreadPoolExecutor(1) as pool:
      pending = pool.submit(lowered.compile)
      updates = o4.compile_scheduled(update, part_dues, state, grads, **options)
      compiled = pending.result()
    seconds = [time.perf_counter() - start]
  return {
      due: SplitProgram(compiled, tuple(updates[part] for part in parts(due)))
      for due in dict.fromkeys(dues)
  }, seconds


def compile_arguments(name, args):
  """``train_lm.compile_programs``'s keywords for the variant ``name`` from
  the command line."""
  options = None
  if args.compile_concurrently:
    options = dict(
        compiler_options=xla_options(args.xla_option),
        update_compiler_options=xla_options(args.update_xla_option,
                                            args.update_autotune_level))
  return dict(options=options, split=split_of(name))


def xla_options(typed, autotune_level=None):
  """XLA options from ``KEY=VALUE`` strings (bools and ints as such), or
  None."""
  options = {}
  if autotune_level is not None:
    options["xla_gpu_autotune_level"] = autotune_level
  for option in typed:
    key, _, value = option.partition("=")
    if value.lower() in ("true", "false"):
      options[key] = value.lower() == "true"
    else:
      options[key] = int(value) if value.lstrip("-").isdigit() else value
  return options or None
