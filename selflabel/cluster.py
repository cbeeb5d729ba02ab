"""Image-level clustering: the label result type and the balanced Sinkhorn clustering."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

if TYPE_CHECKING:
    from .config import RunConfig
    from .distributed import DistContext


@dataclass
class LabelResult:
    """Per-image labels from any method (sinkhorn, sela, swav, kmeans)."""

    labels: np.ndarray  # int64 [N]
    confidence: np.ndarray  # float32 [N] in [0, 1]
    prototypes: np.ndarray  # float32 [K, D], L2-normalised
    head_labels: dict[int, np.ndarray] = field(default_factory=dict)  # K -> int64 [N]
    probs: np.ndarray | None = None  # float32 [N, K] or None
    info: dict[str, Any] = field(default_factory=dict)


def default_k(n: int, n_classes: int | None = None) -> int:
    """K when the user gives none: the number of ground-truth class folders if there are any
    (the user already told us the granularity), else sqrt(N / 2) clipped to [2, 100]."""
    if n_classes and n_classes >= 2:
        return min(n_classes, n)
    return int(max(2, min(100, round((n / 2) ** 0.5), n)))


def prepare_features(features: np.ndarray, device: str | torch.device = "cpu", chunk: int = 8192) -> torch.Tensor:
    """Centre and L2-normalise (cosine geometry). Post-ReLU CNN features all share a large mean
    direction; removing it makes cosine similarity discriminative. Reads a memmap in chunks, so the
    result is the only N x D array held (benchmarks/memory.py)."""
    n, d = features.shape
    mean = np.zeros(d, dtype=np.float64)
    for s in range(0, n, chunk):
        mean += features[s:s + chunk].sum(0, dtype=np.float64)
    mean /= max(n, 1)
    out = torch.empty((n, d), dtype=torch.float32, device=device)
    m = torch.as_tensor(mean, dtype=torch.float32, device=device)
    for s in range(0, n, chunk):
        x = out[s:s + chunk]
        x.copy_(torch.from_numpy(np.array(features[s:s + chunk], dtype=np.float32)))  # a writable copy of the chunk
        x.sub_(m)
        x.div_(x.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return out


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
def sinkhorn_cluster(
    features: np.ndarray,
    k: int,
    *,
    eps: float = 0.05,
    temperature: float = 0.1,
    iters: int = 30,
    seed: int = 0,
    prior: list[float] | None = None,
    device: str | torch.device = "cpu",
    ctx: "DistContext | None" = None,
) -> LabelResult:
    """Balanced k-means whose assignment step is an optimal transport problem (SeLa's label step).

    Alternate: plan = Sinkhorn(cosine(x, prototypes) / eps) with equal (or `prior`) cluster
    sizes; labels = argmax of the plan; prototypes = normalised plan-weighted means.
    Under torch.distributed (`ctx`), each rank transports its block of rows: the Sinkhorn column
    sums and the prototype sums are all-reduced, so the result equals the single-process one.
    """
    # every rank prepares the same full matrix (identical init)
    return sinkhorn_cluster_prepared(prepare_features(features, device), k, eps=eps, temperature=temperature,
                                     iters=iters, seed=seed, prior=prior, ctx=ctx)


@torch.no_grad()
def sinkhorn_cluster_prepared(x: torch.Tensor, k: int, *, eps: float = 0.05, temperature: float = 0.1,
                              iters: int = 30, seed: int = 0, prior: list[float] | None = None,
                              ctx: "DistContext | None" = None) -> LabelResult:
    """`sinkhorn_cluster` on features already through `prepare_features` (several K, one preparation)."""
    from .distributed import DistContext, all_gather_objects, all_reduce_sum
    from .ot import sinkhorn

    ctx = ctx or DistContext()
    n = x.shape[0]
    if k < 1 or k > n:
        raise InputError(f"k={k} must be between 1 and the number of images ({n})")
    gen = torch.Generator().manual_seed(seed)
    protos = kmeanspp_init(x, k, gen)
    start, end = ctx.block(n)
    xl = x[start:end]
    b = prior_marginal(prior, k)
    labels = torch.full((end - start,), -1, dtype=torch.long, device=x.device)
    sink_iters = []
    plan = None
    for it in range(iters):
        # tolerance relative to ||b|| = 1/sqrt(k): cluster sizes within 0.1 %
        res = sinkhorn(xl @ protos.T, None, b, eps=eps, tol=1e-3 / k ** 0.5, max_iters=1000, distributed=ctx.enabled)
        plan = res.plan
        sink_iters.append(int(res.n_iters))
        new = plan.argmax(1)
        protos = F.normalize(all_reduce_sum(plan.T @ xl, ctx), dim=1)
        changed = all_reduce_sum(torch.tensor([float((new != labels).sum())]), ctx)
        labels = new
        if changed.item() == 0:
            break
    probs = torch.softmax(xl @ protos.T / temperature, dim=1)
    conf = probs.gather(1, labels[:, None])[:, 0]
    keep_plan = n * k <= 10_000_000  # the plan travels between ranks and into info only when small
    parts = all_gather_objects((labels.cpu().numpy(), conf.cpu().numpy(), probs.cpu().numpy(),
                                plan.cpu().numpy() if keep_plan else None), ctx)
    return LabelResult(
        labels=np.concatenate([p[0] for p in parts]).astype(np.int64),
        confidence=np.concatenate([p[1] for p in parts]).astype(np.float32),
        prototypes=_mean_prototypes(xl, labels, k, ctx),
        probs=np.concatenate([p[2] for p in parts]).astype(np.float32),
        info={"method": "sinkhorn", "alternations": it + 1, "sinkhorn_iters": sink_iters,
              "plan": np.concatenate([p[3] for p in parts]) if keep_plan else None},
    )


def _mean_prototypes(x: torch.Tensor, labels: torch.Tensor, k: int, ctx: "DistContext | None" = None) -> np.ndarray:
    """L2-normalised mean of each cluster's (prepared) features, summed over ranks under `ctx`; zero
    for an empty cluster."""
    from .distributed import all_reduce_sum

    sums = torch.zeros((k, x.shape[1]), dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    if ctx is not None:
        sums = all_reduce_sum(sums, ctx)
    return F.normalize(sums, dim=1).cpu().numpy().astype(np.float32)


def kmeans_cluster(features: np.ndarray, k: int, *, seed: int = 0, temperature: float = 0.1) -> LabelResult:
    """scikit-learn k-means on the same prepared features (the baseline)."""
    return kmeans_cluster_prepared(prepare_features(features), k, seed=seed, temperature=temperature)


def kmeans_cluster_prepared(x: torch.Tensor, k: int, *, seed: int = 0, temperature: float = 0.1) -> LabelResult:
    """`kmeans_cluster` on features already through `prepare_features`."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(x.numpy())
    labels = torch.as_tensor(km.labels_, dtype=torch.long)
    protos = _mean_prototypes(x, labels, k)
    probs = torch.softmax(x @ torch.as_tensor(protos).T / temperature, dim=1)
    conf = probs.gather(1, labels[:, None])[:, 0]
    return LabelResult(labels.numpy().astype(np.int64), conf.numpy().astype(np.float32), protos,
                       probs=probs.numpy().astype(np.float32), info={"method": "kmeans"})


def cluster_features(features: np.ndarray, k: int, cfg: "RunConfig", *, out_dir=None, device="cpu", records=None,
                     backbone=None, ctx: "DistContext | None" = None) -> LabelResult:
    """Dispatch on `cfg.cluster.method`; extra heads (`cfg.cluster.heads`) go to `head_labels`."""
    method = cfg.cluster.method
    heads = [h for h in cfg.cluster.heads if h != k]
    if method == "sinkhorn":
        x = prepare_features(features, device)  # once for the main K and every extra head
        res = sinkhorn_cluster_prepared(x, k, eps=cfg.cluster.eps, temperature=cfg.cluster.temperature,
                                        iters=cfg.cluster.iters, seed=cfg.seed, prior=cfg.cluster.prior, ctx=ctx)
        for h in heads:
            res.head_labels[h] = sinkhorn_cluster_prepared(x, h, eps=cfg.cluster.eps, iters=cfg.cluster.iters,
                                                           seed=cfg.seed, ctx=ctx).labels
        return res
    if method == "kmeans":
        x = prepare_features(features)
        res = kmeans_cluster_prepared(x, k, seed=cfg.seed, temperature=cfg.cluster.temperature)
        for h in heads:
            res.head_labels[h] = kmeans_cluster_prepared(x, h, seed=cfg.seed).labels
        return res
    if method == "sela":
        from .train.sela import train_sela

        return train_sela(features, k, cfg, heads=heads, out_dir=out_dir, device=device, records=records, backbone=backbone)
    if method == "swav":
        from .train.swav import train_swav

        return train_swav(features, k, cfg, heads=heads, out_dir=out_dir, device=device, records=records, backbone=backbone)
    if method == "neighbors":
        from .train.neighbors import train_neighbors

        return train_neighbors(features, k, cfg, heads=heads, out_dir=out_dir, device=device, records=records)
    raise InputError(f"unknown method '{method}' (choose sinkhorn, sela, swav, kmeans or neighbors)")
