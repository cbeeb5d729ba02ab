"""Masks that follow edges: SLIC / guided refinement of part scores (selflabel.dense.refine)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selflabel.dense.masks import upsampled_argmax
from selflabel.dense.pipeline import part_map
from selflabel.dense.refine import box_mean, guided_argmax, guided_filter, refined_argmax

H, W, EDGE = 64, 96, 40  # the true edge: columns < 40 red, >= 40 blue


def _two_regions():
    """Left red, right blue; blocky coarse scores (8 x 12 cells of 8 px) whose boundary is at column 48, 8 px off."""
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, :EDGE] = (220, 40, 30)
    rgb[:, EDGE:] = (30, 40, 220)
    rgb = (rgb + np.random.default_rng(0).normal(0, 4, rgb.shape)).clip(0, 255).astype(np.uint8)
    scores = torch.zeros(2, 8, 12)
    scores[0, :, :6] = 1.0
    scores[1, :, 6:] = 1.0
    return rgb, scores


def _edge_column(label_map: np.ndarray) -> float:
    """Mean over rows of the first column of label 1 (label 0 on the left)."""
    return float(np.mean([np.argmax(row == 1) for row in label_map]))


def test_plain_argmax_is_off_by_eight_pixels():
    rgb, scores = _two_regions()
    assert abs(_edge_column(upsampled_argmax(scores, (H, W))) - 48) <= 1


@pytest.mark.parametrize("method,args", [("slic", {"slic_segments_n": 24}),
                                         ("guided", {"guided_radius": 24, "guided_subsample": 2}),
                                         ("guided", {"guided_radius": 24, "guided_subsample": 1})])
def test_refinement_snaps_to_the_true_edge_and_keeps_the_classes(method, args):
    rgb, scores = _two_regions()
    plain = upsampled_argmax(scores, (H, W))
    out = refined_argmax(scores, rgb, method, **args)
    assert out.shape == (H, W)
    assert set(np.unique(out)) == set(np.unique(plain)) == {0, 1}
    assert abs(_edge_column(out) - EDGE) <= 1  # from 8 px off to the edge
    assert (out[:, :EDGE - 2] == 0).all() and (out[:, EDGE + 2:] == 1).all()


def test_refinement_never_brings_in_a_class_the_plain_argmax_lacks():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    scores = torch.randn(12, 5, 7)
    scores[3] -= 10.0  # part 3 wins nowhere
    plain = upsampled_argmax(scores, (40, 56))
    for method in ("slic", "guided"):
        out = refined_argmax(scores, rgb, method, slic_segments_n=30, guided_radius=6, guided_subsample=2)
        assert set(np.unique(out)) <= set(np.unique(plain))
        assert 3 not in out
    assert (refined_argmax(scores, rgb, "none") == plain).all()


@pytest.mark.parametrize("method", ["slic", "guided"])
def test_only_the_channels_of_the_plain_map_compete(method):
    rgb, scores = _two_regions()
    scores = torch.cat([scores, torch.full((1, 8, 12), 5.0)])  # channel 2 beats both everywhere ...
    plain = upsampled_argmax(scores[:2], (H, W))  # ... but the plain map given shows only 0 and 1
    out = refined_argmax(scores, rgb, method, plain=plain, slic_segments_n=24, guided_radius=24, guided_subsample=2)
    assert set(np.unique(out)) == {0, 1}


def test_box_mean_matches_a_direct_window_mean():
    x = torch.randn(2, 9, 11)
    r = 2
    ref = torch.empty_like(x)
    for i in range(9):
        for j in range(11):
            ref[:, i, j] = x[:, max(0, i - r):i + r + 1, max(0, j - r):j + r + 1].mean((1, 2))
    torch.testing.assert_close(box_mean(x, r), ref, rtol=1e-5, atol=1e-5)


def test_guided_argmax_at_full_size_equals_the_guided_filter():
    """subsample 1 and every channel competing: exactly the argmax of He et al.'s filter of the upsampled scores."""
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    scores = torch.randn(5, 6, 8)
    up = F.interpolate(scores[None], size=(30, 40), mode="bilinear", align_corners=False)[0]
    guide = torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)
    ref = guided_filter(guide, up, 3, 0.01).argmax(0).numpy()
    assert (guided_argmax(scores, rgb, 3, 0.01, subsample=1, top=5) == ref).all()


def test_guided_filter_of_a_constant_is_the_constant():
    guide = torch.rand(3, 20, 24)
    out = guided_filter(guide, torch.full((2, 20, 24), 0.7), 4, 1e-3)
    torch.testing.assert_close(out, torch.full((2, 20, 24), 0.7), rtol=1e-4, atol=1e-4)


def test_part_map_refines_only_with_an_image():
    rgb, scores = _two_regions()
    feat = torch.zeros(8, 12, 2)
    feat[:, :6, 0] = 1.0
    feat[:, 6:, 1] = 1.0  # cosine scores against the two axis prototypes = the blocky scores above
    protos = np.eye(2, dtype=np.float32)
    plain = part_map(feat.numpy(), protos, (H, W), 0)
    assert abs(_edge_column(plain - 1) - 48) <= 1
    assert (part_map(feat.numpy(), protos, (H, W), 0, refine="guided") == plain).all()  # no image: unrefined
    refined = part_map(feat.numpy(), protos, (H, W), 0, rgb=rgb, refine="guided", guided_radius=24, guided_subsample=2)
    assert set(np.unique(refined)) == {1, 2}
    assert abs(_edge_column(refined - 1) - EDGE) <= 1


def test_unknown_method_is_an_error():
    rgb, scores = _two_regions()
    with pytest.raises(ValueError, match="slic"):
        refined_argmax(scores, rgb, "crf")
