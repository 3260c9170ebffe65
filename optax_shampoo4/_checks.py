"""Argument checks shared by every config and factory: each raises naming the
argument."""

from __future__ import annotations

import numbers
from typing import Any, Iterable

import jax
import numpy as np


def check_int(name: str, value: Any, minimum: int = 1) -> None:
  """``value`` is a Python/numpy int (not a bool) of at least ``minimum``."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(
        f"{name} must be an int, got {type(value).__name__} {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_interval(name: str, value: Any) -> None:
  """A step interval: a positive int, or an array (traced under
  ``optax.inject_hyperparams``)."""
  if isinstance(value, (jax.Array, np.ndarray)):
    return
  check_int(name, value, 1)


def check_number(name: str, value: Any, low=None, high=None, low_open=False,
                 high_open=False) -> None:
  """A real hyperparameter in a range; arrays and tracers
  (``inject_hyperparams``) and schedules pass."""
  if isinstance(value, (jax.Array, np.ndarray)) or callable(value):
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(
        f"{name} must be a real number, got {type(value).__name__} {value!r}")
  if not np.isfinite(value):
    raise ValueError(f"{name} must be finite, got {value}")
  if low is not None and (value < low or (low_open and value == low)):
    raise ValueError(
        f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
  if high is not None and (value > high or (high_open and value == high)):
    raise ValueError(
        f"{name} must be {'<' if high_open else '<='} {high}, got {value}")


def check_adam_constants(b1: Any, b2: Any, eps: Any) -> None:
  """Adam's decays in ``[0, 1)`` and its ``eps`` ``>= 0``."""
  check_number("b1", b1, 0.0, 1.0, high_open=True)
  check_number("b2", b2, 0.0, 1.0, high_open=True)
  check_number("eps", eps, 0.0)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
  choices = tuple(choices)
  if isinstance(value, bool) or value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise TypeError(
        f"{name} must be a bool, got {type(value).__name__} {value!r}")


def check_type(name: str, value: Any, kind: type) -> None:
  if not isinstance(value, kind):
    raise TypeError(
        f"{name} must be a {kind.__name__}, got {type(value).__name__} "
        f"{value!r}"
    )
