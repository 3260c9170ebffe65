"""benchmarks/kernel_sources.py: kernels' device time by source line, read from
the call stacks in a compiled program's HLO text."""

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks import kernel_sources  # noqa: E402

HERE = os.path.basename(__file__)


def _line_of(marker: str) -> int:
  with open(__file__) as f:
    for number, line in enumerate(f, 1):
      if line.rstrip().endswith(f"# {marker}"):
        return number
  raise AssertionError(marker)


def _inner(x):
  return jnp.sin(x) * 2.0  # inner-line


def _outer(x):
  return _inner(x) + 1.0  # outer-line


def test_call_stacks_follow_an_instruction_to_its_callers():
  text = jax.jit(_outer).lower(jnp.ones(8)).compile().as_text()
  stacks = kernel_sources.call_stacks(text)
  sine = [
      line for line in text.splitlines()
      if " sine(" in line and "stack_frame_id=" in line
  ]
  assert sine, text
  frame_id = int(sine[0].split("stack_frame_id=")[1].split()[0].rstrip("}"))
  inner, outer = stacks[frame_id][:2]
  assert inner == (HERE, "_inner", _line_of("inner-line"))
  assert outer == (HERE, "_outer", _line_of("outer-line"))
  # the test function itself, and pytest's frames, lie further out
  assert any(
      f.function.startswith("test_call_stacks") for f in stacks[frame_id][2:])


# Two identical fusions (the second one's kernel is the first one's: a trace
# still names each launch after its own instruction), each called from its own
# line, and a product.
STACKS_TEXT = """HloModule m

FileNames
1 "/src/model.py"
2 "/src/lib.py"

FunctionNames
1 "step"
2 "scale"
3 "shift"

FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10}
2 {file_name_id=2 function_name_id=2 line=20 end_line=20}
3 {file_name_id=2 function_name_id=3 line=30 end_line=30}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=2}

ENTRY %main {
  %loop_add_fusion = f32[8]{0} fusion(%p), kind=kLoop, calls=%f, metadata={op_name="a" stack_frame_id=2}
  %loop_add_fusion.1 = f32[8]{0} fusion(%q), kind=kLoop, calls=%f, metadata={op_name="a" deduplicated_name="loop_add_fusion" stack_frame_id=3}
  ROOT %custom-call.3 = f32[8,8]{1,0} custom-call(%r), metadata={op_name="b" stack_frame_id=1}
}
"""


def test_each_kernel_counts_at_its_own_instructions_source_line():
  stacks = kernel_sources.call_stacks(STACKS_TEXT)
  assert stacks[2] == (("lib.py", "scale", 20), ("model.py", "step", 10))
  assert stacks[3] == (("lib.py", "shift", 30), ("model.py", "step", 10))
  assert kernel_sources.instruction_frames(STACKS_TEXT) == {
      "loop_add_fusion": 2,
      "loop_add_fusion_1": 3,
      "custom-call_3": 1
  }
  times = kernel_sources.by_source(
      {
          "loop_add_fusion": 10.0,
          "loop_add_fusion_1": 6.0,
          "nvjet_sm90_gemm": 4.0
      }, STACKS_TEXT, skip_files=("model.py",), depth=2)
  assert times == {
      "scale (lib.py:20)": 10.0,
      "shift (lib.py:30)": 6.0,
      kernel_sources.UNNAMED: 4.0
  }
  # without skipping, the caller's frame joins the key
  times = kernel_sources.by_source({"loop_add_fusion": 10.0}, STACKS_TEXT,
                                   depth=2)
  assert times == {"scale (lib.py:20) < step (model.py:10)": 10.0}
  # the table in ms, its rows the largest first
  _, payload = kernel_sources.table("step", {
      "loop_add_fusion": 2e6,
      "loop_add_fusion_1": 3e6
  }, STACKS_TEXT, ("model.py",), depth=1, top=1)
  assert list(payload.items()) == [("shift (lib.py:30)", 3.0),
                                   ("scale (lib.py:20)", 2.0)]
