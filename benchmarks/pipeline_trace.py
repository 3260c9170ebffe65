"""What bounds a training loop of back-to-back steps: the host's time per call
and its garbage collections, and the device's busy time and gaps in a profiler
trace (``benchmarks/adam_step.py --trace``)."""

import collections
import gc
import glob
import re
import tempfile
import time

import jax
import jax.numpy as jnp


class _GcTimer:
  """Counts the garbage collections (per generation) and the seconds they take
  while active."""

  def __init__(self):
    self.counts, self.seconds, self._start = [0, 0, 0], 0.0, 0.0

  def __call__(self, phase, info):
    if phase == "start":
      self._start = time.perf_counter()
    else:
      self.counts[info["generation"]] += 1
      self.seconds += time.perf_counter() - self._start

  def __enter__(self):
    gc.callbacks.append(self)
    return self

  def __exit__(self, *exc):
    gc.callbacks.remove(self)


def pipeline_trace(tx, params, grads, steps: int = 60, top: int = 6):
  """What bounds a training loop of ``steps`` back-to-back steps. Host: the time
  each step's call takes to return (median, max) and Python's garbage
  collections during the loop, with the collector on and off. Device
  (``jax.profiler`` trace, Python tracer off): busy time (union of kernel
  intervals) against the loop's span, and the largest gaps."""
  from benchmarks.shampoo_step import step_program
  step = step_program(tx)
  carry = [jax.tree.map(jnp.copy, params), tx.init(params)]

  def loop(n):
    calls = []
    start = time.perf_counter()
    for _ in range(n):
      t = time.perf_counter()
      carry[:] = step(carry[0], carry[1], grads)
      calls.append(time.perf_counter() - t)
    jax.block_until_ready(carry)
    return (time.perf_counter() - start) / n, sorted(calls)

  loop(3)
  report = {"steps": steps, **identity_call_times(carry, grads, steps)}
  for collector in ("gc on", "gc off"):
    gc.collect()
    if collector == "gc off":
      gc.disable()
    try:
      with _GcTimer() as timer:
        per_step, calls = loop(steps)
    finally:
      gc.enable()
    report[collector] = {
        "ms_per_step": per_step * 1e3,
        "call_ms_median": calls[len(calls) // 2] * 1e3,
        "call_ms_max": calls[-1] * 1e3,
        "collections": timer.counts,
        "collection_ms_per_step": timer.seconds / steps * 1e3
    }
  report["traced"] = device_trace(loop, steps, top)
  return report


def identity_call_times(carry, grads, steps: int):
  """The host cost of passing the state alone: an identity step (donated) on
  the same params and state, with the state as its tree and as a list."""
  identity = jax.jit(lambda p, s, g: (p, s), donate_argnums=(0, 1))
  report = {}
  for label, state_of in (("identity step", lambda s: s),
                          ("identity step, leaves as a list", jax.tree.leaves)):
    moved = [
        jax.tree.map(jnp.copy, carry[0]),
        jax.tree.map(jnp.copy, state_of(carry[1]))
    ]
    calls = []
    for _ in range(steps):
      t = time.perf_counter()
      moved[:] = identity(moved[0], moved[1], grads)
      calls.append(time.perf_counter() - t)
    jax.block_until_ready(moved)
    report[label] = {"call_ms_median": sorted(calls)[steps // 2] * 1e3}
  return report


def device_trace(loop, steps: int, top: int):
  """``loop(steps)`` under ``jax.profiler``: per step, the device's span and
  busy time, the largest gaps between kernels, and the host's time by event."""
  from jax.profiler import ProfileData, ProfileOptions
  options = ProfileOptions()
  options.python_tracer_level = 0
  directory = tempfile.mkdtemp()
  with jax.profiler.trace(directory, profiler_options=options):
    traced, _ = loop(steps)
  intervals, host = [], collections.Counter()
  for plane in ProfileData.from_file(
      glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)[0]).planes:
    for line in plane.lines:
      if plane.name.startswith("/device:GPU") and line.name.startswith(
          "Stream"):
        intervals += [(e.start_ns, e.start_ns + e.duration_ns, e.name)
                      for e in line.events]
      elif plane.name.startswith("/host"):
        # host events by name with the per-kernel suffixes cut off
        for e in line.events:
          host[re.sub(r"[:#(].*", "", e.name)[:60]] += e.duration_ns / steps
  kernels = {re.sub(r"[:#(].*", "", name)[:60] for _, _, name in intervals}
  host["(launching kernels, all)"] = sum(
      ns for name, ns in host.items() if name in kernels)
  host = collections.Counter({
      k: v for k, v in host.items() if k not in kernels
  })
  intervals = sorted(intervals) or [(0, 0, "-")]  # no GPU in the trace
  busy, gaps, end = 0, [], intervals[0][0]
  for lo, hi, name in intervals:
    if lo > end:
      gaps.append((lo - end, name))
    busy += max(0, hi - max(lo, end))
    end = max(end, hi)
  gaps.sort(reverse=True)
  return {
      "ms_per_step":
          traced * 1e3,
      "device_span_ms_per_step": (end - intervals[0][0]) / steps / 1e6,
      "device_busy_ms_per_step":
          busy / steps / 1e6,
      "largest_gaps_us":
          [[round(g / 1e3, 1), name[:40]] for g, name in gaps[:top]],
      "host_ms_per_step":
          [[name, round(ns / 1e6, 3)] for name, ns in host.most_common(3 * top)]
  }
