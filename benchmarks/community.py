"""Louvain: python-louvain (`community.best_partition`) vs networkx's `louvain_communities`.

Question: which Louvain should the dense concept graph use? Both run on the same weighted
planted-partition graphs (networkx `random_partition_graph`, intra-community edges heavier
than inter-community ones, as in a cluster co-occurrence graph); we report time, modularity,
the number of communities and NMI against the planted partition, plus a resolution sweep
(python-louvain 0.16's resolution is not monotone in the number of communities).

    python -m benchmarks.community [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `selflabel` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import networkx as nx
import numpy as np

from benchmarks.common import markdown_table, write_result
from selflabel.metrics import nmi

SIZES = (100, 300, 1000, 3000, 10_000)
QUICK_SIZES = (100, 1000)
RESOLUTIONS = (0.1, 0.3, 0.6, 1.0, 3.0)


def planted_graph(n: int, n_groups: int, *, degree: float = 20.0, mu: float = 0.6, seed: int = 0) -> tuple[nx.Graph, np.ndarray]:
    """Weighted planted-partition graph and its ground truth (community id per node 0..n-1).

    Expected degree `degree`, of which a fraction `mu` goes to other communities (the mixing
    parameter: 0 = disconnected communities, 1 - 1/n_groups = no structure). Intra-community
    weights are U(0.5, 1.0), inter-community ones U(0.1, 0.6), so weights carry signal but overlap.
    """
    if n_groups < 1 or n < 2 * n_groups:
        raise ValueError(f"need at least 2 nodes per community (n={n}, n_groups={n_groups})")
    sizes = [n // n_groups + (1 if i < n % n_groups else 0) for i in range(n_groups)]
    size = n / n_groups
    p_in = min(1.0, degree * (1 - mu) / max(size - 1, 1))
    p_out = min(1.0, degree * mu / max(n - size, 1)) if n_groups > 1 else 0.0
    g = nx.random_partition_graph(sizes, p_in, p_out, seed=seed)
    truth = np.empty(n, dtype=np.int64)
    for ci, members in enumerate(g.graph["partition"]):
        truth[list(members)] = ci
    rng = np.random.default_rng(seed)
    edges = list(g.edges())
    if edges:
        u, v = np.array(edges).T
        same = truth[u] == truth[v]
        w = np.where(same, rng.uniform(0.5, 1.0, len(edges)), rng.uniform(0.1, 0.6, len(edges)))
        nx.set_edge_attributes(g, {e: float(x) for e, x in zip(edges, w)}, "weight")
    return g, truth


def groups_for(n: int) -> int:
    """Number of planted communities for a graph of n nodes: 5 at 100 nodes, 20 at 10,000."""
    return int(np.clip(round(5 * (n / 100) ** 0.3), 2, 50))


def labels_from_communities(communities: list[set], n: int) -> np.ndarray:
    lab = np.full(n, -1, dtype=np.int64)
    for ci, members in enumerate(communities):
        lab[list(members)] = ci
    return lab


def communities_from_labels(labels: np.ndarray) -> list[set]:
    return [set(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)]


def run_python_louvain(g: nx.Graph, resolution: float = 1.0, seed: int = 0) -> np.ndarray:
    import community as community_louvain  # python-louvain

    part = community_louvain.best_partition(g, weight="weight", resolution=resolution, random_state=seed)
    return np.array([part[v] for v in range(g.number_of_nodes())], dtype=np.int64)


def run_networkx(g: nx.Graph, resolution: float = 1.0, seed: int = 0) -> np.ndarray:
    comms = nx.community.louvain_communities(g, weight="weight", resolution=resolution, seed=seed)
    return labels_from_communities(comms, g.number_of_nodes())


LIBRARIES: dict[str, Callable[..., np.ndarray]] = {
    "python-louvain 0.16 best_partition": run_python_louvain,
    "networkx louvain_communities": run_networkx,
}


def score(g: nx.Graph, truth: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Modularity (weighted, resolution 1), number of communities, NMI vs the planted partition."""
    return {
        "modularity": nx.community.modularity(g, communities_from_labels(labels), weight="weight"),
        "n_communities": len(np.unique(labels)),
        "nmi": nmi(truth, labels),
    }


def is_monotone(counts: list[float]) -> bool:
    """True when the number of communities never falls as the resolution rises."""
    return all(b >= a for a, b in zip(counts, counts[1:]))


def span(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def size_table(sizes, seeds, mu: float) -> tuple[list[str], list[list]]:
    headers = ["nodes", "edges", "planted", "library", "time (s, median)", "time ratio vs networkx",
               "modularity", "planted modularity", "communities", "NMI vs planted"]
    rows = []
    for n in sizes:
        res = {name: {"t": [], "q": [], "c": [], "nmi": []} for name in LIBRARIES}
        q_true, n_edges = [], []
        for seed in seeds:
            g, truth = planted_graph(n, groups_for(n), mu=mu, seed=seed)
            n_edges.append(g.number_of_edges())
            q_true.append(nx.community.modularity(g, communities_from_labels(truth), weight="weight"))
            for name, fn in LIBRARIES.items():
                t = time.perf_counter()
                lab = fn(g, seed=seed)
                res[name]["t"].append(time.perf_counter() - t)
                s = score(g, truth, lab)
                res[name]["q"].append(s["modularity"])
                res[name]["c"].append(s["n_communities"])
                res[name]["nmi"].append(s["nmi"])
        t_nx = statistics.median(res["networkx louvain_communities"]["t"])
        for name, r in res.items():
            t_med = statistics.median(r["t"])
            rows.append([f"{n:,}", f"{int(np.mean(n_edges)):,}", groups_for(n), name, f"{t_med:.3f}",
                         f"{t_med / t_nx:.2f}x", f"{np.mean(r['q']):.4f}", f"{np.mean(q_true):.4f}",
                         span(r["c"]), f"{np.mean(r['nmi']):.3f}"])
    return headers, rows


def resolution_table(n: int, seeds, mu: float, resolutions=RESOLUTIONS) -> tuple[list[str], list[list], dict[str, bool]]:
    """Communities found per resolution and library (min-max over seeds), and whether each is monotone."""
    counts = {name: {r: [] for r in resolutions} for name in LIBRARIES}
    monotone = {name: True for name in LIBRARIES}
    for seed in seeds:
        g, _ = planted_graph(n, groups_for(n), mu=mu, seed=seed)
        for name, fn in LIBRARIES.items():
            per_r = [len(np.unique(fn(g, resolution=r, seed=seed))) for r in resolutions]
            monotone[name] &= is_monotone(per_r)
            for r, c in zip(resolutions, per_r):
                counts[name][r].append(c)
    headers = ["library"] + [f"r={r:g}" for r in resolutions] + ["monotone in r (every seed)"]
    rows = [[name] + [span(counts[name][r]) for r in resolutions] + ["yes" if monotone[name] else "**no**"]
            for name in LIBRARIES]
    return headers, rows, monotone


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.community", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="sizes 100 and 1,000, one seed")
    ap.add_argument("--mu", type=float, default=0.6, help="mixing: fraction of each node's edges to other communities")
    ap.add_argument("--seeds", type=int, default=None, help="graphs per size (default 3, quick 1)")
    args = ap.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else SIZES
    seeds = range(args.seeds or (1 if args.quick else 3))
    sweep_n = 1000

    warm, _ = planted_graph(50, 2, seed=0)
    for fn in LIBRARIES.values():  # imports and first-call costs out of the timings
        fn(warm)
    h1, r1 = size_table(sizes, seeds, args.mu)
    h2, r2, mono = resolution_table(sweep_n, seeds, args.mu)
    text = "\n".join([
        "## Louvain: python-louvain vs networkx" + (" (quick)" if args.quick else ""),
        "",
        f"Weighted planted-partition graphs (`networkx.random_partition_graph`, expected degree 20, "
        f"mixing mu={args.mu}: that share of each node's edges leaves its community; intra weights U(0.5,1), "
        f"inter U(0.1,0.6)); {len(seeds)} graph(s) per size, same seed for both libraries. "
        "Modularity is `nx.community.modularity` (weighted, resolution 1) of the partition found; "
        "'planted modularity' is that of the true partition.",
        "",
        markdown_table(h1, r1),
        "",
        f"### Resolution sweep ({sweep_n:,} nodes, {groups_for(sweep_n)} planted communities): communities found (min-max over seeds)",
        "",
        markdown_table(h2, r2),
        "",
        ("python-louvain's resolution is **not monotone**: at low resolution it returns many small communities "
         "instead of few large ones. Its node moves scale the null-model term by r, but the modularity it uses "
         "to decide when to stop scales the within-community term by r instead (`community_louvain.py`, "
         "`__one_level` vs `__modularity`), so below r=1 it stops after the first level. networkx's resolution "
         "is monotone; prefer it, or guard whichever is used with a monotonicity test."
         if not mono["python-louvain 0.16 best_partition"] else
         "Both libraries were monotone on these graphs."),
        "",
    ])
    write_result("community" + ("-quick" if args.quick else ""), text)
    return text


if __name__ == "__main__":
    main()
