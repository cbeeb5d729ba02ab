"""Unbalanced entropic OT (Chizat et al., "Scaling algorithms for unbalanced optimal transport
problems", Math. Comp. 2018; Frogner et al. 2015): marginals enforced softly by KL penalties."""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
from torch import Tensor

from . import backend as B
from .kernel import scan
from .logdomain import assemble_log_plan, log_pass
from .problem import Problem, SinkhornResult, prepare
from .rows import quiet

log = logging.getLogger(__name__)


@torch.no_grad()
def sinkhorn_unbalanced(
    scores: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    eps: float = 0.05,
    reg_m: float | Sequence[float] = 1.0,
    reg_type: str = "kl",
    n_iters: int | None = None,
    tol: float = 1e-6,
    max_iters: int = 1000,
    distributed: bool = False,
    return_plan: bool = True,
) -> SinkhornResult:
    """Unbalanced entropic OT between the rows and columns of ``scores``.

    Solves POT's ``ot.sinkhorn_unbalanced(a, b, -scores, eps, reg_m, reg_type=reg_type)``:
    ``min <P, -scores> + eps KL(P | c) + reg_m1 KL(P 1 | a) + reg_m2 KL(P^T 1 | b)`` with reference
    ``c = a b^T`` (``reg_type='kl'``, POT's default since 0.9.5) or ``c = 1`` (``'entropy'``).
    ``reg_m`` is a float or a pair (rows, columns); ``inf`` enforces that marginal exactly. Useful
    when the cluster-size prior ``b`` is only a hint. Runs in the log domain (row chunks, no N x K
    temporaries). Stops when the potentials change by at most ``tol`` (max abs, in nats);
    ``marginal_err`` reports ``||P^T 1 - b||_2``, not zero by design.
    """
    if reg_type not in ("kl", "entropy"):
        raise ValueError("reg_type must be 'kl' or 'entropy'")
    r1, r2 = (reg_m, reg_m) if not isinstance(reg_m, Sequence) else (tuple(reg_m) * 2)[:2]
    if min(r1, r2) <= 0:
        raise ValueError("reg_m must be positive (use inf for an exact marginal)")
    p = prepare(scores, a, b, eps, distributed, rescale_b=False)
    fi = tuple(1.0 if math.isinf(r) else r / (r + p.eps) for r in (r1, r2))
    return quiet(_unbalanced, p, fi, reg_type, n_iters, tol, max_iters, return_plan)


def _unbalanced(p: Problem, fi, reg_type: str, n_iters, tol: float, max_iters: int,
                return_plan: bool) -> SinkhornResult:
    """The log-domain loop (POT's order: rows, then columns)."""
    xp, bb = B.xp_for(p.device), B.backend(p.b)
    loga, logb = B.backend(B.log_vec(p.a)), xp.log(bb)
    ra, rb = (loga, logb) if reg_type == "kl" else (loga * 0.0, logb * 0.0)
    scan(p)  # validates the scores (NaN, rows or columns that are -inf everywhere)

    budget = n_iters if n_iters is not None else max_iters
    f = B.full64(p.n, 0.0, p.device)
    g = rb + 0.0  # POT starts from u = v = 1 on the kernel exp(S/eps) * c
    it, change, err = 0, math.inf, math.inf
    converged = False
    while it < budget:
        lcol, _, df = log_pass(p, g, f, loga, fi[0], ra, track=True)
        lse_col = lcol - g  # LSE_i(S/eps + f)
        g_new = fi[1] * (logb - lse_col) + (1.0 - fi[1]) * rb
        it += 1
        change = max(float(abs(g_new - g).max()), df)
        g = g_new
        if n_iters is None and change <= tol:
            converged = True
            break
    # (f, g) is POT's last (u, v) pair: f from the previous g, g from this f
    plan = B.empty_plan(p.n, p.k, p.dt, p.device) if return_plan else None
    if plan is not None:
        assemble_log_plan(p, f, g, plan)
    if it:
        err = B.l2(xp.exp(lse_col + g) - bb)
    if n_iters is not None:
        converged = change <= tol
    elif not converged:
        log.warning("Unbalanced Sinkhorn did not converge: potentials still move by %.3g after %d "
                    "iterations", change, it)
    return SinkhornResult(plan, it, err, converged, f, B.as_tensor(g), True)
