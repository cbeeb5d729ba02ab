import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from selflabel.backbones import create_backbone
from selflabel.data import ImageRecord
from selflabel.dense.extract import Projector, dense_input_size, extract_dense, shift_and_stitch


def test_dense_input_size_keeps_aspect_on_stride_grid():
    assert dense_input_size(480, 360, 448, 32) == (448, 608)  # landscape: H = short side
    assert dense_input_size(360, 480, 448, 32) == (608, 448)
    assert dense_input_size(480, 360, 448, 32, keep_aspect=False) == (448, 448)
    assert dense_input_size(5000, 100, 64, 8) == (64, 256)  # aspect capped at 4
    h, w = dense_input_size(333, 517, 224, 16)
    assert h % 16 == 0 and w % 16 == 0


def test_shift_and_stitch_equals_denser_stride():
    """A stride-4 average pool run on 4 shifted copies gives the stride-2 pool (away from the far border)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 20)

    def pool(t):
        d = F.avg_pool2d(t, 4, 4)
        return d, d.norm(dim=1)

    dense, sal = shift_and_stitch(pool, x, stride=4, factor=2)
    ref = F.avg_pool2d(x, 4, 2)  # [2, 3, 7, 9]
    assert dense.shape == (2, 3, 8, 10)
    torch.testing.assert_close(dense[:, :, :7, :9], ref)
    torch.testing.assert_close(sal, dense.norm(dim=1))
    d1, _ = shift_and_stitch(pool, x, stride=4, factor=1)
    torch.testing.assert_close(d1, F.avg_pool2d(x, 4, 4))
    with pytest.raises(ValueError):
        shift_and_stitch(pool, x, stride=4, factor=3)


def test_projector_matches_sklearn_pca():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12)) + 5
    proj = Projector.fit(x, 4)
    xs = (x - x.mean(0)) / (x.std(0) + 1e-5)
    ref = PCA(4).fit(xs)
    y = proj(x)
    for j in range(4):  # same axes up to sign
        assert abs(np.corrcoef(y[:, j], ref.transform(xs)[:, j])[0, 1]) > 0.999
    assert proj.explained == pytest.approx(ref.explained_variance_ratio_.sum(), rel=1e-4)
    assert Projector.fit(x, 0).dim == 12


def _images(tmp_path, n=4):
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        arr = (rng.random((40 + 8 * i, 56, 3)) * 255).astype(np.uint8)
        p = tmp_path / f"im{i}.png"
        Image.fromarray(arr).save(p)
        recs.append(ImageRecord(id=p.name, path=p))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    recs.insert(2, ImageRecord(id=bad.name, path=bad))
    return recs


@pytest.mark.parametrize("name", ["tiny", "tiny_vit"])
def test_extract_dense_shapes_and_skips(tmp_path, name):
    recs = _images(tmp_path)
    bb = create_backbone(name)
    feats = extract_dense(recs, bb, image_size=32, device=torch.device("cpu"), pca_dim=8, batch_size=3,
                          num_workers=0, fit_images=2, show_progress=False)
    assert [r.id for r in feats.records] == ["im0.png", "im1.png", "im2.png", "im3.png"]
    assert feats.skipped and feats.skipped[0][0] == "broken.png"
    for f, s, (H, W), rec in zip(feats.feats, feats.saliency, feats.sizes, feats.records):
        h_in, w_in = dense_input_size(W, H, 32, bb.stride)
        assert f.shape == (h_in // bb.stride, w_in // bb.stride, 8) and f.dtype == np.float16
        assert s.shape == f.shape[:2]
        assert (H, W) == Image.open(rec.path).size[::-1]
    assert len(feats.info["input_sizes"]) >= 2  # different sizes forwarded in separate groups
    z = feats.sample(10_000)
    assert z.shape == (sum(f.shape[0] * f.shape[1] for f in feats.feats), 8)
    assert abs(float(z.mean())) < 0.3  # standardised
    assert feats.sample(5, seed=1).shape == (5, 8)


def test_extract_dense_shift_doubles_resolution(tmp_path):
    recs = _images(tmp_path, n=2)[:2]
    bb = create_backbone("tiny")
    a = extract_dense(recs, bb, image_size=32, device=torch.device("cpu"), pca_dim=0, num_workers=0, show_progress=False)
    b = extract_dense(recs, bb, image_size=32, device=torch.device("cpu"), pca_dim=0, num_workers=0, shift=2,
                      show_progress=False)
    assert b.feats[0].shape[:2] == (2 * a.feats[0].shape[0], 2 * a.feats[0].shape[1])
    assert b.info["stride"] == bb.stride / 2


def test_stride16_fusion_doubles_the_map_resolution_and_names_its_own_export(tmp_path):
    """dense.fusion=stride16: the dense map and saliency at stride 16 (the last map upsampled beside the
    stride-16 one, each L2-normalised), global features unchanged, and an export of its own."""
    import torch

    from selflabel.config import RunConfig
    from selflabel.dense.pipeline import dense_fusion
    from selflabel.engine.export import export_name

    bb = create_backbone("mobilenet_v2")
    x = torch.randn(2, 3, 64, 96)
    plain = bb(x)
    name = export_name(bb, 64, 96)
    with dense_fusion(bb, "stride16"):
        fused = bb(x)
        assert export_name(bb, 64, 96) != name
    assert not bb.fuse_stride16 and export_name(bb, 64, 96) == name  # restored after the dense stage
    assert plain.dense.shape == (2, 1280, 2, 3) and fused.dense.shape == (2, 1280 + 96, 4, 6)
    assert fused.saliency.shape == (2, 4, 6)
    torch.testing.assert_close(fused.global_feat, plain.global_feat)
    norms = fused.dense.norm(dim=1)  # two unit-length levels per position
    torch.testing.assert_close(norms, torch.full_like(norms, 2 ** 0.5), rtol=1e-4, atol=1e-4)
    assert RunConfig().dense.fusion == "none"
