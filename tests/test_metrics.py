import numpy as np
import pytest

from selflabel.metrics import cluster_metrics, confusion, hungarian_accuracy, miou_hungarian, miou_overcluster


def test_perfect_clustering_under_permutation():
    y = np.repeat(np.arange(4), 25)
    pred = (y + 1) % 4
    m = cluster_metrics(y, pred)
    assert m["accuracy"] == pytest.approx(1.0)
    assert m["nmi"] == pytest.approx(1.0)
    assert m["ari"] == pytest.approx(1.0)


def test_hungarian_accuracy_known_value():
    y = np.array(["a", "a", "a", "b", "b", "b"])
    pred = np.array([0, 0, 1, 1, 1, 1])
    assert hungarian_accuracy(y, pred) == pytest.approx(5 / 6)


def test_hungarian_is_one_to_one():
    y = np.array([0, 1, 2, 3])
    pred = np.zeros(4)
    assert hungarian_accuracy(y, pred) == pytest.approx(0.25)


def test_miou_perfect_and_void():
    gt = np.array([[0, 0, 1, 1], [2, 2, 11, 11]])
    pred = np.array([[5, 5, 3, 3], [7, 7, 0, 1]])
    conf = confusion(gt, pred, n_classes=3, n_clusters=8, void=11)
    assert conf.sum() == 6  # void pixels ignored
    assert miou_hungarian(conf)[0] == pytest.approx(1.0)
    assert miou_overcluster(conf)[0] == pytest.approx(1.0)


def test_overcluster_beats_hungarian_when_classes_split():
    gt = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    conf = confusion(gt, pred, n_classes=2, n_clusters=4)
    h, _ = miou_hungarian(conf)
    o, _ = miou_overcluster(conf)
    assert h == pytest.approx(0.5)  # each class gets half its pixels
    assert o == pytest.approx(1.0)
