"""The merge of the over-clustering into K (selflabel.imbalanced stage 2) and the graph maths under it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from selflabel.affinity import modularity_merge
from selflabel.errors import InputError
from selflabel.imbalanced import (MERGE_AUTO_IMAGES, cluster_sums, estimated_marginal_cluster, merge_by_links,
                                  merge_clusters)

from test_longtail import mixture


def curved_class_and_blob(seed: int):
    """A class spread along a 175 degree arc of the unit circle (12 small clusters along it) and a
    compact class 40 degrees past its end (4 small clusters): the arc's far end is nearer the blob
    than its near end, so merging by the small clusters' means can cut the arc; its neighbour links
    run along it."""
    rng = np.random.default_rng(seed)
    arc, blob = rng.uniform(0, 175, 600), 215 + rng.normal(0, 6, 200)

    def on_circle(deg):
        t = np.deg2rad(deg)
        p = np.stack([np.cos(t), np.sin(t), 0.02 * rng.standard_normal(len(t))], 1)
        return p / np.linalg.norm(p, axis=1, keepdims=True)

    x = torch.tensor(np.concatenate([on_circle(arc), on_circle(blob)]), dtype=torch.float32)
    small = np.concatenate([np.minimum((arc / (175 / 12)).astype(int), 11),
                            12 + np.clip(((blob - 195) / 10).astype(int), 0, 3)])
    return x, small, np.array([0] * 12 + [1] * 4)


def test_links_keep_a_curved_class_whole_where_the_means_cut_it():
    same = lambda g, truth: len({(a, b) for a, b in zip(g, truth)}) == 2  # equal up to renaming
    means_cut = 0
    for seed in range(8):
        x, small, truth = curved_class_and_blob(seed)
        sums, counts = cluster_sums(x, torch.as_tensor(small), 16)
        assert same(merge_by_links(x, small, counts.numpy(), 2), truth), seed
        means_cut += not same(merge_clusters(sums.numpy(), counts.numpy(), 2), truth)
    assert means_cut >= 2  # why the link merge exists: average linkage of the means cuts the arc


def test_modularity_merge_joins_the_densely_linked_blocks():
    w = np.full((6, 6), 0.1)
    w[:3, :3] = w[3:, 3:] = 5.0
    g = modularity_merge(w, 2)
    assert len(set(g[:3])) == 1 and len(set(g[3:])) == 1 and g[0] != g[3]


def test_modularity_merge_gives_exactly_k_groups_on_a_disconnected_graph():
    w = np.zeros((10, 10))
    for b in range(5):  # five separate pairs: CNM alone cannot go below 5 communities
        w[2 * b, 2 * b + 1] = w[2 * b + 1, 2 * b] = 1.0
    g = modularity_merge(w, 3)
    assert sorted(np.unique(g)) == [0, 1, 2]
    assert all(g[2 * b] == g[2 * b + 1] for b in range(5))  # no linked pair torn apart


def test_auto_merge_takes_links_for_thin_small_clusters_and_means_for_full_or_tiny_ones():
    props = [0.4, 0.3, 0.2, 0.1]
    k = len(props)
    lo, hi = MERGE_AUTO_IMAGES
    thin = 6 * k * (hi - 5)  # 15 images per small cluster
    full = 6 * k * (hi + 10)
    tiny = 6 * k * (lo - 3)  # 2 images per small cluster
    for n, expect in ((thin, "auto: modularity"), (full, "auto: average"), (tiny, "auto: average")):
        x, _ = mixture(props, n=n, seed=1)
        assert estimated_marginal_cluster(x, k, seed=0).info["merge"] == expect


def test_link_merge_recovers_unequal_proportions_and_is_deterministic():
    x, y = mixture([0.5, 0.25, 0.15, 0.1], n=480, seed=2)  # 20 small clusters of 24: enough to check sizes
    a = estimated_marginal_cluster(x, 4, seed=3, merge="modularity")
    b = estimated_marginal_cluster(x, 4, seed=3, merge="modularity")
    assert torch.equal(a.labels, b.labels)
    sizes = np.sort(np.bincount(a.labels.numpy(), minlength=4))[::-1] / len(y)
    assert np.abs(sizes - [0.5, 0.25, 0.15, 0.1]).sum() / 2 < 0.05, sizes


def test_unknown_merge_is_refused():
    x, _ = mixture([0.5, 0.5], n=100)
    with pytest.raises(InputError, match="cluster.merge='ward' must be one of auto, modularity, average"):
        estimated_marginal_cluster(x, 2, merge="ward")


def test_unknown_merge_in_the_config_is_one_line_before_any_work():
    from selflabel.config import load_config

    with pytest.raises(InputError, match=r"cluster.merge: 'ward' is not allowed \(choose auto, modularity, average\)"):
        load_config(None, ["cluster.merge=ward"])
