"""The error measures of optax_shampoo4.diagnostics against [S4] Table 1 and
[CQ]'s error feedback."""

import numpy as np
import pytest

from optax_shampoo4 import diagnostics
from test_preconditioners import gram_stream


@pytest.fixture(scope="module")
def table1_matrix():
  return diagnostics.synthetic_statistic(order=1200, small_eigenvalue=1e-3,
                                         seed=0)


def test_table1_eigenvector_quantization_with_bjorck(table1_matrix):
  u, lam = table1_matrix
  nre, angle = diagnostics.inverse_root_error(u, lam, storage="eigenvectors",
                                              bjorck_steps=1)
  assert abs(nre - 0.0669) <= 0.15 * 0.0669, nre  # [S4] Table 1: 0.0669 / 3.82°
  assert abs(angle - 3.82) <= 0.15 * 3.82, angle
  nre_dt, _ = diagnostics.inverse_root_error(u, lam, storage="eigenvectors",
                                             codebook="dynamic_tree")
  assert abs(nre_dt - 0.0878) <= 0.15 * 0.0878, nre_dt
  nre_plain, _ = diagnostics.inverse_root_error(u, lam, storage="eigenvectors",
                                                bjorck_steps=0)
  assert nre_plain > 1.8 * nre
  nre_naive, _ = diagnostics.inverse_root_error(u, lam, storage="matrix")
  assert nre_naive > 5 * nre


def test_error_feedback_reduces_the_statistic_error():
  grams = gram_stream()
  with_feedback = diagnostics.error_feedback_errors(grams, error_feedback=True)
  without = diagnostics.error_feedback_errors(grams, error_feedback=False)
  assert np.mean(with_feedback[10:]) < 0.6 * np.mean(without[10:]), (
      np.mean(with_feedback), np.mean(without))
