import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from selflabel.dense import masks
from selflabel.dense.masks import fill_small_regions, overlay, palette, resize_labels, small_region_mask, upsampled_argmax


def test_upsampled_argmax_matches_full_interpolation(monkeypatch):
    torch.manual_seed(0)
    s = torch.randn(7, 5, 6)
    ref = F.interpolate(s[None], size=(23, 31), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    np.testing.assert_array_equal(upsampled_argmax(s, (23, 31)), ref)
    monkeypatch.setattr(masks, "_MAX_UPSAMPLE_FLOATS", 23 * 31 * 2)  # chunks of 2 clusters
    np.testing.assert_array_equal(upsampled_argmax(s, (23, 31)), ref)


def test_resize_labels_nearest():
    m = np.array([[1, 2], [3, 4]])
    np.testing.assert_array_equal(resize_labels(m, (4, 6)), np.kron(m, np.ones((2, 3), int)))
    np.testing.assert_array_equal(resize_labels(np.kron(m, np.ones((2, 3), int)), (2, 2)), m)


def test_fill_small_regions_absorbs_specks():
    lm = np.ones((30, 30), np.int64)
    lm[15:, :] = 2
    lm[5:7, 5:7] = 3  # 4-pixel speck inside region 1
    lm[20, 20] = 1  # 1-pixel speck inside region 2
    lm[0, 29] = 0  # unassigned pixel
    out = fill_small_regions(lm, min_area=10)
    expected = np.ones((30, 30), np.int64)
    expected[15:, :] = 2
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(fill_small_regions(out, 10), out)  # idempotent


def test_fill_small_regions_guarantees_min_area():
    rng = np.random.default_rng(0)
    clean = ndimage.zoom(rng.integers(1, 6, size=(8, 8)), 5, order=0)
    lm = clean.copy()
    lm[rng.random(lm.shape) < 0.05] = 9  # salt noise
    out = fill_small_regions(lm, min_area=20)
    assert not small_region_mask(out, 20).any()
    assert (out > 0).all() and not (out == 9).any()
    assert (out == clean).mean() > 0.9


def test_fill_small_regions_all_small_gives_unassigned():
    lm = np.arange(16).reshape(4, 4) + 1
    assert (fill_small_regions(lm, 2) == 0).all()


def test_palette_and_overlay():
    pal = palette(20)
    assert pal.shape == (20, 3) and pal.dtype == np.uint8
    assert (pal[0] == 0).all()
    assert len({tuple(c) for c in pal[1:]}) == 19
    img = np.full((10, 12, 3), 100, np.uint8)
    lm = np.zeros((10, 12), np.int64)
    lm[:, 6:] = 3
    out = overlay(img, lm, pal, alpha=0.5)
    assert out.shape == img.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :5], img[:, :5])  # unassigned: untouched
    np.testing.assert_array_equal(out[:, 5], 255)  # border
    np.testing.assert_array_equal(out[0, 8], np.round(0.5 * 100 + 0.5 * pal[3].astype(float)).astype(np.uint8))
