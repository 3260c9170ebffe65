"""CIFAR-10/100 in the python-pickle format for ``examples/cifar.py``: reading,
a synthetic stand-in of the same format, and the on-device augmentation."""

from __future__ import annotations

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np

MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


def _unpickle(path):
  with open(path, "rb") as f:
    # the files were written by Python 2: byte-string keys
    batch = pickle.load(f, encoding="bytes")
  return {
      (k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()
  }


def _images(batch):
  data = np.asarray(batch["data"], np.uint8)
  if data.ndim != 2 or data.shape[1] != 3072:
    raise ValueError(
        f"CIFAR 'data' must be N×3072 uint8 (channel-major 32×32×3), got shape "
        f"{data.shape}")
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def load_cifar(data_dir: str):
  """Reads CIFAR-10 or CIFAR-100 in the python-pickle format.

  Returns ``((train_images, train_labels), (test_images, test_labels),
  num_classes)`` with uint8 NHWC images and int32 labels.
  """
  data_dir = os.path.expanduser(data_dir)
  for sub in ("cifar-10-batches-py", "cifar-100-python"):
    if os.path.isdir(os.path.join(data_dir, sub)):
      data_dir = os.path.join(data_dir, sub)
  cifar10 = [os.path.join(data_dir, f"data_batch_{i}") for i in range(1, 6)]
  if all(
      os.path.exists(p)
      for p in cifar10 + [os.path.join(data_dir, "test_batch")]):
    parts = [_unpickle(p) for p in cifar10]
    test = _unpickle(os.path.join(data_dir, "test_batch"))
    train_x = np.concatenate([_images(p) for p in parts])
    train_y = np.concatenate([np.asarray(p["labels"]) for p in parts])
    test_x, test_y, label_key, classes = _images(test), np.asarray(
        test["labels"]), "labels", 10
  elif all(
      os.path.exists(os.path.join(data_dir, n)) for n in ("train", "test")):
    train, test = _unpickle(os.path.join(data_dir, "train")), _unpickle(
        os.path.join(data_dir, "test"))
    train_x, train_y = _images(train), np.asarray(train["fine_labels"])
    test_x, test_y, label_key, classes = _images(test), np.asarray(
        test["fine_labels"]), "fine_labels", 100
  else:
    raise FileNotFoundError(
        f"no CIFAR data in {data_dir!r}: expected data_batch_1..5 + test_batch "
        "(CIFAR-10) or train + test "
        "(CIFAR-100) in the python-pickle format, or a directory containing "
        "cifar-10-batches-py / "
        "cifar-100-python")
  for name, labels, images in (("train", train_y, train_x), ("test", test_y,
                                                             test_x)):
    if len(labels) != len(
        images) or labels.min() < 0 or labels.max() >= classes:
      raise ValueError(
          f"{name} '{label_key}' must give one label in [0, {classes}) per "
          "image")
  return (train_x, train_y.astype(np.int32)), (test_x,
                                               test_y.astype(np.int32)), classes


def write_cifar_like(directory: str, n_train: int, n_test: int,
                     seed: int = 0) -> str:
  """Writes a CIFAR-10-format dataset (5 train batches + test batch) of
  learnable synthetic images.

  Each class is a fixed random low-frequency colour pattern; an image is its
  class pattern, randomly shifted, plus noise. Used by the tests and for timing
  runs on machines without CIFAR.
  """
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (10, 3, 8, 8))
  templates = coarse.repeat(4, axis=2).repeat(4, axis=3)  # 10 × 3 × 32 × 32

  def make(n):
    labels = rng.integers(0, 10, n)
    shifts = rng.integers(-3, 4, (n, 2))
    images = np.stack([
        np.roll(templates[c], tuple(s), axis=(1, 2))
        for c, s in zip(labels, shifts)
    ])
    images = np.clip(images + rng.normal(0, 40, images.shape), 0,
                     255).astype(np.uint8)
    return images.reshape(n, 3072), [int(c) for c in labels]

  os.makedirs(directory, exist_ok=True)
  data, labels = make(n_train)
  for i, (d, l) in enumerate(
      zip(np.array_split(data, 5), np.array_split(np.asarray(labels), 5)),
      start=1):
    with open(os.path.join(directory, f"data_batch_{i}"), "wb") as f:
      pickle.dump(
          {
              b"data": d,
              b"labels": [int(x) for x in l],
              b"batch_label": f"batch {i}".encode()
          }, f)
  data, labels = make(n_test)
  with open(os.path.join(directory, "test_batch"), "wb") as f:
    pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"test"}, f)
  return directory


def augment(images, key):
  """Random 32×32 crops of the 4-pixel reflection-padded images and random
  horizontal flips (on device)."""
  crop_key, flip_key = jax.random.split(key)
  padded = jnp.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
  offsets = jax.random.randint(crop_key, (images.shape[0], 2), 0, 9)
  crop = jax.vmap(lambda image, o: jax.lax.dynamic_slice(
      image, (o[0], o[1], 0), (32, 32, image.shape[-1])))
  images = crop(padded, offsets)
  flip = jax.random.bernoulli(flip_key, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1], images)


def normalize(images):
  return (images.astype(jnp.float32) / 255.0 - MEAN) / STD
