"""Merge part clusters into object concepts by community detection on a co-occurrence graph.

Following Leopart (Ziegler & Asano, CVPR 2022, Sec. 3.4, `experiments/fully_unsup_seg`):
nodes are part clusters; `adj[i, j]` is how often cluster j is a spatial neighbour of cluster i
(8 directions at distances 1 and 2 on the part maps), normalised per image over i's neighbours and
averaged over the images where i has neighbours. The undirected edge weight is
`min(adj[i, j], adj[j, i])`, kept when both directions reach a threshold: a small part that always
touches a big region is linked to it only as strongly as the big region is to the small part.
Leopart runs Infomap; we run Louvain, whose resolution gives coarser (low) or finer (high) concepts.

Louvain implementations: networkx's `louvain_communities` (default) and python-louvain's
`community.best_partition`. python-louvain 0.16 is not monotone in `resolution` (it applies the
resolution to one side of the move gain but not to the stopping modularity), so the number of
concepts can fall as the resolution rises; networkx's is consistent. Either way we run several
seeds and keep the partition with the highest modularity at that resolution.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import networkx as nx
import numpy as np

LOUVAIN_METHODS = ("networkx", "python-louvain")
_DIRECTIONS = ((0, 1), (1, 1), (1, 0), (1, -1))  # + the transposed counts = all 8 directions


def adjacency_counts(part_map: np.ndarray, k: int, distances: Iterable[int] = (1, 2)) -> np.ndarray:
    """Symmetric counts [k, k] of (i, j) neighbour pairs in a part map (grey-level co-occurrence)."""
    m = np.asarray(part_map, dtype=np.int64)
    H, W = m.shape
    counts = np.zeros(k * k, dtype=np.int64)
    for d in distances:
        for uy, ux in _DIRECTIONS:
            dy, dx = uy * d, ux * d
            y0, y1 = 0, H - dy
            x0, x1 = max(0, -dx), W - max(0, dx)
            if y1 <= y0 or x1 <= x0:
                continue
            a = m[y0:y1, x0:x1]
            b = m[y0 + dy:y1 + dy, x0 + dx:x1 + dx]
            counts += np.bincount((a * k + b).ravel(), minlength=k * k)
    c = counts.reshape(k, k)
    return c + c.T


def cooccurrence(part_maps: Iterable[np.ndarray], k: int, distances: Iterable[int] = (1, 2)) -> np.ndarray:
    """Leopart's row-stochastic co-occurrence matrix [k, k] (zero diagonal).

    Per image the neighbour counts of each cluster are normalised to sum to 1 over its neighbours;
    these are summed over images and divided by the number of images where the cluster has neighbours.
    """
    distances = tuple(distances)
    total = np.zeros((k, k), dtype=np.float64)
    appear = np.zeros(k, dtype=np.int64)
    for pm in part_maps:
        c = adjacency_counts(pm, k, distances).astype(np.float64)
        np.fill_diagonal(c, 0.0)
        row = c.sum(1)
        total += np.divide(c, row[:, None], out=np.zeros_like(c), where=row[:, None] > 0)
        appear += row > 0
    return np.divide(total, appear[:, None], out=np.zeros_like(total), where=appear[:, None] > 0)


def build_graph(adj: np.ndarray, threshold: float = 0.0, allowed: np.ndarray | None = None) -> nx.Graph:
    """Undirected graph: one node per cluster, edge (i, j) with weight min(adj[i, j], adj[j, i]) when both
    directions reach `threshold` (and the weight is positive). `allowed[i, j] = False` forbids an edge
    (e.g. between a foreground and a background cluster)."""
    adj = np.asarray(adj, dtype=np.float64)
    k = adj.shape[0]
    g = nx.Graph()
    g.add_nodes_from(range(k))
    w = np.minimum(adj, adj.T)
    ok = (adj >= threshold) & (adj.T >= threshold) & (w > 0)
    if allowed is not None:
        ok &= np.asarray(allowed, dtype=bool)
    ii, jj = np.nonzero(np.triu(ok, 1))
    g.add_weighted_edges_from((int(i), int(j), float(w[i, j])) for i, j in zip(ii, jj))
    return g


def run_louvain(graph: nx.Graph, resolution: float, seed: int, method: str) -> list[set[int]]:
    """One Louvain run (one seed) of `method` -> list of communities (node sets)."""
    if method == "networkx":
        return [set(c) for c in nx.community.louvain_communities(graph, weight="weight", resolution=resolution, seed=seed)]
    if method == "python-louvain":
        import community as community_louvain  # python-louvain

        part = community_louvain.best_partition(graph, weight="weight", resolution=resolution, random_state=seed)
        groups: dict[int, set[int]] = {}
        for node, c in part.items():
            groups.setdefault(c, set()).add(node)
        return list(groups.values())
    raise ValueError(f"unknown Louvain method '{method}' (choose {', '.join(LOUVAIN_METHODS)})")


def louvain_partition(graph: nx.Graph, resolution: float = 1.0, *, seed: int = 0, n_seeds: int = 5,
                      method: str = "networkx") -> tuple[np.ndarray, float]:
    """Louvain communities with the best modularity over `n_seeds` seeds.

    Returns (community id per node [n], modularity). Community ids are 0..M-1, numbered by their
    smallest node so that equal partitions give equal arrays. Nodes without edges are their own
    community. Requires nodes 0..n-1.
    """
    n = graph.number_of_nodes()
    if sorted(graph.nodes) != list(range(n)):
        raise ValueError("louvain_partition: nodes must be 0..n-1")
    if graph.number_of_edges() == 0:
        return np.arange(n, dtype=np.int64), 0.0
    best: list[set[int]] | None = None
    best_q = -np.inf
    for s in range(seed, seed + max(1, n_seeds)):
        comms = run_louvain(graph, resolution, s, method)
        q = nx.community.modularity(graph, comms, weight="weight", resolution=resolution)
        if q > best_q + 1e-12:
            best, best_q = comms, q
    assert best is not None
    labels = np.empty(n, dtype=np.int64)
    for cid, members in enumerate(sorted(best, key=min)):
        labels[list(members)] = cid
    return labels, float(best_q)


def part_graph(adj: np.ndarray, foreground: np.ndarray | None = None, threshold: float = 0.0) -> nx.Graph:
    """The co-occurrence graph of `merge_parts`: with `foreground`, no edge joins a thing part to a stuff part."""
    allowed = None
    if foreground is not None:
        fg = np.asarray(foreground, dtype=bool)
        allowed = fg[:, None] == fg[None, :]
    return build_graph(adj, threshold, allowed)


def merge_parts(adj: np.ndarray, foreground: np.ndarray | None = None, *, resolution: float = 1.0,
                threshold: float = 0.0, seed: int = 0, n_seeds: int = 5, method: str = "networkx"
                ) -> tuple[np.ndarray, nx.Graph, float]:
    """Part cluster -> concept (0..M-1) from the co-occurrence matrix.

    With `foreground` (bool [k], from CBFE) edges join only clusters of the same kind, so a concept
    is either an object ("thing") or background ("stuff"), never both.
    Returns (concept per part, graph, modularity)."""
    g = part_graph(adj, foreground, threshold)
    labels, q = louvain_partition(g, resolution, seed=seed, n_seeds=n_seeds, method=method)
    return labels, g, q


def graph_json(graph: nx.Graph, node_attrs: dict[int, dict[str, Any]] | None = None, **graph_attrs: Any) -> dict[str, Any]:
    """networkx node-link JSON (nodes + "edges") with extra node and graph attributes, for drawing."""
    g = graph.copy()
    for node, attrs in (node_attrs or {}).items():
        g.nodes[node].update(attrs)
    g.graph.update(graph_attrs)
    try:
        return nx.node_link_data(g, edges="edges")
    except TypeError:  # networkx < 3.4 has no `edges` argument and writes "links"
        return nx.node_link_data(g)


def load_graph(path: str | Path) -> nx.Graph:
    """Read a graph.json written by `graph_json` (either "edges" or the older "links" key)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    key = "edges" if "edges" in data else "links"
    try:
        return nx.node_link_graph(data, edges=key)
    except TypeError:
        return nx.node_link_graph(data)
