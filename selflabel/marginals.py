"""Cluster sizes as a variable of the label step: the user's prior checked, the column marginal
estimated from the data, and the floor that keeps an estimated cluster from collapsing.

Real folders are long-tailed: a balanced label step (every cluster 1/K of the images, SeLa's and
SwAV's equipartition) splits the large classes and merges the small ones. Here the column marginal
``b`` of the transport is the maximum-likelihood mixture weight of the clusters (one EM step per
alternation, Dempster et al. 1977): ``b_j <- mean_i softmax_j(s_ij / eps + log b_j)``, the share of
the images that the softmax posterior under the current sizes gives cluster j. The label step is then
Sinkhorn with that ``b``. The floor ``min_mass / K`` is the guard against collapse: without it an
estimated cluster that loses its images loses its mass, then its prototype, for good.

Pure functions on tensors; with ``distributed=True`` the row sums are all-reduced over the default
process group, so every rank holds the same ``b`` as one process would.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .errors import InputError

__all__ = ["validate_prior", "floor_marginal", "estimate_marginal", "fixed_point_marginal", "total_variation"]


def validate_prior(prior: Sequence[float], k: int, name: str = "cluster.prior") -> Tensor:
    """The user's cluster-size prior as a float64 marginal summing to 1, or InputError naming what
    is wrong: the length must be ``k``; entries finite and positive (a zero-size cluster cannot be
    transported to: drop it and lower k)."""
    values = list(prior)
    if len(values) != k:
        raise InputError(f"{name} has {len(values)} entries but k = {k} (give one size per cluster)")
    try:
        p = torch.tensor([float(v) for v in values], dtype=torch.float64)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a list of {k} numbers, got {values!r}") from None
    if not torch.isfinite(p).all():
        raise InputError(f"{name} has a NaN or infinite entry: {values} (sizes must be finite numbers)")
    if (p < 0).any():
        raise InputError(f"{name} has a negative entry: {values} (sizes must be positive)")
    if (p == 0).all():
        raise InputError(f"{name} is all zero (sizes must be positive; omit it for sizes estimated from the data)")
    if (p == 0).any():
        raise InputError(f"{name} has a zero entry: {values} (every cluster needs a positive size; lower k instead)")
    return p / p.sum()


def floor_marginal(b: Tensor, min_mass: float) -> Tensor:
    """``b`` (summing to 1) with every entry at least ``min_mass / K`` and still summing to 1: the
    entries under the floor are raised to it and the others scaled down together (repeated until
    none falls under, at most K rounds). ``min_mass`` in [0, 1); 0 returns ``b`` normalised."""
    if not 0.0 <= min_mass < 1.0:
        raise ValueError(f"min_mass must be in [0, 1), got {min_mass}")
    b = b.double() / b.sum()
    k = b.numel()
    floor = min_mass / k
    if floor == 0.0:
        return b
    fixed = torch.zeros(k, dtype=torch.bool, device=b.device)
    out = b
    for _ in range(k):
        low = (out < floor) & ~fixed
        if not low.any():
            break
        fixed |= low
        free = b[~fixed]
        rest = 1.0 - floor * int(fixed.sum())
        out = torch.where(fixed, torch.full_like(b, floor), b * (rest / free.sum()) if free.numel() else b)
    return out


def estimate_marginal(scores: Tensor, b: Tensor, eps: float, *, distributed: bool = False) -> Tensor:
    """One EM step of the cluster sizes (float64 [K], sums to 1): the mean over all rows of the
    posterior ``softmax_j(scores_ij / eps + log b_j)``. ``scores`` [n, K] are this rank's rows when
    ``distributed``; the sums and the row count are all-reduced (the result equals one process's)."""
    logb = b.to(device=scores.device, dtype=torch.float64).clamp_min(1e-300).log()
    total = torch.zeros(b.numel() + 1, dtype=torch.float64, device=scores.device)
    rows = max(1, (1 << 22) // max(1, scores.shape[1]))  # float64 chunks of about 32 MB
    for s in range(0, scores.shape[0], rows):
        z = scores[s:s + rows].double() / eps + logb
        total[:-1] += torch.softmax(z, dim=1).sum(0)
    total[-1] = scores.shape[0]
    if distributed and dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    if total[-1] == 0:
        raise ValueError("estimate_marginal: no rows")
    est = total[:-1] / total[-1]
    return est / est.sum()


def fixed_point_marginal(scores: Tensor, eps: float, min_mass: float, *, steps: int = 100, tol: float = 1e-6,
                         distributed: bool = False) -> Tensor:
    """The cluster sizes of fixed scores: EM steps from uniform, each floored at ``min_mass / K``,
    until the sizes move by at most ``tol`` (max abs) or ``steps`` (for a last label step on a
    trained model, where nothing else changes between steps)."""
    k = scores.shape[1]
    b = torch.full((k,), 1.0 / k, dtype=torch.float64)
    for _ in range(steps):
        new = floor_marginal(estimate_marginal(scores, b, eps, distributed=distributed), min_mass).cpu()
        done = float((new - b).abs().max()) <= tol
        b = new
        if done:
            break
    return b


def total_variation(p: Sequence[float] | Tensor, q: Sequence[float] | Tensor) -> float:
    """Total variation distance ``0.5 * sum |p - q|`` of two distributions of equal length."""
    a = torch.as_tensor(np.array(p, dtype=np.float64))
    c = torch.as_tensor(np.array(q, dtype=np.float64))
    if a.shape != c.shape:
        raise ValueError(f"total_variation: shapes {tuple(a.shape)} and {tuple(c.shape)} differ")
    return 0.5 * float((a / a.sum() - c / c.sum()).abs().sum())

