"""Clustering for long-tailed folders: cluster sizes estimated inside the transport label step.

Three stages on prepared (centred, L2-normalised) features, measured in ``benchmarks/longtail.py``:

1. **Over-cluster** into ``overcluster * K`` (6 K by default) clusters with the balanced label step (SeLa's Sinkhorn
   k-means). Equal sizes are right at this grain: a large class takes several small clusters, a small
   class still gets one of its own instead of being swallowed.
2. **Merge** the small clusters into K, by average linkage on the cosine distance of their means
   (``merge="average"``) or by Clauset-Newman-Moore agglomeration of the cluster-affinity graph
   (``merge="modularity"``: nearest-neighbour links between the small clusters' images,
   ``selflabel.affinity``, as many neighbours per image as a small cluster holds), stopped at K
   communities. ``merge="auto"`` (the default) takes the links when the small clusters hold 5 to
   20 images on average (their means are noisy there: 1,000 images of 10 classes) and the means
   otherwise: on well-sampled clusters modularity's resolution limit merges distinct small classes,
   and clusters of one or two images (100 photos, K = 10) have no links worth more than their means. The merged sizes are the first estimate of the class proportions.
3. **Refine** with the same alternation, the column marginal now a variable: each label step is
   Sinkhorn with ``b`` = the EM estimate of the cluster sizes (``selflabel.marginals``), floored at
   ``min_mass / K`` against collapse.

Under torch.distributed (``ctx``) each rank transports its block of rows; column sums, prototype
sums and the marginal estimate are all-reduced, so every rank holds the one-process result up to the
order of floating-point sums. That order can break a near-tie between interchangeable small
clusters differently (near-duplicate images), which renumbers the merged clusters without changing
them; so the clusters are numbered canonically at the end: largest first, ties by the first image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import fcluster, linkage
from torch import Tensor

from .affinity import affinity_graph, knn_indices, modularity_merge, sample_rows
from .distributed import DistContext, all_gather_blocks, all_reduce_sum
from .errors import InputError
from .geometry import hard_label_result
from .kmeans import kmeanspp_init
from .marginals import estimate_marginal, floor_marginal
from .ot import sinkhorn
from .result import LabelResult

__all__ = ["TransportFit", "transport_kmeans", "merge_clusters", "merge_by_links", "estimated_marginal_cluster",
           "estimated_cluster_prepared", "canonical_order"]


@dataclass
class TransportFit:
    """One fit of spherical k-means with a transport label step. ``labels`` and ``plan`` are this
    rank's rows; ``marginal`` (float64 [K]) is the column marginal of the last label step."""

    labels: Tensor
    plan: Tensor
    prototypes: Tensor
    marginal: Tensor
    info: dict[str, Any] = field(default_factory=dict)


OVERCLUSTER_SIZE_TOL = 1e-2  # the small clusters only seed the merge: sizes within 1 % are enough
OVERCLUSTER_ITERS = 15
MERGES = ("auto", "modularity", "average")
MERGE_AUTO_IMAGES = (5, 20)  # merge="auto": the links for small clusters of this many images on average (from, below)
MERGE_GRAPH_ROWS = 20_000  # the merge's neighbour graph is built on a seeded sample of at most this many images
MERGE_MIN_KNN = 10


@torch.no_grad()
def transport_kmeans(xl: Tensor, protos: Tensor, *, eps: float = 0.05, iters: int = 30,
                     estimate: bool = False, b: Tensor | None = None, min_mass: float = 0.1,
                     size_tol: float = 1e-3, ctx: DistContext | None = None) -> TransportFit:
    """Alternate a Sinkhorn label step and the prototype update (plan-weighted means, normalised).

    ``b``: the column marginal (default uniform: balanced, SeLa), fixed unless ``estimate``; with
    ``estimate`` it is only the start, and before each label step ``b`` becomes the EM estimate of
    the sizes under the current prototypes, floored at ``min_mass / K``. Stops when no label
    changes on any rank. ``size_tol``: the Sinkhorn tolerance relative to ``||b|| = 1/sqrt(K)``
    (1e-3: cluster sizes within 0.1 %).
    """
    ctx = ctx or DistContext()
    k = protos.shape[0]
    b = torch.full((k,), 1.0 / k, dtype=torch.float64) if b is None else b.double() / b.sum()
    labels = torch.full((xl.shape[0],), -1, dtype=torch.long, device=xl.device)
    sink_iters: list[int] = []
    plan = None
    it = 0
    for it in range(iters):
        scores = xl @ protos.T
        if estimate:
            b = floor_marginal(estimate_marginal(scores, b, eps, distributed=ctx.enabled), min_mass)
        res = sinkhorn(scores, None, b.to(torch.float32 if scores.dtype != torch.float64 else torch.float64),
                       eps=eps, tol=size_tol / k ** 0.5, max_iters=1000, distributed=ctx.enabled)
        plan = res.plan
        sink_iters.append(int(res.n_iters))
        new = plan.argmax(1)
        protos = F.normalize(all_reduce_sum(plan.T.to(xl.dtype) @ xl, ctx), dim=1)
        changed = all_reduce_sum(torch.tensor([float((new != labels).sum())], device=xl.device), ctx)
        labels = new
        if changed.item() == 0:
            break
    return TransportFit(labels, plan, protos, b, {"alternations": it + 1, "sinkhorn_iters": sink_iters})


def cluster_sums(xl: Tensor, labels: Tensor, k: int, ctx: DistContext | None = None) -> tuple[Tensor, Tensor]:
    """Per-cluster feature sums [k, D] and counts [k] (float64), summed over ranks under ``ctx``."""
    sums = torch.zeros((k, xl.shape[1]), dtype=torch.float64, device=xl.device).index_add_(0, labels, xl.double())
    counts = torch.bincount(labels, minlength=k).double()
    if ctx is not None:
        sums, counts = all_reduce_sum(sums, ctx), all_reduce_sum(counts, ctx)
    return sums, counts


def merge_clusters(sums: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    """Group index in [0, k) for each of K0 small clusters: average linkage on the cosine distance
    of their means, cut at k groups. Empty clusters go to group 0: with no images they add nothing
    to its sums or size. Deterministic: every rank cuts alike."""
    k0 = len(counts)
    full = np.flatnonzero(counts > 0)
    if len(full) <= k:
        group = np.zeros(k0, dtype=np.int64)
        group[full] = np.arange(len(full))
        return group
    means = sums[full] / np.linalg.norm(sums[full], axis=1, keepdims=True).clip(1e-12)
    cut = fcluster(linkage(means, method="average", metric="cosine"), k, criterion="maxclust") - 1
    group = np.zeros(k0, dtype=np.int64)
    group[full] = cut
    return group


def merge_by_links(x: Tensor, labels: np.ndarray, counts: np.ndarray, k: int, seed: int = 0,
                   max_rows: int = MERGE_GRAPH_ROWS) -> np.ndarray:
    """Group index in [0, k) for each of K0 small clusters (``labels`` [N] of the prepared ``x``):
    Clauset-Newman-Moore on the cluster-affinity graph of a seeded sample of at most ``max_rows``
    images, each linked to as many nearest neighbours as a small cluster holds on average (at least
    10). Measured against average linkage of the means in benchmarks/longtail.py: the means of
    small clusters of 15-20 images are noisy, their neighbour links are not. Empty clusters go to
    group 0. Deterministic for a seed: every rank builds the same graph."""
    k0 = len(counts)
    full = np.flatnonzero(counts > 0)
    group = np.zeros(k0, dtype=np.int64)
    if len(full) <= k:
        group[full] = np.arange(len(full))
        return group
    rows = sample_rows(x.shape[0], max_rows, seed)
    knn = max(MERGE_MIN_KNN, len(rows) // len(full))
    nbrs = knn_indices(x[torch.as_tensor(rows)], knn).numpy()
    w = affinity_graph(labels[rows], nbrs, k0)[np.ix_(full, full)]
    group[full] = modularity_merge(w, k)
    return group


@torch.no_grad()
def estimated_marginal_cluster(x: Tensor, k: int, *, eps: float = 0.05, iters: int = 30, seed: int = 0,
                               min_mass: float = 0.1, overcluster: int = 6, merge: str = "auto",
                               init: Tensor | None = None, ctx: DistContext | None = None) -> TransportFit:
    """K clusters of the prepared features ``x`` (every rank holds all rows, as in
    ``cluster.sinkhorn_cluster``) with sizes estimated from the data: over-cluster, merge, refine
    (module docstring). ``merge``: "auto" (the default), "modularity" or "average" (stage 2). ``init``:
    start the refinement from these prototypes [k, D] instead (stages 1-2 skipped). Returns this
    rank's rows of the labels and the plan."""
    ctx = ctx or DistContext()
    n = x.shape[0]
    if k < 1 or k > n:
        raise InputError(f"k={k} must be between 1 and the number of images ({n})")
    if overcluster < 1:
        raise InputError(f"cluster.overcluster={overcluster} must be at least 1")
    if merge not in MERGES:
        raise InputError(f"cluster.merge={merge!r} must be one of {', '.join(MERGES)}")
    start, end = ctx.block(n)
    xl = x[start:end]
    gen = torch.Generator().manual_seed(seed)
    info: dict[str, Any] = {"overcluster": overcluster, "merge": merge, "min_mass": min_mass}
    if init is not None:
        protos, b0 = F.normalize(init.to(x), dim=1), None
    else:
        k0 = min(overcluster * k, n)
        fine = transport_kmeans(xl, kmeanspp_init(x, k0, gen), eps=eps, iters=min(iters, OVERCLUSTER_ITERS),
                                size_tol=OVERCLUSTER_SIZE_TOL, ctx=ctx)
        sums, counts = cluster_sums(xl, fine.labels, k0, ctx)
        if merge == "auto":
            merge = "modularity" if MERGE_AUTO_IMAGES[0] <= n / k0 < MERGE_AUTO_IMAGES[1] else "average"
            info["merge"] = f"auto: {merge}"
        if merge == "modularity":
            fine_labels = all_gather_blocks(fine.labels, ctx).cpu().numpy()
            group = merge_by_links(x, fine_labels, counts.cpu().numpy(), k, seed)
        else:
            group = merge_clusters(sums.cpu().numpy(), counts.cpu().numpy(), k)
        group = torch.as_tensor(group, device=x.device)
        kk = int(group.max()) + 1
        msums = torch.zeros((k, x.shape[1]), dtype=torch.float64, device=x.device).index_add_(0, group, sums)
        mcounts = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, group, counts)
        if kk < k:  # fewer non-empty small clusters than k (tiny or degenerate data): seed the rest
            msums[kk:] = kmeanspp_init(x, k, gen)[kk:].double()
            mcounts[kk:] = 1.0
        protos = F.normalize(msums, dim=1).to(x.dtype)
        b0 = floor_marginal(mcounts / mcounts.sum(), min_mass).cpu()
        info["overcluster_alternations"] = fine.info["alternations"]
    fit = transport_kmeans(xl, protos, eps=eps, iters=iters, estimate=True, b=b0, min_mass=min_mass, ctx=ctx)
    fit.info.update(info)
    return fit



def canonical_order(labels: Tensor, k: int) -> Tensor:
    """The permutation ``order`` [k] (new cluster ``j`` is old cluster ``order[j]``) that numbers
    clusters by size, largest first, ties by their first image (empty clusters last): a number that
    depends on the partition only, not on how the fit arrived at it."""
    n = labels.shape[0]
    lab = labels.cpu().long()
    sizes = torch.bincount(lab, minlength=k)
    first = torch.full((k,), n, dtype=torch.long).scatter_reduce_(0, lab, torch.arange(n), "amin")
    keys = sorted(range(k), key=lambda c: (-int(sizes[c]), int(first[c]), c))
    return torch.as_tensor(keys, dtype=torch.long)


@torch.no_grad()
def estimated_cluster_prepared(x: Tensor, k: int, *, eps: float = 0.05, temperature: float = 0.1, iters: int = 30,
                               seed: int = 0, min_mass: float = 0.1, overcluster: int = 6,
                               merge: str = "auto", ctx: DistContext | None = None) -> LabelResult:
    """:func:`estimated_marginal_cluster` as a run's `LabelResult` (the default clustering): labels
    gathered from every rank, prototypes the normalised cluster means, confidences
    softmax(cos / temperature) of the chosen cluster, and the estimated sizes in ``info``; clusters
    numbered by :func:`canonical_order`."""
    ctx = ctx or DistContext()
    fit = estimated_marginal_cluster(x, k, eps=eps, iters=iters, seed=seed, min_mass=min_mass,
                                     overcluster=overcluster, merge=merge, ctx=ctx)
    labels = all_gather_blocks(fit.labels, ctx)
    order = canonical_order(labels, k)
    labels = torch.argsort(order).to(labels.device)[labels]
    return hard_label_result(x, labels, k, temperature, {
        "method": "sinkhorn", "marginal": "estimated",
        "estimated_sizes": [round(float(v), 6) for v in fit.marginal[order.to(fit.marginal.device)]],
        **fit.info})
