"""The README's main command, end to end with tiny step counts."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import compare  # noqa: E402


def test_compare_runs_and_writes_outputs(tmp_path):
  out = tmp_path / "run"
  results = compare.main([
      "--steps", "12", "--optimizers", "adamw,shampoo4,all_4bit", "--out",
      str(out), "--checkpoint-dir",
      str(tmp_path / "ckpt")
  ])
  assert set(results) == {"adamw", "shampoo4", "all_4bit"}
  data = json.loads((out / "results.json").read_text())
  assert data["results"]["shampoo4"]["state_bytes"] > data["results"][
      "all_4bit"]["state_bytes"]
  assert all(0.0 < r["test_loss"] < 3.0 and 0.0 <= r["test_accuracy"] <= 1.0
             for r in data["results"].values())
  for name in ("loss_curves.png", "state_memory.png"):
    assert (out / name).stat().st_size > 1000
  resumed = compare.main([
      "--steps", "3", "--optimizers", "shampoo4", "--out",
      str(out), "--checkpoint-dir",
      str(tmp_path / "ckpt"), "--resume"
  ])
  assert resumed["shampoo4"]["steps_done"] == 15


def test_lm_runs_on_the_standard_library_sources(tmp_path):
  import lm
  train, held_out = lm.load_corpus(200_000)
  assert len(train) == 180_000 and len(
      held_out) == 20_000 and b"def " in train.tobytes()
  results = lm.main([
      "--steps", "4", "--optimizers", "adamw,shampoo4", "--max-bytes", "200000",
      "--out",
      str(tmp_path)
  ])
  assert set(results) == {"adamw", "shampoo4"}
  assert all(
      np.isfinite(r["held_out_bits_per_byte"]) and
      r["held_out_bits_per_byte"] < 8.5 for r in results.values())
  assert (tmp_path / "results.json").exists() and (tmp_path /
                                                   "loss_curves.png").exists()


def test_cifar_loader_reads_both_pickle_formats(tmp_path):
  import pickle

  import cifar_data
  cifar_data.write_cifar_like(
      str(tmp_path / "cifar-10-batches-py"), 50, 20, seed=3)
  (train_x, train_y), (test_x, test_y), classes = cifar_data.load_cifar(
      str(tmp_path))  # finds the subdirectory
  assert classes == 10 and train_x.shape == (50, 32, 32,
                                             3) and test_x.shape == (20, 32, 32,
                                                                     3)
  assert train_x.dtype == np.uint8 and train_y.dtype == np.int32 and set(
      train_y) <= set(range(10))
  # The channel-major rows of the file become NHWC pixels: pixel (row 1, col 2)
  # of channel c is at c·1024 + 34.
  with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
    raw = pickle.load(f, encoding="bytes")
  np.testing.assert_array_equal(train_x[0, 1, 2],
                                raw[b"data"][0, [34, 1024 + 34, 2048 + 34]])
  assert list(train_y[:10]) == raw[b"labels"][:10]

  hundred = tmp_path / "cifar-100-python"
  hundred.mkdir()
  rng = np.random.default_rng(0)
  for name, n in (("train", 30), ("test", 12)):
    with open(hundred / name, "wb") as f:
      pickle.dump(
          {
              b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
              b"fine_labels": list(rng.integers(0, 100, n)),
              b"coarse_labels": [0] * n
          }, f)
  (train_x, train_y), (test_x, _), classes = cifar_data.load_cifar(str(hundred))
  assert classes == 100 and train_x.shape == (30, 32, 32,
                                              3) and len(test_x) == 12

  with pytest.raises(FileNotFoundError, match="python-pickle"):
    cifar_data.load_cifar(str(tmp_path / "nowhere"))


def test_cifar_trains_resnet_and_vit_on_a_generated_file(tmp_path):
  import cifar
  data = str(tmp_path / "data")
  common = [
      "--data-dir", data, "--batch-size", "16", "--statistics-every", "2",
      "--inverse-root-every", "4", "--checkpoint-dir",
      str(tmp_path / "ckpt")
  ]
  resnet = cifar.main(common + [
      "--write-synthetic", "200", "--model", "resnet18", "--width", "8",
      "--steps", "8", "--optimizers", "sgdm,shampoo4", "--out",
      str(tmp_path / "resnet")
  ])
  # Until the first inverse roots (step 4) Shampoo's preconditioners are
  # identities and grafting returns the base update (up to fp32 rounding: the
  # grafting ratio is 1 to rounding, and XLA may fuse the two programs
  # differently on another CPU); the roots change step 4's update, which the
  # loss of step 5 (index 4) shows.
  np.testing.assert_allclose(resnet["sgdm"]["curve"][:4],
                             resnet["shampoo4"]["curve"][:4], rtol=1e-5)
  assert abs(resnet["sgdm"]["curve"][4] - resnet["shampoo4"]["curve"][4]) > 1e-3
  assert all(0.0 <= r["test_accuracy"] <= 1.0 and np.isfinite(r["train_loss"])
             for r in resnet.values())
  assert resnet["shampoo4"]["state_bytes"] > resnet["sgdm"]["state_bytes"]
  vit = cifar.main(common + [
      "--model", "vit_s", "--width", "32", "--depth", "2", "--steps", "5",
      "--optimizers", "adamw,all_4bit", "--out",
      str(tmp_path / "vit")
  ])
  assert vit["all_4bit"]["params"] == vit["adamw"]["params"] and np.isfinite(
      vit["all_4bit"]["train_loss"])
  data_json = json.loads((tmp_path / "vit" / "results.json").read_text())
  assert data_json["num_classes"] == 10 and data_json["args"]["base"] == "adamw"
  resumed = cifar.main(common + [
      "--model", "resnet18", "--width", "8", "--steps", "2", "--optimizers",
      "sgdm", "--out",
      str(tmp_path / "resnet"), "--resume"
  ])
  assert resumed["sgdm"]["steps_done"] == 10
