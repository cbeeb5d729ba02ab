"""The problem the solvers share: validated scores and marginals, and the result type."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import backend as B
from .rows import rows_per_chunk

log = logging.getLogger(__name__)

CHECK_EVERY_ACCEL = 10  # reading the error on a GPU synchronises the stream


@dataclass(frozen=True)
class SinkhornResult:
    """Output of :func:`sinkhorn` / :func:`sinkhorn_unbalanced`.

    ``plan[i, j] = exp(scores[i, j] / eps + log_u[i] + log_v[j])``; rows sum to ``a`` exactly
    (balanced case) and ``marginal_err`` is the L2 norm of ``plan.sum(0) - b`` (POT's ``stopThr``
    measure). ``log_u``/``log_v`` are float64 and let callers rebuild any rows of the plan without
    holding it (see :func:`assign_from_potentials`). ``rate`` is the plain Sinkhorn contraction rate
    per iteration that the over-relaxation estimated (0 if none). The result is a warm start
    (``init=``) for the next solve on similar scores: its ``log_v`` and its ``rate``.
    """

    plan: Tensor | None
    n_iters: int
    marginal_err: float
    converged: bool
    log_u: Tensor
    log_v: Tensor
    log_domain: bool
    rate: float = 0.0


@dataclass
class Problem:
    scores: Tensor  # [n, k] local rows, input dtype
    eps: float
    dt: torch.dtype  # compute dtype
    a: Tensor  # float64 [n]
    b: Tensor  # float64 [k]
    n_global: int
    world: bool

    @property
    def n(self) -> int:
        return self.scores.shape[0]

    @property
    def k(self) -> int:
        return self.scores.shape[1]

    @property
    def device(self) -> torch.device:
        return self.scores.device

    def rows(self, nbytes: int) -> int:
        itemsize = torch.finfo(self.dt).bits // 8
        return rows_per_chunk(self.n, self.k, self.device, nbytes, itemsize)


def lazy_checks(device: torch.device) -> bool:
    """Read errors and range flags only every ``CHECK_EVERY_ACCEL`` iterations: on accelerators each
    read synchronises the stream; on CPU they are free and checked every iteration."""
    return device.type != "cpu"


def as_vector(x, n: int, name: str, device: torch.device, positive: bool = True) -> Tensor:
    """A user vector (marginal or potential) as float64 on ``device`` (numpy-backed on CPU), validated."""
    if device.type == "cpu":
        arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else x
        t = torch.from_numpy(np.array(arr, dtype=np.float64).reshape(-1))
    else:
        t = torch.as_tensor(x, dtype=torch.float64, device=device).reshape(-1)
    xb = B.backend(t)
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries, expected {n}")
    if not bool(B.xp_for(device).isfinite(xb).all()):
        raise ValueError(f"{name} must be finite" + (" and strictly positive" if positive else ""))
    if positive and bool((xb <= 0).any()):
        raise ValueError(f"{name} must be finite and strictly positive (drop empty rows/clusters instead)")
    return t


def prepare(scores: Tensor, a, b, eps: float, distributed: bool, rescale_b: bool = True) -> Problem:
    """Validate the inputs and build the marginals (global N and mass all-reduced)."""
    if not isinstance(scores, Tensor):
        scores = torch.as_tensor(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [N, K], got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        scores = scores.to(torch.float32)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive number, got {eps}")
    n, k = scores.shape
    if k == 0:
        raise ValueError("scores has no columns (K = 0)")
    scores = scores.contiguous()
    in_world = B.world(distributed)
    dev = scores.device
    a_t = None if a is None else as_vector(a, n, "a", dev)
    # one all-reduce for the global row count and the total mass of a
    stats = torch.tensor([float(n), float(n) if a_t is None else float(B.backend(a_t).sum())],
                         dtype=torch.float64, device=dev)
    B.all_reduce(stats, in_world)
    n_global, mass = int(round(stats[0].item())), stats[1].item()
    if n_global == 0:
        raise ValueError("scores has no rows (N = 0)")
    if a_t is None:
        a_t = B.full64(n, 1.0 / n_global, dev)
        mass = 1.0
    if b is None:
        b_t = B.full64(k, mass / k, dev)
    else:
        b_t = as_vector(b, k, "b", dev)
        total = float(B.backend(b_t).sum())
        if rescale_b and abs(total - mass) > 1e-9 * mass:
            log.debug("b sums to %g, a to %g: b rescaled to the mass of a", total, mass)
            B.backend(b_t)[:] *= mass / total
    return Problem(scores, float(eps), B.compute_dtype(scores.dtype), a_t, b_t, n_global, in_world)
