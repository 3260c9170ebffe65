"""The command line of ``benchmarks/train_lm.py``, which
``benchmarks/compile_time.py`` and ``benchmarks/compile_phases.py`` share."""

from __future__ import annotations

import argparse

from train_lm_variants import SPLIT_STEP, SPLIT_UPDATES

DESCRIPTION = ("Whole training runs of a Flax byte-level GPT: AdamW against "
               "Shampoo, all-4-bit and SOAP, side by side (GPU).")


def parser() -> argparse.ArgumentParser:
  """The command line: what runs, then how the loop runs and compiles it."""
  parser = argparse.ArgumentParser(description=DESCRIPTION)
  _add_run_options(parser)
  _add_loop_options(parser)
  return parser


def _add_run_options(parser: argparse.ArgumentParser) -> None:
  """The model, data, optimizers and their intervals, devices and output."""
  parser.add_argument("--steps", type=int, default=1200)
  parser.add_argument("--size", default="base")
  parser.add_argument(
      "--batch", type=int, default=None,
      help="sequences per step (default: the size's own, 32 for base); the "
      "optimizer's cost per step is fixed while the model's grows with it")
  parser.add_argument("--max-bytes", type=int, default=8_000_000)
  parser.add_argument("--lr", type=float, default=1e-3,
                      help="Shampoo's peak learning rate")
  parser.add_argument("--statistics-every", type=int, default=20)
  parser.add_argument("--inverse-root-every", type=int, default=100)
  parser.add_argument(
      "--devices", type=int, default=1,
      help="data-parallel over this many GPUs, params and "
      "optimizer state FSDP-sharded, Shampoo's and SOAP's stacks spread over "
      "them")
  parser.add_argument("--precondition-every", type=int, default=10,
                      help="SOAP's basis interval")
  step_and_interval = lambda text: tuple(map(int, text.split(":")))
  parser.add_argument(
      "--precondition-every-after", default=None, metavar="STEP:EVERY",
      type=step_and_interval,
      help="the loop's schedule refreshes SOAP's bases every EVERY steps after "
      "STEP (host-scheduled variants)")
  parser.add_argument(
      "--inverse-root-every-after", default=None, metavar="STEP:EVERY",
      type=step_and_interval,
      help="the loop's schedule updates Shampoo's inverse roots every EVERY "
      "steps after STEP (host-scheduled variants)")
  parser.add_argument(
      "--only", default=None,
      help="';'-separated optimizer names (default: all); a name ending in "
      f"'{SPLIT_STEP}' runs each step as two programs (one device only): the "
      "model's gradient and the optimizer's update; one ending in "
      f"'{SPLIT_UPDATES}' also runs each preconditioner update as a program "
      "of its own; results already in "
      "OUT/parts are reused")
  parser.add_argument("--out", default="benchmarks/results/train_lm")


def _add_loop_options(parser: argparse.ArgumentParser) -> None:
  """How the training loop waits, feeds, profiles and compiles its steps."""
  parser.add_argument(
      "--sync-every", type=int, default=1,
      help="the training loop waits for the step (reads its loss) only every "
      "this many steps; step times are then each block's mean")
  parser.add_argument(
      "--profile-steps", type=int, default=0,
      help="after the run, trace this many plain "
      "steps and split their wall-clock by part of the program "
      "(benchmarks/step_trace.py)")
  parser.add_argument(
      "--compile-concurrently", action="store_true",
      help="compile the plain and update programs side by side "
      "(o4.compile_scheduled); compile s is then the wall-clock of all")
  parser.add_argument(
      "--update-autotune-level", type=int, default=None,
      help="with --compile-concurrently: XLA:GPU's autotune level for the "
      "programs that update the preconditioners (default: the plain step's)")
  parser.add_argument(
      "--xla-option", action="append", default=[], metavar="KEY=VALUE",
      help="with --compile-concurrently: an XLA option of every program that "
      "compile_scheduled compiles (with a split step, the optimizer's), e.g. "
      "xla_gpu_enable_triton_gemm=false (repeatable)")
  parser.add_argument(
      "--update-xla-option", action="append", default=[], metavar="KEY=VALUE",
      help="with --compile-concurrently: an XLA option of the update programs "
      "(repeatable; any replaces compile_scheduled's default for a GPU)")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument(
      "--profile-free-running", action="store_true",
      help="trace the profiled steps in a loop that does not wait for each")
  parser.add_argument(
      "--prefetch", action="store_true",
      help="put each step's batch on the device while the step before runs, "
      "as an input pipeline that prefetches does (default: the step's call "
      "copies it from host memory)")
