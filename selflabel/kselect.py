"""Choosing K from the data when the user gives none.

Criterion (measured in ``benchmarks/longtail.py``): **the cut of the cluster tree with the highest
modularity on the image-neighbour graph.**

1. Over-cluster the prepared features into K0 small clusters with the balanced label step
   (K0 = ``min(n_small, N // 3)``, 40 by default), as the dense path does for parts.
2. Build the cluster-affinity graph: edge (a, b) weighs how many of the ``knn`` nearest neighbours
   (cosine) of the images of cluster a lie in cluster b, symmetrised (Leopart's co-occurrence graph
   at image level; self-loops kept). In a small folder ``knn`` shrinks to the small clusters' mean size
   (N // K0, at least ``MIN_KNN``): 10 neighbours of an image in a folder of 10 per class are half
   strangers, and their links merge classes (the shipped 100-photo sample: K = 6 of 10 at 10, 7-9 at 3).
3. Merge the small clusters by average linkage on the cosine distance of their means (the merge the
   clustering itself uses) and score each cut K = 2 .. ``max_k`` by the modularity (Newman 2006) of
   the partition it induces on the graph. The chosen K is the argmax: the grouping whose clusters
   hold the most neighbour pairs beyond what their sizes explain.

Degenerate data (fewer than 2 distinct feature vectors, e.g. a folder of copies of one image)
gives K = 1 with that reason instead of an arbitrary split. The candidate table goes into the
manifest and ``k_selection.png``. Pure maths on tensors; deterministic for a seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from torch import Tensor

from .affinity import affinity_graph, knn_indices, modularity, sample_rows
from .imbalanced import OVERCLUSTER_ITERS, OVERCLUSTER_SIZE_TOL, cluster_sums, transport_kmeans
from .kmeans import kmeanspp_init

__all__ = ["KSelection", "choose_k", "graph_neighbors"]

MIN_KNN = 3  # the fewest neighbours per image of the graph, however small the folder


def graph_neighbors(knn: int, n: int, k0: int) -> int:
    """Neighbours per image of the affinity graph: `knn`, or the small clusters' mean size n // k0 when
    that is fewer (never below MIN_KNN, never n or more)."""
    return max(1, min(knn, max(MIN_KNN, n // max(k0, 1)), n - 1))


@dataclass
class KSelection:
    """The chosen K, a one-line reason, and the candidate curve (K -> modularity)."""

    k: int
    reason: str
    candidates: list[dict[str, float]] = field(default_factory=list)  # [{"k": K, "modularity": Q}]
    n_small: int = 0  # K0, the over-clustering the curve was computed from
    n_used: int = 0  # images the neighbour graph was built from

    def to_dict(self) -> dict:
        return {"k": self.k, "reason": self.reason, "criterion": "max modularity of the cluster-tree cuts",
                "n_small_clusters": self.n_small, "n_images_in_graph": self.n_used, "candidates": self.candidates}


@torch.no_grad()
def choose_k(x: Tensor, *, seed: int = 0, eps: float = 0.05, n_small: int = 40, max_k: int = 30,
             knn: int = 10, max_graph: int = 20_000) -> KSelection:
    """Choose K for the prepared features ``x`` [N, D] (module docstring). The neighbour graph
    uses a seeded sample of at most ``max_graph`` images (its cost is quadratic in them)."""
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    distinct = int(torch.unique(torch.round(x[: min(n, 4096)] * 1e4), dim=0).shape[0]) if n else 0
    if n < 4 or distinct < 2:
        return KSelection(1, f"{n} images with {distinct} distinct feature vector(s): one cluster", [], 0, n)
    k0 = max(2, min(n_small, n // 3, distinct))
    fine = transport_kmeans(x, kmeanspp_init(x, k0, gen), eps=eps, iters=OVERCLUSTER_ITERS, size_tol=OVERCLUSTER_SIZE_TOL)
    labels = fine.labels.cpu().numpy()
    sums, counts = cluster_sums(x, fine.labels, k0)
    full = np.flatnonzero(counts.cpu().numpy() > 0)
    if len(full) < 3:
        return KSelection(len(full), f"only {len(full)} non-empty small clusters: K = {len(full)}", [], k0, n)
    rows = sample_rows(n, max_graph, seed)
    knn = graph_neighbors(knn, len(rows), k0)
    nbrs = knn_indices(x[torch.as_tensor(rows)], knn).numpy()
    w = affinity_graph(labels[rows], nbrs, k0)[np.ix_(full, full)]
    means = sums.cpu().numpy()[full]
    means /= np.linalg.norm(means, axis=1, keepdims=True).clip(1e-12)
    tree = linkage(means, method="average", metric="cosine")
    curve = []
    for k in range(2, min(max_k, len(full)) + 1):
        curve.append({"k": k, "modularity": modularity(w, fcluster(tree, k, criterion="maxclust"))})
    best = max(curve, key=lambda c: c["modularity"])
    reason = (f"K = {best['k']}: highest modularity ({best['modularity']:.3f}) of the cluster-tree cuts "
              f"K = 2..{curve[-1]['k']} on the {knn}-nearest-neighbour graph of {len(rows)} images "
              f"over {len(full)} small clusters")
    return KSelection(int(best["k"]), reason, curve, k0, len(rows))
