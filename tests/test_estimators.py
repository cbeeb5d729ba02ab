"""`selflabel.SinkhornKMeans` passes scikit-learn's estimator checks and clusters like its docstring says."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from selflabel import SelfLabelClustering, SinkhornKMeans
from selflabel.geometry import prepare


# every check of scikit-learn 1.9 applies and passes (check_array_api_input skips itself without SCIPY_ARRAY_API)
# SwAV's default argmax assignment may leave a cluster empty after 3 epochs on check_clustering's 30-odd
# rows, which that check forbids; its balanced final assignment (swav.final_assign=sinkhorn) passes.
@parametrize_with_checks([
    SinkhornKMeans(n_clusters=3, random_state=0),
    SelfLabelClustering(n_clusters=3, overrides=["neighbors.epochs=3", "neighbors.self_label_epochs=1"], random_state=0),
    SelfLabelClustering("sela", 3, overrides=["sela.epochs=3"], random_state=0),
    SelfLabelClustering("swav", 3, overrides=["swav.epochs=3", "swav.final_assign=sinkhorn"], random_state=0),
])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def blobs(n=600, k=4, seed=0):
    x, y = make_blobs(n_samples=n, centers=None if isinstance(n, list) else k, n_features=16, cluster_std=1.0,
                      random_state=seed)
    return x + 5.0, y  # a shared offset, as post-ReLU features have: centring removes it


def test_fit_gives_balanced_clusters_and_predict_the_nearest_centre():
    x, y = blobs()
    km = SinkhornKMeans(n_clusters=4, random_state=0).fit(x)
    assert np.bincount(km.labels_).tolist() == [150, 150, 150, 150]
    assert adjusted_rand_score(y, km.labels_) > 0.99
    np.testing.assert_array_equal(km.predict(x), km.labels_)  # well separated: nearest = balanced
    p = km.predict_proba(x[:10])
    np.testing.assert_allclose(p.sum(1), 1.0)
    np.testing.assert_array_equal(p.argmax(1), km.predict(x[:10]))
    np.testing.assert_allclose(np.linalg.norm(km.cluster_centers_, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(km.mean_, x.mean(0), rtol=1e-5)
    d = km.transform(x[:5])
    np.testing.assert_allclose(d, 1 - prepare(x[:5], km.mean_).numpy() @ km.cluster_centers_.T, atol=1e-5)


def test_prior_sets_the_cluster_sizes_and_random_state_reproduces():
    x, y = blobs(n=[100, 300])  # a small and a large class
    uniform = SinkhornKMeans(n_clusters=2, random_state=1).fit(x)
    assert np.bincount(uniform.labels_).min() >= 170  # pulled towards 200 / 200: the large class is cut
    km = SinkhornKMeans(n_clusters=2, prior=[0.25, 0.75], random_state=1).fit(x)
    assert sorted(np.bincount(km.labels_).tolist()) == [100, 300] and adjusted_rand_score(y, km.labels_) == 1.0
    again = SinkhornKMeans(n_clusters=2, prior=[0.25, 0.75], random_state=1).fit(x)
    np.testing.assert_array_equal(km.labels_, again.labels_)
    with pytest.raises(ValueError, match="prior has 3 entries"):
        SinkhornKMeans(n_clusters=2, prior=[1, 1, 1]).fit(x)
    with pytest.raises(ValueError, match="n_samples=3 should be >= n_clusters=4"):
        SinkhornKMeans(n_clusters=4).fit(x[:3])


def test_the_default_method_is_the_runs():
    """Scripted from Python, the estimator clusters as `selflabel label` does unless told otherwise."""
    from selflabel.config import RunConfig
    from selflabel.methods import cluster_features

    assert SelfLabelClustering().method == RunConfig().cluster.method == "neighbors"
    x, _ = blobs(n=400, k=4)
    est = SelfLabelClustering(n_clusters=4, random_state=0).fit(x)
    cfg = est._config()
    cfg.cluster.k = 4
    np.testing.assert_array_equal(est.labels_, cluster_features(x.astype(np.float32), 4, cfg).labels)


@pytest.mark.parametrize("method", ["neighbors", "sinkhorn", "kmeans", "sela", "swav"])
def test_every_registered_method_as_an_estimator(method):
    x, y = blobs(n=400, k=4)
    est = SelfLabelClustering(method, 4, overrides=["sela.epochs=5", "swav.epochs=5", "neighbors.epochs=5"],
                              random_state=0).fit(x)
    assert adjusted_rand_score(y, est.labels_) > 0.95, method
    assert (est.predict(x) == est.labels_).mean() > 0.95  # the stored geometry places rows as the method did
    assert est.geometry_.method == method and est.cluster_centers_.shape == (4, 16)
    with pytest.raises(ValueError, match="unknown method"):
        SelfLabelClustering("dbscan", 4).fit(x)
