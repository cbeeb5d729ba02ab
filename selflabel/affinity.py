"""The cluster-affinity graph: how many nearest-neighbour links join the images of two small clusters.

Shared by the choice of K (``selflabel.kselect``: the cut of highest modularity) and by the merge of
the over-clustering into K (``selflabel.imbalanced``: Clauset-Newman-Moore agglomeration). It is
Leopart's co-occurrence graph at image level. Pure maths on arrays; deterministic.
"""
from __future__ import annotations

import networkx as nx
import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from torch import Tensor

from .neighbors import knn_exact

__all__ = ["knn_indices", "affinity_graph", "modularity", "modularity_merge", "sample_rows"]


def sample_rows(n: int, max_rows: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of at most ``max_rows`` of ``n`` rows (all when n is small)."""
    return np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False)) if n > max_rows else np.arange(n)


def knn_indices(x: Tensor, knn: int) -> Tensor:
    """Indices [n, knn] of each row's ``knn`` most cosine-similar other rows (x L2-normalised; at most
    n - 1 of them): the project's exact chunked search, ``selflabel.neighbors.knn_exact``."""
    found = knn_exact(x, min(knn, x.shape[0] - 1), exclude_self=True, normalized=True, device=x.device)
    return torch.from_numpy(found.indices)


def affinity_graph(labels: np.ndarray, nbrs: np.ndarray, k0: int) -> np.ndarray:
    """Symmetric [k0, k0] weights: A[a, b] = neighbour links from images of cluster a to cluster b."""
    a = np.zeros((k0, k0))
    np.add.at(a, (np.repeat(labels, nbrs.shape[1]), labels[nbrs.ravel()]), 1.0)
    return (a + a.T) / 2


def modularity(w: np.ndarray, groups: np.ndarray) -> float:
    """Newman's modularity of a partition (``groups[i]`` of node i) of the weighted graph ``w``:
    the share of weight inside groups minus its expectation given the node degrees."""
    m = w.sum()
    if m <= 0:
        return 0.0
    deg = w.sum(1)
    q = 0.0
    for g in np.unique(groups):
        idx = groups == g
        q += w[np.ix_(idx, idx)].sum() / m - (deg[idx].sum() / m) ** 2
    return float(q)


def modularity_merge(w: np.ndarray, k: int) -> np.ndarray:
    """Group index in [0, k) for each node of the weighted graph ``w`` [n, n]: Clauset-Newman-Moore
    greedy modularity agglomeration (networkx) stopped at k communities. Self-loops are left out
    (a cluster's links to itself say nothing about whom it should join). Nodes the graph cannot
    join (fewer than k connected components would be needed) are grouped by average linkage of
    their rows of ``w`` instead, so there are always exactly min(k, n) groups."""
    n = w.shape[0]
    if n <= k:
        return np.arange(n, dtype=np.int64)
    g = nx.Graph()
    g.add_nodes_from(range(n))
    iu, ju = np.triu_indices(n, 1)
    keep = w[iu, ju] > 0
    g.add_weighted_edges_from(zip(iu[keep].tolist(), ju[keep].tolist(), w[iu, ju][keep].tolist()))
    comms = nx.community.greedy_modularity_communities(g, weight="weight", cutoff=k, best_n=k)
    groups = np.zeros(n, dtype=np.int64)
    for i, members in enumerate(sorted(comms, key=min)):  # numbered by their smallest node: stable
        groups[sorted(members)] = i
    if len(comms) > k:  # disconnected pieces: join the communities with the most similar link profiles
        prof = np.stack([w[groups == c].sum(0) + 1e-12 for c in range(len(comms))])
        cut = fcluster(linkage(prof, method="average", metric="cosine"), k, criterion="maxclust") - 1
        groups = cut[groups].astype(np.int64)
    return groups
