"""Which source lines a compiled program's kernels come from.

The HLO text of a compiled executable carries the Python call stack of each
instruction: tables of file names, function names, file locations and stack
frames, and a ``stack_frame_id`` in each instruction's metadata. A profiler
trace names each kernel launch after its instruction (``.`` as ``_``), also
when XLA:GPU compiled one kernel for several identical fusions. :func:`by_source`
sums the kernels' device time per source line.

The profile and the text must come from one executable: a second compile of
the same function may autotune differently and number its fusions differently.
"""

from __future__ import annotations

import collections
import re
from typing import Dict, Mapping, NamedTuple, Tuple

from benchmarks import common

TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?stack_frame_id=(\d+)")
# a kernel whose name is no instruction's: cuBLAS, cuSOLVER, memcpy, memset
UNNAMED = "(a kernel no instruction names)"


class Frame(NamedTuple):
  file: str  # base name
  function: str
  line: int


def _tables(hlo_text: str) -> Dict[str, Dict[int, str]]:
  """Each stack table of the text: ``{table: {id: the rest of its line}}``."""
  tables, current = {name: {} for name in TABLES}, None
  for line in hlo_text.splitlines():
    stripped = line.strip()
    if stripped in TABLES:
      current = tables[stripped]
    elif not stripped:
      current = None
    elif current is not None:
      key, _, rest = stripped.partition(" ")
      current[int(key)] = rest
  return tables


def call_stacks(hlo_text: str) -> Dict[int, Tuple[Frame, ...]]:
  """Every stack frame id's call stack, innermost frame first."""
  tables = _tables(hlo_text)
  files = {
      k: v.strip('"').rsplit("/", 1)[-1] for k, v in tables["FileNames"].items()
  }
  functions = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
  fields = lambda text: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", text)}
  locations = {k: fields(v) for k, v in tables["FileLocations"].items()}
  frames = {k: fields(v) for k, v in tables["StackFrames"].items()}

  def stack(frame_id):
    out = []
    # a frame's parent_frame_id counts from 1 with 1 for no parent: frame 1's
    # parent is 1, and a frame called from frame k has k + 1
    while frame_id in frames and len(out) < len(frames):
      location = locations[frames[frame_id]["file_location_id"]]
      out.append(
          Frame(files[location["file_name_id"]],
                functions[location["function_name_id"]], location["line"]))
      frame_id = frames[frame_id]["parent_frame_id"] - 1
    return tuple(out)

  return {frame_id: stack(frame_id) for frame_id in frames}


def instruction_frames(hlo_text: str) -> Dict[str, int]:
  """``{kernel name: stack frame id}`` of every instruction with a stack: the
  instruction's name with ``.`` as ``_``, as a trace names its kernel."""
  out = {}
  for line in hlo_text.splitlines():
    match = INSTRUCTION.match(line)
    if match:
      out[match.group(1).replace(".", "_")] = int(match.group(2))
  return out


def source_of(stack: Tuple[Frame, ...], skip_files, depth: int) -> str:
  """The innermost ``depth`` frames of ``stack`` outside ``skip_files``, as
  ``function (file:line) < caller (file:line)``."""
  kept = [f for f in stack if f.file not in skip_files][:depth]
  if not kept:
    return "(no source frame)"
  return " < ".join(f"{f.function} ({f.file}:{f.line})" for f in kept)


def by_source(per_kernel: Mapping[str, float], hlo_text: str, skip_files=(),
              depth: int = 2) -> collections.Counter:
  """Device time per source line: each kernel's time (``per_kernel``, as
  :func:`benchmarks.profile.device_times` gives it) counted at the innermost
  ``depth`` frames of its instruction's call stack outside ``skip_files`` (base
  names: the calling script's own files)."""
  stacks, frames = call_stacks(hlo_text), instruction_frames(hlo_text)
  out = collections.Counter()
  for kernel, time in per_kernel.items():
    frame_id = frames.get(kernel)
    key = UNNAMED if frame_id is None else source_of(
        stacks.get(frame_id, ()), skip_files, depth)
    out[key] += time
  return out


def table(title: str, per_kernel: Mapping[str, float], hlo_text: str,
          skip_files, depth: int, top: int):
  """``(printed table, {source: ms})`` of :func:`by_source` (times in ns), its
  ``top`` lines in the table."""
  sources = by_source(per_kernel, hlo_text, skip_files, depth)
  total = sum(sources.values())
  rows = [[source[:150], ns / 1e6, 100 * ns / max(total, 1)]
          for source, ns in sources.most_common(top)]
  printed = common.print_table(f"{title}: device time by source line",
                               ["source", "ms", "%"], rows)
  return printed, {source: ns / 1e6 for source, ns in sources.most_common()}
