"""float64 numpy versions of the algorithms (docs/algorithms.md), written
independently of the package."""

import numpy as np

SHIFT = 1e-5  # the orthonormalization's shift (linalg.subspace_iteration_step)


def refresh_basis(rows, eigenvalues, gram, beta):
  """One statistics step: EMA of the rebuilt statistic, a shifted warm-started
  QR step, Rayleigh quotients, sorted by decreasing eigenvalue."""
  statistic = beta * (rows.T * eigenvalues) @ rows + (1.0 - beta) * gram
  columns = rows.T
  product = statistic @ columns
  largest = np.max(np.linalg.norm(product, axis=0))
  q, r = np.linalg.qr(product + SHIFT * largest * columns)
  q = q * np.sign(np.diag(r))
  values = np.einsum("ij,ij->j", q, statistic @ q)
  order = np.argsort(-values)
  return q.T[order], np.maximum(values[order], 0.0)


def tf32(a):
  """``a`` rounded to TF32 (fp32 with 10 explicit significand bits, to
  nearest), as a GPU's TF32 tensor cores round their operands."""
  bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
  bits = (bits + 0x1000) & ~np.uint64(0x1FFF)
  return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def bjorck(rows, steps, operands=lambda a: a):
  """``steps`` Björck steps ``V ← 1.5 V − 0.5 V Vᵀ V`` in float64, the
  products' operands passed through ``operands`` (e.g. :func:`tf32`)."""
  mm = lambda a, b: operands(a) @ operands(b)
  for _ in range(steps):
    rows = 1.5 * rows - 0.5 * mm(mm(rows, rows.T), rows)
  return rows


def rotated_adam_step(left, right, first, second, g, t, *, b1, b2, eps):
  """SOAP's step ``t`` in the bases ``left``, ``right`` (rows): ``(update,
  first, second)`` with ``first`` in the original basis and ``second`` in the
  rotated one."""
  first = b1 * first + (1 - b1) * g
  second = b2 * second + (1 - b2) * (left @ g @ right.T)**2
  normalized = (left @ first @ right.T / (1 - b1**t)) / (
      np.sqrt(second / (1 - b2**t)) + eps)
  return left.T @ normalized @ right, first, second


def soap_updates(gradients, *, b1, b2, eps, beta, every, project=True,
                 initial_eigenvalue=1e-6):
  """The updates of SOAP on one matrix for a list of gradients ``(m, n)``;
  ``project``: on a refresh the second moment moves to the new basis as
  ``(P_L∘P_L) V (P_R∘P_R)ᵀ``, ``P = U_new U_oldᵀ``."""
  m, n = gradients[0].shape
  left = [np.eye(m), np.full(m, initial_eigenvalue)]
  right = [np.eye(n), np.full(n, initial_eigenvalue)]
  first, second = np.zeros((m, n)), np.zeros((m, n))
  out = []
  for t, g in enumerate(gradients, start=1):
    g = np.asarray(g, np.float64)
    if t % every == 0:
      old_left, old_right = left[0], right[0]
      left = list(refresh_basis(*left, g @ g.T, beta))
      right = list(refresh_basis(*right, g.T @ g, beta))
      if project:
        second = ((left[0] @ old_left.T)**2) @ second @ (
            (right[0] @ old_right.T)**2).T
    update, first, second = rotated_adam_step(left[0], right[0], first, second,
                                              g, t, b1=b1, b2=b2, eps=eps)
    out.append(update)
  return out


def adam_updates(gradients, *, b1, b2, eps):
  """Adam's updates (the unpreconditioned tensors' path)."""
  first = second = 0.0
  out = []
  for t, g in enumerate(gradients, start=1):
    g = np.asarray(g, np.float64)
    first = b1 * first + (1 - b1) * g
    second = b2 * second + (1 - b2) * g * g
    out.append((first / (1 - b1**t)) / (np.sqrt(second / (1 - b2**t)) + eps))
  return out


def reference_shampoo(gradient_stream, *, max_order, statistics_every,
                      inverse_root_every, beta, epsilon, cholesky_ridge=False):
  """Classic Shampoo in numpy float64, written from docs/algorithms.md
  independently of the library.

  ``cholesky_ridge``: [CQ] factors ``L + ε·max(diag L)·I`` and keeps ``C Cᵀ``,
  so the ridge stays in ``L``.
  """

  def fold(x):
    kept = [d for d in x.shape if d != 1]
    if len(kept) < 2 or 0 in kept:
      return None
    return x.reshape(int(np.prod(kept[:-1])), kept[-1])

  def chunks(d):
    return [(s, min(max_order, d - s)) for s in range(0, d, max_order)]

  def inverse_root(a):
    w, v = np.linalg.eigh(a)
    return (v * (np.maximum(w, 0) + epsilon * w.max())**-0.25) @ v.T

  stats, roots, outputs = {}, {}, []
  for step, grads in enumerate(gradient_stream, start=1):
    out = []
    for leaf, g in enumerate(grads):
      g = np.asarray(g, np.float64)
      m = fold(g)
      if m is None:
        out.append(g)
        continue
      pre = np.zeros_like(m)
      for r0, rn in chunks(m.shape[0]):
        for c0, cn in chunks(m.shape[1]):
          key = (leaf, r0, c0)
          block = m[r0:r0 + rn, c0:c0 + cn]
          if key not in stats:
            stats[key] = [epsilon * np.eye(rn), epsilon * np.eye(cn)]
            roots[key] = [np.eye(rn), np.eye(cn)]
          if step % statistics_every == 0:
            stats[key][0] = beta * stats[key][0] + (1 - beta) * block @ block.T
            stats[key][1] = beta * stats[key][1] + (1 - beta) * block.T @ block
            if cholesky_ridge:
              stats[key] = [
                  s + epsilon * np.max(np.diag(s)) * np.eye(len(s))
                  for s in stats[key]
              ]
          if step % inverse_root_every == 0:
            roots[key] = [
                inverse_root(stats[key][0]),
                inverse_root(stats[key][1])
            ]
          pre[r0:r0 + rn, c0:c0 + cn] = roots[key][0] @ block @ roots[key][1]
      pre *= np.linalg.norm(m) / (np.linalg.norm(pre) + 1e-12)
      out.append(pre.reshape(g.shape))
    outputs.append(out)
  return outputs


def eigen_shampoo_updates(gradients, *, statistics_every, inverse_root_every,
                          beta, epsilon):
  """Shampoo with the eigenvector storage at fp32 on one matrix: the statistic
  is rebuilt from the basis and its Rayleigh quotients before each EMA
  (:func:`refresh_basis`), and the root is ``Vᵀ diag((λ + ε·λmax)^(-1/4)) V``.
  Returns the grafted updates and the final ``(rows, eigenvalues)``."""
  m, n = gradients[0].shape
  sides = [[np.eye(m), np.full(m, epsilon)], [np.eye(n), np.full(n, epsilon)]]
  roots = [np.eye(m), np.eye(n)]
  out = []
  for t, g in enumerate(gradients, start=1):
    g = np.asarray(g, np.float64)
    if t % statistics_every == 0:
      sides = [
          list(refresh_basis(*sides[0], g @ g.T, beta)),
          list(refresh_basis(*sides[1], g.T @ g, beta))
      ]
    if t % inverse_root_every == 0:
      roots = [(rows.T * (values + epsilon * values.max())**-0.25) @ rows
               for rows, values in sides]
    pre = roots[0] @ g @ roots[1]
    out.append(pre * np.linalg.norm(g) / np.linalg.norm(pre))
  return out, sides
