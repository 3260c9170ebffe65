"""A float64 numpy SOAP (docs/algorithms.md §7), written independently of the package for the tests."""

import numpy as np

SHIFT = 1e-5  # the orthonormalization's shift (linalg.subspace_iteration_step)


def refresh_basis(rows, eigenvalues, gram, beta):
  """One statistics step: EMA of the rebuilt statistic, a shifted warm-started QR step, Rayleigh quotients,
  sorted by decreasing eigenvalue."""
  statistic = beta * (rows.T * eigenvalues) @ rows + (1.0 - beta) * gram
  columns = rows.T
  product = statistic @ columns
  largest = np.max(np.linalg.norm(product, axis=0))
  q, r = np.linalg.qr(product + SHIFT * largest * columns)
  q = q * np.sign(np.diag(r))
  values = np.einsum("ij,ij->j", q, statistic @ q)
  order = np.argsort(-values)
  return q.T[order], np.maximum(values[order], 0.0)


def soap_updates(gradients, *, b1, b2, eps, beta, every, initial_eigenvalue=1e-6):
  """The updates of SOAP on one matrix for a list of gradients ``(m, n)``."""
  m, n = gradients[0].shape
  left = [np.eye(m), np.full(m, initial_eigenvalue)]
  right = [np.eye(n), np.full(n, initial_eigenvalue)]
  first, second = np.zeros((m, n)), np.zeros((m, n))
  out = []
  for t, g in enumerate(gradients, start=1):
    g = np.asarray(g, np.float64)
    first = b1 * first + (1 - b1) * g
    if t % every == 0:
      left = list(refresh_basis(*left, g @ g.T, beta))
      right = list(refresh_basis(*right, g.T @ g, beta))
    rotated = left[0] @ g @ right[0].T
    second = b2 * second + (1 - b2) * rotated ** 2
    normalized = (left[0] @ first @ right[0].T / (1 - b1 ** t)) / (np.sqrt(second / (1 - b2 ** t)) + eps)
    out.append(left[0].T @ normalized @ right[0])
  return out


def adam_updates(gradients, *, b1, b2, eps):
  """Adam's updates (the unpreconditioned tensors' path)."""
  first = second = 0.0
  out = []
  for t, g in enumerate(gradients, start=1):
    g = np.asarray(g, np.float64)
    first = b1 * first + (1 - b1) * g
    second = b2 * second + (1 - b2) * g * g
    out.append((first / (1 - b1 ** t)) / (np.sqrt(second / (1 - b2 ** t)) + eps))
  return out
