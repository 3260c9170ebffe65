"""Where the wall-clock of a jitted step goes, read from a JAX profiler trace
(GPU).

:func:`kernel_events` traces a few calls of a step and returns its GPU kernels.
:func:`breakdown` splits a call's wall-clock into device-busy time per part of
the program and idle time (the GPU waiting on the host), and lists the longest
idle gaps with the kernels around them. A kernel's part comes from the
``op_name`` metadata of its HLO instruction: the library's named scopes
(``shampoo_precondition``, ``soap_refresh``, ``adam_4bit``, ...), the model's
forward and backward pass (``jvp``/``transpose``), or "other" (Optax's own
transformations, the loss, the update of the params).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
from typing import Callable, Dict, List, NamedTuple, Optional

import jax

SCOPES = ("shampoo_update_preconditioners", "shampoo_blocks",
          "shampoo_precondition", "shampoo_graft", "soap_refresh",
          "soap_rotated_adam", "adam_4bit")
INSTRUCTION = re.compile(
    r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name="([^"]*)"')


class Kernel(NamedTuple):
  hlo_op: str
  name: str
  start_ns: float
  duration_ns: float


def kernel_events(run: Callable[[], object], calls: int = 5,
                  raw_path: Optional[str] = None,
                  wait_each: bool = True) -> List[Kernel]:
  """The GPU kernels of ``calls`` calls of ``run`` (each waited for, unless not
  ``wait_each``: then only the last), after one warm-up call. ``raw_path``: also
  write every GPU event and every host event of 50 µs or more there (gzipped
  JSON), to read offline."""
  from jax.profiler import ProfileData
  jax.block_until_ready(run())
  directory = tempfile.mkdtemp()
  with jax.profiler.trace(directory):
    for _ in range(calls):
      out = run()
      if wait_each:
        jax.block_until_ready(out)
    jax.block_until_ready(out)
  path = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)[0]
  kernels, raw = [], []
  for plane in ProfileData.from_file(path).planes:
    on_gpu = plane.name.startswith("/device:GPU")
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if on_gpu or event.duration_ns >= 50_000:
          raw.append([
              plane.name, line.name, event.name,
              str(stats.get("hlo_op", "")), event.start_ns, event.duration_ns
          ])
        # kernels sit on the "Stream" lines; "XLA Ops"/"XLA Modules" summarize
        # the same time
        if on_gpu and line.name.startswith("Stream"):
          kernels.append(
              Kernel(
                  str(stats.get("hlo_op", "")), event.name, event.start_ns,
                  event.duration_ns))
  if raw_path:
    with gzip.open(raw_path, "wt") as f:
      json.dump(raw, f)
  return sorted(kernels, key=lambda k: k.start_ns)


def op_names(hlo_text: str) -> Dict[str, str]:
  """HLO instruction name → its ``op_name`` metadata (the JAX name stack), from
  a compiled program's text."""
  return {
      m.group(1): m.group(2)
      for m in map(INSTRUCTION.match, hlo_text.splitlines())
      if m
  }


def part_of(op_name: str) -> str:
  for scope in SCOPES:
    if scope in op_name:
      return scope
  if "transpose(" in op_name:
    return "model backward"
  if "jvp(" in op_name:
    return "model forward"
  return "other"


def breakdown(kernels: List[Kernel], hlo_text: str, calls: int,
              top_gaps: int = 8) -> dict:
  """Per call: wall span of the kernels, device-busy ms per part, idle ms, and
  the longest idle gaps."""
  names = op_names(hlo_text)
  # inside a command buffer a kernel's hlo_op is the buffer's; its name is then
  # its fusion's, "." → "_"
  names.update({name.replace(".", "_"): op for name, op in list(names.items())})
  buffered = lambda k: k.hlo_op.startswith("command_buffer")
  instruction = lambda k: (k.hlo_op if k.hlo_op in names and not buffered(k)
                           else k.name)
  parts = collections.Counter()
  for k in kernels:
    parts[part_of(names.get(instruction(k), ""))] += k.duration_ns
  busy, gaps, end, previous = 0.0, [], None, None
  for k in kernels:  # merged busy intervals over all streams
    k_end = k.start_ns + k.duration_ns
    if end is not None and k.start_ns > end:
      gaps.append((k.start_ns - end, previous, k))
    if end is None or k.start_ns > end:
      busy += k.duration_ns
    elif k_end > end:
      busy += k_end - end
    if end is None or k_end > end:
      end, previous = k_end, k
  span = (end - kernels[0].start_ns) if kernels else 0.0
  label = lambda k: (f"{k.hlo_op}/{k.name[:40]} "
                     f"[{part_of(names.get(instruction(k), ''))}]")
  gaps.sort(key=lambda g: -g[0])
  return {
      "span_ms":
          span / calls / 1e6,
      "busy_ms":
          busy / calls / 1e6,
      "idle_ms": (span - busy) / calls / 1e6,
      "kernels_per_call":
          len(kernels) / calls,
      "device_ms_by_part": {
          p: ns / calls / 1e6 for p, ns in parts.most_common()
      },
      "longest_gaps": [[ns / 1e6, label(before),
                        label(after)] for ns, before, after in gaps[:top_gaps]]
  }
