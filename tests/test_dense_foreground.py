import numpy as np
import pytest

from selflabel.dense.foreground import cluster_fg_precision, noisy_foreground, otsu_threshold, select_foreground


def test_noisy_foreground_keeps_the_salient_blob():
    s = np.full((14, 14), 0.01)
    s[4:8, 6:10] = 1.0  # 16 salient patches hold ~94% of the mass
    fg = noisy_foreground(s, mass=0.65, blur_sigma=0.0)
    assert fg[4:8, 6:10].mean() > 0.6
    assert not fg[~np.pad(np.ones((4, 4), bool), ((4, 6), (6, 4)))].any()


def test_noisy_foreground_mass_fraction_and_floor():
    rng = np.random.default_rng(0)
    s = rng.random((20, 20))
    fg = noisy_foreground(s + 100.0, mass=0.5, blur_sigma=0.0, min_patches=1)  # a constant floor is removed
    kept = (s - s.min())[fg].sum() / (s - s.min()).sum()
    assert 0.5 <= kept < 0.5 + (s.max() - s.min()) / (s - s.min()).sum() + 1e-9
    assert noisy_foreground(np.ones((5, 5))).sum() == 0  # no contrast, no foreground
    with pytest.raises(ValueError):
        noisy_foreground(s, mass=0.0)


def test_noisy_foreground_drops_specks():
    s = np.zeros((10, 10))
    s[1:4, 1:4] = 1.0
    s[8, 8] = 1.0  # isolated patch
    fg = noisy_foreground(s, mass=1.0, blur_sigma=0.0)
    assert fg[1:4, 1:4].all() and not fg[8, 8]


def test_cluster_precision_by_hand():
    parts = [np.array([[0, 0, 1, 1]]), np.array([[0, 2, 2, 2]])]
    fg = [np.array([[True, False, True, True]]), np.array([[True, True, False, False]])]
    prec, n_img = cluster_fg_precision(parts, fg, 4)
    np.testing.assert_allclose(prec, [(0.5 + 1.0) / 2, 1.0, 1 / 3, 0.0])
    np.testing.assert_array_equal(n_img, [2, 1, 1, 0])
    np.testing.assert_array_equal(select_foreground(prec, 0.5), [True, True, False, False])


def test_otsu_cut_falls_in_the_valley_of_bimodal_precisions():
    rng = np.random.default_rng(0)
    low, high = rng.uniform(0.0, 0.15, 40), rng.uniform(0.7, 1.0, 25)
    t = otsu_threshold(np.concatenate([high, low]))
    assert low.max() < t < high.min() and t == pytest.approx((low.max() + high.min()) / 2)
    assert otsu_threshold(np.concatenate([low, high])) == t  # order-free, deterministic
    np.testing.assert_array_equal(select_foreground(np.r_[low, high], t), np.r_[np.zeros(40, bool), np.ones(25, bool)])
    assert otsu_threshold([0.3, 0.3, 0.3]) == 0.3  # nothing to cut
    # by hand: {0, 0.1} | {0.8, 0.9, 1.0} beats every other cut
    assert otsu_threshold([0.0, 0.1, 0.8, 0.9, 1.0]) == pytest.approx(0.45)
