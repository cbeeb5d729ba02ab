"""Balanced spherical k-means: the one clustering loop that images, dense parts and review splits share.

Alternate (SeLa's label step with fixed features, Asano et al. ICLR 2020)

  E-step  Q = Sinkhorn(exp(X C^T / eps)) with row sums 1/N and column sums b (1/K, or a prior):
          the balanced assignment; labels y_i = argmax_k Q_ik,
  M-step  c_k = normalise(sum_i w_ik x_i) with hard weights w_ik = [y_i = k] (the prototypes that
          maximise sum_i <x_i, c_{y_i}> on the unit sphere) or soft ones w_ik = Q_ik.

on unit rows X (prepare them with `selflabel.geometry`). The hard M-step is the default: with soft
weights, prototypes that share one dense region get nearly equal weights and collapse onto its mean,
which defeats overclustering (dense parts), and on image features it is as accurate or better
(benchmarks/kmeans_mstep.py, numbers in docs/ARCHITECTURE.md). Under torch.distributed each rank holds
a block of rows; the Sinkhorn column sums and the prototype sums are all-reduced, so the result equals
the single-process one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from .distributed import DistContext, all_reduce_sum
from .errors import InputError
from .ot import sinkhorn

M_STEPS = ("hard", "soft")


@dataclass
class BalancedKMeans:
    """The fit: this rank's labels [n_local], the last plan's row block [n_local, K], unit prototypes [K, D]."""

    labels: torch.Tensor
    plan: torch.Tensor
    prototypes: torch.Tensor
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def alternations(self) -> int:
        return len(self.history)


def kmeanspp_init(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on unit vectors (distance = 1 - cosine)."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x[first]]
    d2 = (2 - 2 * x @ x[first]).clamp_min(0)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        idx = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        centers.append(x[idx])
        d2 = torch.minimum(d2, (2 - 2 * x @ x[idx]).clamp_min(0))
    return torch.stack(centers)


def prior_marginal(prior: Sequence[float] | None, k: int) -> torch.Tensor | None:
    """Column marginal b: the user's cluster-size prior (normalised, float64) or None (uniform)."""
    if prior is None:
        return None
    if len(prior) != k:
        raise InputError(f"cluster.prior has {len(prior)} entries but k = {k}")
    p = torch.tensor(prior, dtype=torch.float64)
    if (p <= 0).any():
        raise InputError("cluster.prior entries must be positive")
    return p / p.sum()


@torch.no_grad()
def balanced_kmeans(x: torch.Tensor, k: int, *, eps: float = 0.05, iters: int = 30, seed: int = 0,
                    prior: Sequence[float] | None = None, rel_tol: float = 1e-3, max_sinkhorn_iters: int = 1000,
                    m_step: str = "hard", stop_changed: float = 0.0, ctx: DistContext | None = None) -> BalancedKMeans:
    """Balanced spherical k-means of unit rows `x` [N, D] into `k` clusters (see the module docstring).

    Every rank passes the whole `x` (the k-means++ seeds must agree) and transports its `ctx.block`.
    Each Sinkhorn solve stops when the cluster masses are within `rel_tol` (relative L2) of b; the loop
    stops after `iters` alternations or when at most a `stop_changed` share of the labels changed.
    """
    ctx = ctx or DistContext()
    if m_step not in M_STEPS:
        raise ValueError(f"m_step must be one of {M_STEPS}, not {m_step!r}")
    n = x.shape[0]
    if k < 1 or k > n:
        raise InputError(f"k={k} must be between 1 and the number of rows ({n})")
    protos = kmeanspp_init(x, k, torch.Generator().manual_seed(seed))
    start, end = ctx.block(n)
    xl = x[start:end]
    b = prior_marginal(prior, k)
    labels = torch.full((end - start,), -1, dtype=torch.long, device=x.device)
    history: list[dict[str, float]] = []
    plan = None
    for _ in range(max(1, iters)):
        res = sinkhorn(xl @ protos.T, None, b, eps=eps, tol=rel_tol / k ** 0.5, max_iters=max_sinkhorn_iters,
                       distributed=ctx.enabled)
        plan = res.plan
        new = plan.argmax(1)
        if m_step == "soft":
            sums = plan.T.to(xl.dtype) @ xl
        else:
            sums = torch.zeros_like(protos).index_add_(0, new, xl)
        sums = all_reduce_sum(sums, ctx)
        if m_step == "hard":
            empty = all_reduce_sum(torch.bincount(new, minlength=k), ctx) == 0
            if empty.any():  # a prototype without rows keeps its soft (plan-weighted) mean
                sums[empty] = all_reduce_sum((plan[:, empty].T.to(xl.dtype) @ xl).contiguous(), ctx)
        protos = F.normalize(sums, dim=1)
        changed = float(all_reduce_sum(torch.tensor([float((new != labels).sum())]), ctx)) / n
        labels = new
        history.append({"changed": changed, "sinkhorn_iters": int(res.n_iters), "marginal_err": float(res.marginal_err)})
        if changed <= stop_changed:
            break
    return BalancedKMeans(labels, plan, protos, history)
