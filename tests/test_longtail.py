"""Cluster sizes estimated inside the label step (selflabel.marginals, selflabel.imbalanced), on
synthetic mixtures on the sphere with known unequal proportions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selflabel.errors import InputError
from selflabel.imbalanced import (canonical_order, estimated_cluster_prepared, estimated_marginal_cluster, merge_clusters,
                                  transport_kmeans)
from selflabel.marginals import (estimate_marginal, fixed_point_marginal, floor_marginal, total_variation,
                                 validate_prior)
from selflabel.ot import sinkhorn

PROPS = [0.42, 0.22, 0.14, 0.09, 0.06, 0.04, 0.03]  # long tail, ratio 14


def mixture(props, n=1400, dim=24, spread=1.0, seed=0):
    """Unit vectors around len(props) random unit centres; class j holds round(props[j] * n) rows."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(len(props), dim, generator=g, dtype=torch.float64), dim=1)
    counts = [max(1, round(p * n)) for p in props]
    y = torch.cat([torch.full((c,), j) for j, c in enumerate(counts)])
    x = F.normalize(centres[y] + spread * torch.randn(len(y), dim, generator=g, dtype=torch.float64) / dim ** 0.5, dim=1)
    return x.float(), y.numpy()


def matched_sizes(y, labels, k):
    """Cluster proportions matched to classes (Hungarian), in class order."""
    from scipy.optimize import linear_sum_assignment

    cont = np.zeros((k, k))
    np.add.at(cont, (y, labels), 1)
    r, c = linear_sum_assignment(-cont)
    est = np.bincount(labels, minlength=k) / len(y)
    out = np.zeros(k)
    out[r] = est[c]
    return out, cont[r, c].sum() / len(y)


def true_props(y, k):
    return np.bincount(y, minlength=k) / len(y)


# ---------------------------------------------------------------- the estimated marginal


@pytest.fixture(scope="module")
def longtail_fit():
    x, y = mixture(PROPS)
    return x, y, estimated_marginal_cluster(x, len(PROPS), seed=0)


def test_estimated_sizes_match_unequal_proportions(longtail_fit):
    x, y, fit = longtail_fit
    k = len(PROPS)
    sizes, acc = matched_sizes(y, fit.labels.numpy(), k)
    assert total_variation(sizes, true_props(y, k)) < 0.05
    assert acc > 0.95
    # the column marginal of the last label step is itself the estimate (within the same TV)
    est = np.sort(fit.marginal.numpy())[::-1]
    assert total_variation(est, np.sort(true_props(y, k))[::-1]) < 0.05


def test_balanced_label_step_gets_these_proportions_wrong():
    """The baseline this replaces: equal sizes are far from the truth on the same mixture."""
    x, y = mixture(PROPS)
    k = len(PROPS)
    g = torch.Generator().manual_seed(0)
    fit = transport_kmeans(x, x[torch.randperm(len(x), generator=g)[:k]], eps=0.05)
    sizes, _ = matched_sizes(y, fit.labels.numpy(), k)
    assert total_variation(sizes, true_props(y, k)) > 0.2


def test_balanced_mixture_stays_balanced():
    x, y = mixture([1 / 6] * 6, n=1200, seed=3)
    fit = estimated_marginal_cluster(x, 6, seed=3)
    sizes, acc = matched_sizes(y, fit.labels.numpy(), 6)
    assert acc > 0.97
    assert total_variation(sizes, true_props(y, 6)) < 0.03


def test_label_step_marginals_within_tolerance(longtail_fit):
    """Rows sum to 1/N and columns to the estimated b (the transport's own tolerance)."""
    x, y, fit = longtail_fit
    n = len(x)
    np.testing.assert_allclose(fit.plan.sum(1).double().numpy(), 1.0 / n, rtol=1e-4)
    # columns: the label step's tolerance, ||P^T 1 - b||_2 <= 1e-3 / sqrt(K) (sizes within 0.1 %)
    assert np.linalg.norm(fit.plan.sum(0).double().numpy() - fit.marginal.numpy()) <= 1e-3 / len(PROPS) ** 0.5
    assert math.isclose(float(fit.marginal.sum()), 1.0, rel_tol=1e-9)


def test_estimate_marginal_is_the_posterior_mean():
    """Peaked scores: every row's posterior is one-hot, so the estimate is the label histogram."""
    labels = torch.tensor([0] * 6 + [1] * 3 + [2])
    scores = F.one_hot(labels, 3).float()
    b = estimate_marginal(scores, torch.full((3,), 1 / 3, dtype=torch.float64), eps=0.01)
    np.testing.assert_allclose(b.numpy(), [0.6, 0.3, 0.1], atol=1e-12)
    # flat scores keep the prior: the EM update's fixed point
    prior = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    np.testing.assert_allclose(estimate_marginal(torch.zeros(10, 3), prior, eps=0.05).numpy(), prior.numpy(), atol=1e-12)


def test_sinkhorn_with_estimated_marginal_hits_it():
    x, _ = mixture(PROPS, seed=2)
    protos = F.normalize(torch.randn(len(PROPS), x.shape[1], generator=torch.Generator().manual_seed(2)), dim=1)
    scores = x @ protos.T
    b = floor_marginal(estimate_marginal(scores, torch.full((7,), 1 / 7, dtype=torch.float64), 0.05), 0.1)
    res = sinkhorn(scores.double(), None, b, eps=0.05, tol=1e-9)
    np.testing.assert_allclose(res.plan.sum(0).numpy(), b.numpy(), atol=1e-8)


# ---------------------------------------------------------------- the collapse guard


def test_floor_marginal_raises_small_entries_exactly():
    b = torch.tensor([0.7, 0.25, 0.04, 0.01], dtype=torch.float64)
    out = floor_marginal(b, 0.2)  # floor 0.05
    assert math.isclose(float(out.sum()), 1.0, rel_tol=1e-12)
    assert float(out.min()) >= 0.05 - 1e-15
    np.testing.assert_allclose(out[2:].numpy(), [0.05, 0.05])
    assert math.isclose(float(out[0] / out[1]), 0.7 / 0.25, rel_tol=1e-12)  # the rest scaled together
    np.testing.assert_allclose(floor_marginal(b, 0.0).numpy(), b.numpy())
    untouched = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    np.testing.assert_allclose(floor_marginal(untouched, 0.5).numpy(), untouched.numpy())
    with pytest.raises(ValueError):
        floor_marginal(b, 1.0)


def test_floor_marginal_cascades():
    """Scaling the others down can push one of them under the floor too."""
    b = torch.tensor([0.9, 0.052, 0.048], dtype=torch.float64)
    out = floor_marginal(b, 0.3)  # floor 0.1: both small entries end there
    np.testing.assert_allclose(out.numpy(), [0.8, 0.1, 0.1])


def test_no_cluster_collapses_when_k_exceeds_the_classes():
    """Ten clusters for three real groups: with the floor every cluster keeps min_mass / K of the
    mass (and so a prototype); without it the EM estimate drains clusters below that."""
    x, _ = mixture([0.6, 0.3, 0.1], n=500, seed=4)
    fit = estimated_marginal_cluster(x, 10, seed=4, min_mass=0.2)
    assert float(fit.marginal.min()) >= 0.2 / 10 - 1e-12
    assert torch.isfinite(fit.prototypes).all() and fit.plan.sum(0).min() > 0.2 / 10 * 0.99
    free = estimated_marginal_cluster(x, 10, seed=4, min_mass=0.0)
    assert float(free.marginal.min()) < 0.2 / 10


def test_merge_clusters_groups_near_means():
    sums = np.array([[1, 0, 0], [0.99, 0.1, 0], [0, 1, 0], [0, 0.98, 0.1], [0, 0, 1]], dtype=float)
    group = merge_clusters(sums, np.array([5, 4, 3, 2, 1.0]), 3)
    assert group[0] == group[1] and group[2] == group[3]
    assert len({group[0], group[2], group[4]}) == 3
    # empty small clusters carry no mass and leave the grouping of the others alone
    g2 = merge_clusters(np.vstack([sums, np.zeros((1, 3))]), np.array([5, 4, 3, 2, 1.0, 0]), 3)
    assert list(g2[:5]) == list(group)


def test_canonical_order_by_size_then_first_image():
    labels = torch.tensor([3, 1, 1, 0, 3, 0, 1, 3])  # sizes: 0:2, 1:3, 3:3, 2:0 (empty)
    order = canonical_order(labels, 4)
    assert order.tolist() == [3, 1, 0, 2]  # 3 and 1 tie at 3 images: 3 holds image 0; the empty cluster last
    renumbered = torch.argsort(order)[labels]
    assert renumbered.tolist() == [0, 1, 1, 2, 0, 2, 1, 0]
    # a permuted numbering of the same partition gives the same canonical labels
    perm = torch.tensor([2, 0, 3, 1])
    again = perm[labels]
    assert (torch.argsort(canonical_order(again, 4))[again] == renumbered).all()


def test_estimated_clusters_are_numbered_largest_first(longtail_fit):
    x, y, _ = longtail_fit
    res = estimated_cluster_prepared(x, len(PROPS), seed=0)
    sizes = np.bincount(res.labels, minlength=len(PROPS))
    assert (np.diff(sizes) <= 0).all(), sizes
    # the estimated sizes travel with the renumbering: the largest estimate is cluster 0's
    assert int(np.argmax(res.info["estimated_sizes"])) == 0
    np.testing.assert_allclose(res.info["estimated_sizes"], sizes / len(x), atol=0.03)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("prior, k, words", [
    ([0.5, 0.5], 3, "2 entries but k = 3"),
    ([0.5, -0.1, 0.6], 3, "negative"),
    ([0, 0, 0], 3, "all zero"),
    ([0.5, float("nan"), 0.5], 3, "NaN"),
    ([0.5, float("inf"), 0.5], 3, "infinite"),
    ([0.5, 0.0, 0.5], 3, "zero entry"),
    (["a", 1, 2], 3, "list of 3 numbers"),
])
def test_validate_prior_rejects(prior, k, words):
    with pytest.raises(InputError, match=words) as err:
        validate_prior(prior, k)
    assert "\n" not in str(err.value) and "cluster.prior" in str(err.value)


def test_validate_prior_normalises():
    np.testing.assert_allclose(validate_prior([2, 1, 1], 3).numpy(), [0.5, 0.25, 0.25])


@pytest.mark.parametrize("k", [0, 101])
def test_k_out_of_range(k):
    x, _ = mixture([0.5, 0.5], n=100)
    with pytest.raises(InputError, match="between 1 and the number of images"):
        estimated_marginal_cluster(x, k)


def test_identical_rows_do_not_crash():
    """A folder of copies of one image: features all equal (zero after centring)."""
    x = torch.zeros(50, 8)
    fit = estimated_marginal_cluster(x, 3, seed=0)
    assert fit.labels.shape == (50,)
    assert torch.isfinite(fit.marginal).all()


def test_fixed_point_marginal_of_fixed_scores():
    """Scores that point every row to its class: the EM fixed point is the class histogram."""
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    scores = F.one_hot(labels, 3).float() * 0.5
    b = fixed_point_marginal(scores, 0.05, 0.0)
    np.testing.assert_allclose(b.numpy(), [0.5, 0.3, 0.2], atol=1e-3)
    assert float(fixed_point_marginal(scores, 0.05, 0.9).min()) >= 0.3 - 1e-12  # the floor holds


# ---------------------------------------------------------------- SeLa's label step


def test_sela_label_steps_estimate_the_sizes():
    from selflabel.config import RunConfig
    from selflabel.train.sela import train_sela

    x, y = mixture(PROPS)
    cfg = RunConfig()
    cfg.cluster.marginal = "estimated"  # the option (the balanced step is the default)
    cfg.sela.epochs = 5
    res = train_sela(x.numpy(), len(PROPS), cfg)
    assert res.info["marginal"] == "estimated"
    sizes, acc = matched_sizes(y, res.labels, len(PROPS))
    assert acc > 0.95 and total_variation(sizes, true_props(y, len(PROPS))) < 0.05
    est = sorted(res.info["estimated_sizes"][len(PROPS)], reverse=True)
    assert total_variation(est, sorted(true_props(y, len(PROPS)), reverse=True)) < 0.05


# ---------------------------------------------------------------- the benchmark's long-tailed draws


def test_benchmark_longtail_subset_profile_and_size_tv():
    from benchmarks.longtail import longtail_subset, proportion_tv

    y = np.repeat(np.arange(10), 100)
    keep = longtail_subset(y, 100, seed=0)
    counts = np.sort(np.bincount(y[keep], minlength=10))[::-1]
    np.testing.assert_array_equal(counts, np.round(100 * 100.0 ** (-np.arange(10) / 9)).astype(int))
    large = lambda s: int(np.bincount(y[longtail_subset(y, 10, seed=s)]).argmax())  # noqa: E731
    assert len({large(s) for s in range(6)}) > 1  # the seed chooses which class is large
    assert np.array_equal(longtail_subset(y, 1, seed=3), np.arange(1000))
    assert proportion_tv(y[keep], y[keep]) == 0.0
    assert abs(proportion_tv(np.array([0, 0, 0, 1]), np.array([0, 1, 0, 1])) - 0.25) < 1e-12
