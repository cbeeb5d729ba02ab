import networkx as nx
import numpy as np
import pytest

from selflabel.dense.graph import (
    adjacency_counts,
    build_graph,
    cooccurrence,
    graph_json,
    load_graph,
    louvain_partition,
    merge_parts,
)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renaming of the groups."""
    return len(set(zip(a.tolist(), b.tolist()))) == len(set(a.tolist())) == len(set(b.tolist()))


def _planted_cooccurrence(sizes=(4, 3, 5), inside=0.8, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A row-stochastic co-occurrence matrix where clusters co-occur mostly within their group."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    k = len(truth)
    same = truth[:, None] == truth[None, :]
    adj = np.where(same, inside, 1 - inside) * (0.5 + rng.random((k, k)))
    np.fill_diagonal(adj, 0)
    adj /= adj.sum(1, keepdims=True)
    return adj, truth


def test_adjacency_counts_by_hand():
    m = np.array([[0, 0, 1],
                  [0, 0, 1]])
    c = adjacency_counts(m, 2, distances=(1,))
    # ordered pairs at distance 1 along (0,1), (1,1), (1,0), (1,-1), then counted both ways:
    # 0-0: 2 + 1 + 2 + 1 = 6; 0-1: 2 + 1 (horizontal, diagonal) + 1 (anti-diagonal 1-0); 1-1: 1 (vertical)
    assert c[0, 1] == c[1, 0] == 4
    assert c[0, 0] == 2 * 6
    assert c[1, 1] == 2 * 1
    assert (c == c.T).all()


def test_cooccurrence_rows_are_stochastic():
    rng = np.random.default_rng(1)
    maps = [rng.integers(0, 6, size=(12, 15)) for _ in range(4)]
    maps.append(np.full((5, 5), 5))  # cluster 5 alone in an image: no neighbours there
    adj = cooccurrence(maps, 7)
    np.testing.assert_allclose(adj[:6].sum(1), 1.0)
    assert adj[6].sum() == 0  # never appears
    assert np.all(np.diag(adj) == 0)


def test_edge_weight_is_min_of_both_directions_above_threshold():
    adj = np.array([[0.0, 0.9, 0.1], [0.05, 0.0, 0.95], [0.5, 0.5, 0.0]])
    g = build_graph(adj, threshold=0.08)
    assert not g.has_edge(0, 1)  # 0 -> 1 strong, 1 -> 0 below threshold
    assert g[0][2]["weight"] == pytest.approx(0.1)
    assert g[1][2]["weight"] == pytest.approx(0.5)
    g0 = build_graph(adj, threshold=0.0)
    assert g0[0][1]["weight"] == pytest.approx(0.05)
    assert g0.number_of_nodes() == 3


@pytest.mark.parametrize("method", ["networkx", "python-louvain"])
def test_merge_recovers_hand_made_communities(method):
    adj, truth = _planted_cooccurrence()
    concepts, g, q = merge_parts(adj, resolution=1.0, method=method, n_seeds=3)
    assert _same_partition(concepts, truth)
    assert q > 0.2
    assert concepts[0] == 0  # ids numbered by smallest member


def test_foreground_split_never_mixes_kinds():
    adj, truth = _planted_cooccurrence(sizes=(6, 6))
    fg = np.zeros(12, bool)
    fg[:3] = True  # first half of group 0 is "foreground"
    concepts, g, _ = merge_parts(adj, fg, resolution=1.0)
    assert not any(fg[u] != fg[v] for u, v in g.edges)
    for c in np.unique(concepts):
        assert len(set(fg[concepts == c])) == 1
    assert len(np.unique(concepts)) == 3


def test_isolated_nodes_are_their_own_concept():
    adj, truth = _planted_cooccurrence()
    adj = np.pad(adj, ((0, 1), (0, 1)))
    concepts, _, _ = merge_parts(adj)
    assert concepts[-1] not in concepts[:-1]
    labels, q = louvain_partition(nx.empty_graph(4))
    assert labels.tolist() == [0, 1, 2, 3] and q == 0.0


def _planted_graph(seed: int) -> nx.Graph:
    g = nx.planted_partition_graph(8, 12, 0.6, 0.05, seed=seed)
    nx.set_edge_attributes(g, 1.0, "weight")
    return g


RESOLUTIONS = [0.05, 0.1, 0.3, 0.6, 1.0, 2.0, 3.0, 5.0, 10.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_number_of_concepts_never_falls_as_resolution_rises(seed):
    g = _planted_graph(seed)
    counts = [int(louvain_partition(g, r, method="networkx")[0].max() + 1) for r in RESOLUTIONS]
    assert counts == sorted(counts), counts
    assert counts[0] <= 2 and counts[RESOLUTIONS.index(1.0)] == 8 and counts[-1] > 30
    adj, _ = _planted_cooccurrence(sizes=(5, 5, 5, 5), seed=seed)
    counts = [int(merge_parts(adj, resolution=r)[0].max() + 1) for r in RESOLUTIONS]
    assert counts == sorted(counts), counts


def test_python_louvain_resolution_is_not_monotone():
    """Documents why networkx is the default (see selflabel.dense.graph)."""
    g = _planted_graph(0)
    low = int(louvain_partition(g, 0.05, method="python-louvain")[0].max() + 1)
    mid = int(louvain_partition(g, 1.0, method="python-louvain")[0].max() + 1)
    assert low > mid


def test_graph_json_round_trip(tmp_path):
    import json

    adj, truth = _planted_cooccurrence()
    concepts, g, q = merge_parts(adj)
    data = graph_json(g, {i: {"concept": int(c)} for i, c in enumerate(concepts)}, resolution=1.0, modularity=q)
    p = tmp_path / "graph.json"
    p.write_text(json.dumps(data))
    g2 = load_graph(p)
    assert g2.graph["resolution"] == 1.0
    assert sorted(g2.nodes) == list(range(len(truth)))
    assert [g2.nodes[i]["concept"] for i in range(len(truth))] == concepts.tolist()
    assert g2.number_of_edges() == g.number_of_edges()
    u, v = next(iter(g.edges))
    assert g2[u][v]["weight"] == pytest.approx(g[u][v]["weight"])
