"""The README's main command, end to end with tiny step counts."""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import compare  # noqa: E402


def test_compare_runs_and_writes_outputs(tmp_path):
  out = tmp_path / "run"
  results = compare.main(["--steps", "12", "--optimizers", "adamw,shampoo4,all_4bit", "--out", str(out),
                          "--checkpoint-dir", str(tmp_path / "ckpt")])
  assert set(results) == {"adamw", "shampoo4", "all_4bit"}
  data = json.loads((out / "results.json").read_text())
  assert data["results"]["shampoo4"]["state_bytes"] > data["results"]["all_4bit"]["state_bytes"]
  for name in ("loss_curves.png", "state_memory.png"):
    assert (out / name).stat().st_size > 1000
  resumed = compare.main(["--steps", "3", "--optimizers", "shampoo4", "--out", str(out),
                          "--checkpoint-dir", str(tmp_path / "ckpt"), "--resume"])
  assert resumed["shampoo4"]["steps_done"] == 15


def test_lm_runs_on_the_standard_library_sources(tmp_path):
  import lm
  train, held_out = lm.load_corpus(200_000)
  assert len(train) == 180_000 and len(held_out) == 20_000 and b"def " in train.tobytes()
  results = lm.main(["--steps", "4", "--optimizers", "adamw,shampoo4", "--max-bytes", "200000",
                     "--out", str(tmp_path)])
  assert set(results) == {"adamw", "shampoo4"}
  assert all(np.isfinite(r["held_out_bits_per_byte"]) and r["held_out_bits_per_byte"] < 8.5
             for r in results.values())
  assert (tmp_path / "results.json").exists() and (tmp_path / "loss_curves.png").exists()
