import numpy as np
import torch

from selflabel.dense.parts import fit_part_prototypes, part_scores
from selflabel.kmeans import kmeanspp_init
from selflabel.metrics import hungarian_accuracy


def _blobs(k: int, n_per: int, d: int = 16, noise: float = 0.15, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.repeat(np.arange(k), n_per)
    x = centres[y] + noise * rng.standard_normal((len(y), d))
    return x.astype(np.float32), y


def test_recovers_separated_clusters():
    x, y = _blobs(6, 80)
    model = fit_part_prototypes(x, 6, eps=0.05, iters=30, seed=0)
    pred = part_scores(x[None], model.prototypes)[:, 0].argmax(0).numpy()
    assert hungarian_accuracy(y, pred) == 1.0
    np.testing.assert_allclose(np.linalg.norm(model.prototypes, axis=1), 1.0, atol=1e-5)
    assert model.info["empty_clusters"] == 0


def test_overclustering_is_balanced_and_nested():
    """K = 4 x the true clusters: Sinkhorn keeps every prototype in use (no empty parts), and each part
    stays inside one true cluster."""
    x, y = _blobs(5, 120, seed=1)
    model = fit_part_prototypes(x, 20, eps=0.05, iters=30, seed=0)
    pred = part_scores(x[None], model.prototypes)[:, 0].argmax(0).numpy()
    sizes = np.bincount(pred, minlength=20)
    assert (sizes > 0).all()
    assert sizes.max() <= 3 * len(x) / 20
    purity = sum(np.bincount(y[pred == p]).max() for p in range(20)) / len(y)
    assert purity == 1.0


def test_deterministic_given_seed():
    x, _ = _blobs(4, 50, seed=2)
    a = fit_part_prototypes(x, 8, seed=3).prototypes
    b = fit_part_prototypes(x, 8, seed=3).prototypes
    np.testing.assert_array_equal(a, b)


def test_part_scores_are_cosines():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 4, 8)).astype(np.float32)
    c = rng.standard_normal((5, 8)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    s = part_scores(z, c).numpy()
    assert s.shape == (5, 3, 4)
    ref = np.einsum("hwd,kd->khw", z / np.linalg.norm(z, axis=-1, keepdims=True), c)
    np.testing.assert_allclose(s, ref, atol=1e-5)


def test_kmeanspp_picks_distinct_points():
    x, _ = _blobs(3, 30, noise=0.01)
    xt = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    c = kmeanspp_init(xt, 3, torch.Generator().manual_seed(0))
    sims = (c @ c.T).numpy()
    assert (sims[~np.eye(3, dtype=bool)] < 0.9).all()  # one seed per blob
