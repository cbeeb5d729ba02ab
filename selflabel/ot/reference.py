"""A short, readable Sinkhorn: the specification the fast paths are tested against.

Plain log-domain iterations in float64 numpy, POT's order and stopping rule (Peyre & Cuturi 2019,
"Computational Optimal Transport", remark 4.23): start from a uniform ``u``; each iteration
normalises the columns, then the rows; stop when the plan, whose rows are then exact, has
``||P^T 1 - b||_2 <= tol``. No chunks, threads, kernel form, relaxation or fallbacks.
"""
from __future__ import annotations

import numpy as np
from scipy.special import logsumexp


def sinkhorn_reference(scores, a, b, eps: float, *, tol: float = 1e-9, n_iters: int | None = None,
                       max_iters: int = 100_000) -> tuple[np.ndarray, int, float]:
    """The plan ``exp(scores/eps + f + g)`` with rows ``a`` and columns ``b``; (plan, iterations, error)."""
    S = np.asarray(scores, dtype=np.float64) / eps
    log_a, log_b = np.log(np.asarray(a, dtype=np.float64)), np.log(np.asarray(b, dtype=np.float64))
    f = np.full(S.shape[0], -np.log(S.shape[0]))  # u = 1/N
    budget = n_iters if n_iters is not None else max_iters
    for it in range(1, budget + 1):
        g = log_b - logsumexp(S + f[:, None], axis=0)  # columns: P^T 1 = b
        f = log_a - logsumexp(S + g[None, :], axis=1)  # rows: P 1 = a
        err = float(np.linalg.norm(np.exp(logsumexp(S + f[:, None], axis=0) + g) - np.exp(log_b)))
        if n_iters is None and err <= tol:
            break
    return np.exp(S + f[:, None] + g[None, :]), it, err
