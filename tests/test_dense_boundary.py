"""Boundary F-measure (selflabel.metrics.boundary_fscore) on hand-made maps, and its mean in the dense evaluation."""
import numpy as np
import pytest

from selflabel.dense.evaluate import boundary_tolerance, mean_boundary_f
from selflabel.metrics import boundary_fscore


def _split(col: int, shape=(20, 30)) -> np.ndarray:
    m = np.zeros(shape, np.int64)
    m[:, col:] = 1
    return m


def test_perfect_maps_score_one():
    gt = _split(12)
    assert boundary_fscore(gt, gt, 2) == (1.0, 1.0, 1.0)
    assert boundary_fscore(gt, gt + 5, 2) == (1.0, 1.0, 1.0)  # label ids do not matter, only where they change


def test_shift_within_and_beyond_the_tolerance():
    gt = _split(12)
    assert boundary_fscore(gt, _split(14), 2)[0] == 1.0  # 2 px off: matched
    f, p, r = boundary_fscore(gt, _split(15), 2)  # 3 px off: nothing matches
    assert (f, p, r) == (0.0, 0.0, 0.0)
    assert boundary_fscore(gt, _split(15), 3)[0] == 1.0


def test_known_value_with_a_spurious_boundary():
    gt = _split(12)
    pred = gt.copy()
    pred[:, 24:] = 2  # the true boundary plus one more, as long: precision 1/2, recall 1
    f, p, r = boundary_fscore(gt, pred, 2)
    assert p == pytest.approx(0.5) and r == 1.0 and f == pytest.approx(2 / 3)


def test_known_value_with_a_missed_boundary():
    gt = np.zeros((20, 30), np.int64)
    gt[:10, :20] = 1
    gt[:, 20:] = 2  # boundary pixels: row 9, columns 0-19, and column 19, rows 0-19: 39 pixels
    pred = np.zeros_like(gt)
    pred[:10] = 1  # row 9 across all 30 columns
    f, p, r = boundary_fscore(gt, pred, 1)
    assert p == pytest.approx(21 / 30)  # columns 0-20 lie within 1 px of the true boundary, 21-29 do not
    assert r == pytest.approx(22 / 39)  # row 9 (20 px) and column 19 at rows 8 and 10
    assert f == pytest.approx(2 * p * r / (p + r))


def test_void_is_ignored():
    gt = _split(12)
    gt[:, 20:] = 255  # a void band: its border is no boundary
    pred = _split(12)
    pred[:, 25:] = 7  # a boundary inside void does not count, nor does the void band's border
    assert boundary_fscore(gt, pred, 1, void=255) == (1.0, 1.0, 1.0)
    f, p, r = boundary_fscore(gt, pred, 1)  # without void: both count, and neither is matched
    assert p < 1.0 and r < 1.0


def test_empty_boundaries():
    flat = np.zeros((10, 10), np.int64)
    assert boundary_fscore(flat, flat, 2) == (1.0, 1.0, 1.0)
    assert boundary_fscore(flat, _split(5, (10, 10)), 2)[0] == 0.0
    assert boundary_fscore(_split(5, (10, 10)), flat, 2)[0] == 0.0
    with pytest.raises(ValueError):
        boundary_fscore(flat, flat[:5], 2)


def test_mean_over_images_and_diagonal_tolerance():
    assert boundary_tolerance((360, 480)) == 5.0  # ceil(0.0075 * 600), as DAVIS rounds
    assert boundary_tolerance((48, 64)) == 1.0
    gts = [_split(12), _split(12)]
    res = mean_boundary_f(gts, [_split(12), _split(20)], void=None)
    assert res["f"] == pytest.approx(0.5)
