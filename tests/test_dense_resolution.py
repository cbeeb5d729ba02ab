"""The label-free Louvain resolution (selflabel.dense.resolution): stable partitions across seeds."""
import networkx as nx
import numpy as np
import pytest

from selflabel.dense.resolution import choose_resolution, stability_curve

GRID = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]


def _planted(n_groups=4, size=10, p_in=0.7, p_out=0.05, seed=0):
    rng = np.random.default_rng(seed)
    grp = np.repeat(np.arange(n_groups), size)
    g = nx.Graph()
    g.add_nodes_from(range(len(grp)))
    for i in range(len(grp)):
        for j in range(i + 1, len(grp)):
            if rng.random() < (p_in if grp[i] == grp[j] else p_out):
                g.add_edge(i, j, weight=1.0)
    return g, grp


def test_picks_a_resolution_that_recovers_the_planted_communities():
    g, grp = _planted()
    curve = stability_curve(g, GRID, seed=0, n_seeds=8)
    chosen = choose_resolution(curve, g)
    point = next(c for c in curve if c["resolution"] == chosen)
    assert point["n_concepts"] == 4
    assert point["stability"] == pytest.approx(1.0)
    assert chosen in (0.5, 1.0, 2.0)
    # the curve: finer than the planted scale Louvain splits groups differently per seed
    assert curve[-1]["stability"] < 0.95 and curve[-1]["n_concepts"] > 4
    # the trivial scale (one community) is as stable but is not a candidate
    assert curve[0]["n_concepts"] == 1 and curve[0]["stability"] == 1.0 and chosen != GRID[0]


def test_same_seed_same_choice_and_curve():
    g, _ = _planted(n_groups=5, size=8, p_in=0.5, p_out=0.08, seed=3)
    a = stability_curve(g, GRID, seed=7, n_seeds=6)
    b = stability_curve(g, GRID, seed=7, n_seeds=6)
    assert a == b
    assert choose_resolution(a, g) == choose_resolution(b, g)


def test_walks_finer_from_resolution_one_while_as_stable():
    g, _ = _planted()
    curve = [{"resolution": 0.5, "stability": 1.0, "modularity": 0.4, "n_concepts": 4},
             {"resolution": 1.0, "stability": 0.90, "modularity": 0.6, "n_concepts": 5},
             {"resolution": 2.0, "stability": 0.95, "modularity": 0.6, "n_concepts": 6},
             {"resolution": 3.0, "stability": 0.945, "modularity": 0.55, "n_concepts": 7},  # within tol: go on
             {"resolution": 4.0, "stability": 0.80, "modularity": 0.5, "n_concepts": 9},  # a drop: stop before it
             {"resolution": 8.0, "stability": 0.99, "modularity": 0.3, "n_concepts": 12}]
    assert choose_resolution(curve, g) == 3.0  # never back to the coarser, more stable 0.5; never past the drop
    assert choose_resolution(list(reversed(curve)), g) == 3.0  # the order of the curve does not matter
    curve[3]["stability"] = 0.93  # now a drop of 0.02 > tol at 3.0
    assert choose_resolution(curve, g) == 2.0
    assert choose_resolution(curve, g, start=0.5) == 0.5  # 0.5 -> 1.0 drops: stays at the start
    assert choose_resolution(curve[:1], g) == 0.5  # nothing at or above the start: the finest candidate


def test_trivial_partitions_are_not_candidates():
    g = nx.Graph()
    g.add_nodes_from(range(6))
    g.add_edges_from([(0, 1, {"weight": 1.0}), (1, 2, {"weight": 1.0}), (3, 4, {"weight": 1.0}), (4, 5, {"weight": 1.0})])
    curve = [{"resolution": 0.5, "stability": 1.0, "modularity": 0.5, "n_concepts": 2},  # = the 2 components
             {"resolution": 1.0, "stability": 0.8, "modularity": 0.3, "n_concepts": 3},
             {"resolution": 9.0, "stability": 1.0, "modularity": -0.1, "n_concepts": 6}]  # singletons
    assert choose_resolution(curve, g) == 1.0
