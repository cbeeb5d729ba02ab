"""Choosing K from the data (selflabel.kselect) on synthetic mixtures with known K."""
from __future__ import annotations

import numpy as np
import torch

from selflabel.affinity import affinity_graph, knn_indices, modularity
from selflabel.kselect import choose_k
from test_longtail import mixture


def test_chosen_k_on_a_long_tailed_mixture():
    props = [0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.05]
    x, _ = mixture(props, n=1200, spread=0.8, seed=5)
    sel = choose_k(x, seed=0)
    assert abs(sel.k - len(props)) <= 0.3 * len(props), sel.reason
    assert f"K = {sel.k}" in sel.reason and "modularity" in sel.reason
    ks = [c["k"] for c in sel.candidates]
    assert ks == list(range(2, ks[-1] + 1))
    best = max(sel.candidates, key=lambda c: c["modularity"])
    assert best["k"] == sel.k
    assert sel.to_dict()["candidates"] == sel.candidates


def test_chosen_k_follows_the_data():
    """Three groups give a small K, not the eight of the test above: the curve is not a constant."""
    x, _ = mixture([0.5, 0.3, 0.2], n=900, spread=0.8, seed=6)
    assert choose_k(x, seed=0).k == 3


def test_small_folder_links_images_to_a_cluster_s_worth_of_neighbours():
    """Ten groups of ten: the graph takes N // K0 = 3 neighbours, not 10 (half of them strangers, whose
    links merged groups: 8-9 of 10 found), and K is right for every draw."""
    from selflabel.kselect import graph_neighbors

    assert graph_neighbors(10, 100, 33) == 3 and graph_neighbors(10, 4000, 40) == 10
    assert graph_neighbors(10, 40, 13) == 3 and graph_neighbors(10, 3, 1) == 2  # the floor; never n or more
    for seed in range(3):
        x, _ = mixture([0.1] * 10, n=100, spread=0.6, seed=seed)
        sel = choose_k(x, seed=0)
        assert sel.k == 10, (seed, sel.reason)
        assert "3-nearest-neighbour graph of 100 images" in sel.reason


def test_identical_images_give_one_cluster():
    x = torch.zeros(40, 16)  # a folder of copies: all features equal, zero after centring
    sel = choose_k(x, seed=0)
    assert sel.k == 1 and "distinct" in sel.reason
    assert choose_k(torch.ones(3, 4) / 2, seed=0).k == 1  # too few images to split


def test_modularity_of_known_graphs():
    w = np.zeros((4, 4))
    w[0, 1] = w[1, 0] = w[2, 3] = w[3, 2] = 1.0
    assert abs(modularity(w, np.array([0, 0, 1, 1])) - 0.5) < 1e-12  # two disjoint edges
    assert abs(modularity(w, np.array([0, 0, 0, 0]))) < 1e-12  # one group: zero by definition
    assert modularity(w, np.array([0, 1, 0, 1])) < 0


def test_knn_and_affinity_graph():
    x = torch.nn.functional.normalize(torch.tensor([[1, 0.0], [0.99, 0.1], [0, 1.0], [0.1, 0.99]]), dim=1)
    nbrs = knn_indices(x, 1)  # (chunking is knn_exact's, tested in test_neighbors.py)
    assert nbrs[:, 0].tolist() == [1, 0, 3, 2]
    w = affinity_graph(np.array([0, 0, 1, 1]), nbrs.numpy(), 2)
    np.testing.assert_allclose(w, [[2, 0], [0, 2]])
