import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from selflabel.backbones import create_backbone
from selflabel.data import scan_folder
from selflabel.errors import BackboneUnavailable, InputError
from selflabel.features import FeatureCache, extract_features

from conftest import make_image


def _extract(records, cache_dir, **kw):
    bb = create_backbone("tiny")
    return extract_features(records, bb, batch_size=8, num_workers=0, cache_dir=cache_dir, show_progress=False, **kw)


def test_cache_miss_then_hit_then_partial(color_folder, cache_dir, tmp_path):
    recs = scan_folder(color_folder).records
    first = _extract(recs, cache_dir)
    assert (first.n_computed, first.n_cached) == (24, 0)
    second = _extract(recs, cache_dir)
    assert (second.n_computed, second.n_cached) == (0, 24)
    np.testing.assert_array_equal(first.features, second.features)
    # the folder grows by 4 images: only those are computed
    for i in range(4):
        make_image(color_folder / "red" / f"new_{i}.png", (200, 10, 10), seed=1000 + i)
    grown = _extract(scan_folder(color_folder).records, cache_dir)
    assert (grown.n_computed, grown.n_cached) == (4, 24)


def test_cache_key_is_content_not_name(color_folder, cache_dir, tmp_path):
    recs = scan_folder(color_folder).records
    _extract(recs, cache_dir)
    moved = tmp_path / "moved"
    shutil.copytree(color_folder, moved)
    (moved / "red" / "img_0.png").rename(moved / "red" / "renamed.png")
    res = _extract(scan_folder(moved).records, cache_dir)
    assert res.n_computed == 0


def test_broken_files_are_skipped_and_rest_labelled(color_folder, cache_dir):
    (color_folder / "red" / "zero.jpg").write_bytes(b"")
    (color_folder / "blue" / "fake.png").write_text("hello")
    res = _extract(scan_folder(color_folder).records, cache_dir)
    assert len(res.records) == 24 and res.features.shape == (24, 64)
    reasons = {s.path: s.reason for s in res.skipped}
    assert set(reasons) == {"red/zero.jpg", "blue/fake.png"}
    assert "empty" in reasons["red/zero.jpg"] and "not an image" in reasons["blue/fake.png"]


def test_features_match_direct_forward(color_folder, cache_dir):
    recs = scan_folder(color_folder).records[:4]
    bb = create_backbone("tiny")
    res = extract_features(recs, bb, batch_size=2, num_workers=0, cache_dir=cache_dir, amp="fp32", device="cpu",
                           show_progress=False)  # the reference below runs on the CPU
    from selflabel.data import load_rgb

    x = torch.stack([bb.transform(load_rgb(r.path)) for r in recs])
    with torch.no_grad():
        ref = bb(x).global_feat.numpy()
    np.testing.assert_allclose(res.features, ref, rtol=1e-4, atol=1e-5)


def test_memmap_output(color_folder, cache_dir, tmp_path):
    res = _extract(scan_folder(color_folder).records, cache_dir, out_path=tmp_path / "f.npy")
    assert isinstance(res.features, np.memmap)
    assert np.load(tmp_path / "f.npy").shape == (24, 64)


def test_incomplete_shard_is_ignored(tmp_path):
    cache = FeatureCache(tmp_path, "k")
    cache.add(["a", "b"], np.ones((2, 3), np.float32))
    np.save(tmp_path / "k" / "shard-crashed.npy", np.zeros((1, 3), np.float32))  # no .keys: a crash mid-write
    again = FeatureCache(tmp_path, "k")
    assert len(again) == 2 and "a" in again


def test_backbone_registry_errors():
    with pytest.raises(InputError, match="unknown backbone"):
        create_backbone("resnet9000")
    with pytest.raises(BackboneUnavailable, match="not found"):
        create_backbone("mobilenet_v2", weights="/nonexistent/weights.pth")


def test_offline_default_backbone_loads_real_weights():
    bb = create_backbone("mobilenet_v2")
    out = bb(torch.zeros(1, 3, 224, 224))
    assert out.global_feat.shape == (1, 1280) and out.dense.shape == (1, 1280, 7, 7)
    assert "b0353104" in bb.cache_key()


def test_dino_fails_fast_offline(monkeypatch, tmp_path):
    import time

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    t = time.perf_counter()
    with pytest.raises(BackboneUnavailable, match="dino_vits16"):
        create_backbone("dino_vits16")
    assert time.perf_counter() - t < 15


def test_vit_backbone_has_cls_attention_saliency():
    bb = create_backbone("tiny_vit")
    out = bb(torch.randn(2, 3, 64, 64))
    assert out.dense.shape == (2, 64, 8, 8)
    s = out.saliency.reshape(2, -1).sum(1)
    assert torch.all(s <= 1.0 + 1e-5) and torch.all(s > 0.5)  # CLS attention over patches (minus self)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
def test_disk_full_mid_run_keeps_the_cache_valid_and_a_rerun_resumes(color_folder, cache_dir, monkeypatch, err):
    """A write failing on the 2nd shard (after writing part of it): one clear error naming the path, no
    partial shard is ever read back, and the rerun computes only what is missing."""
    import selflabel.features as features
    from selflabel.atomic import atomic_path
    from selflabel.features import CacheWriteError

    recs = scan_folder(color_folder).records
    real, calls = features.atomic_save_npy, []

    def failing(path, arr):
        calls.append(path)
        if len(calls) < 2:
            return real(path, arr)
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"\x93NUMPY half a shard")
            raise OSError(err, os.strerror(err), str(tmp))

    monkeypatch.setattr(features, "atomic_save_npy", failing)
    kw = dict(batch_size=8, num_workers=0, cache_dir=cache_dir, show_progress=False, flush_every=8, engine="torch",
              amp="fp32")
    bb = create_backbone("tiny")
    with pytest.raises(CacheWriteError) as info:
        extract_features(recs, bb, **kw)
    msg = str(info.value)
    assert "\n" not in msg and str(cache_dir) in msg and "cannot write the feature cache" in msg
    assert ("no space left" if err == errno.ENOSPC else "permission denied") in msg
    shard_dir = next(cache_dir.glob("tiny-*"))
    assert sorted(p.suffix for p in shard_dir.iterdir()) == [".keys", ".npy"]  # one whole shard, nothing partial
    monkeypatch.setattr(features, "atomic_save_npy", real)  # space freed
    again = extract_features(recs, bb, **kw)
    assert (again.n_computed, again.n_cached) == (16, 8)
    fresh = extract_features(recs, bb, **{**kw, "cache_dir": cache_dir.parent / "fresh"})
    np.testing.assert_allclose(again.features, fresh.features, rtol=1e-6)


def test_unwritable_cache_folder_is_one_line(tmp_path, monkeypatch):
    from selflabel.features import CacheWriteError

    def denied(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(CacheWriteError, match=r"^.*/cache/k: cannot write the feature cache \(permission denied\)"):
        FeatureCache(tmp_path / "cache", "k")


def test_pixel_path_equals_the_transform_and_stays_within_one_of_pil():
    """Workers ship uint8 crops normalised per batch: the same tensors as `transform`; the uint8 resize
    (torchvision's kernel) is within 1 grey level of PIL's resize-then-crop."""
    from PIL import Image
    from torchvision import transforms as T

    from selflabel.data import load_rgb, scan_folder
    from selflabel.sample import sample_dir

    bb = create_backbone("mobilenet_v2")
    pixels, tf = bb.make_pixels(), bb.transform
    pil = T.Compose([T.Resize(bb.decode_size(), antialias=True), T.CenterCrop(bb.image_size), T.PILToTensor()])
    for rec in scan_folder(sample_dir()).records[::25]:
        img = load_rgb(rec.path)
        for im in (img, img.resize((640, 480), Image.Resampling.BICUBIC), img.convert("L")):
            x = pixels(im)
            assert x.dtype == torch.uint8 and x.shape == (3, 224, 224) and x.is_contiguous()
            assert torch.equal(bb.normalize_pixels(x[None])[0], tf(im))
            assert (x.int() - pil(im.convert("RGB")).int()).abs().max() <= 1


def test_flip_tta_averages_each_image_with_its_mirror(tmp_path, cache_dir):
    """tta='flip': the features are the mean of the image's and of its mirror image's, cached apart."""
    from PIL import Image

    from selflabel.features import feature_cache_key
    from selflabel.engine import EngineSpec

    rng = np.random.default_rng(0)
    plain, mirrored = tmp_path / "plain", tmp_path / "mirrored"
    plain.mkdir(), mirrored.mkdir()
    for i in range(6):  # asymmetric content: a mirror gives other features
        arr = (rng.random((96, 96, 3)) * 255).astype(np.uint8)  # square, and 56 px of 64: a symmetric crop
        arr[:, :30] = [255, 0, 0]
        Image.fromarray(arr).save(plain / f"{i}.png")
        Image.fromarray(arr[:, ::-1]).save(mirrored / f"{i}.png")
    bb = create_backbone("tiny", None, 56)
    kw = dict(engine="torch", amp="fp32", batch_size=8, num_workers=0, cache_dir=cache_dir, show_progress=False)
    a = extract_features(scan_folder(plain).records, bb, **kw).features
    b = extract_features(scan_folder(mirrored).records, bb, **kw).features
    flip = extract_features(scan_folder(plain).records, bb, tta="flip", **kw)
    assert flip.n_computed == 6  # not served from the plain features' cache
    assert np.abs(a - b).max() > 1e-3
    np.testing.assert_allclose(flip.features, (a + b) / 2, rtol=1e-4, atol=1e-5)
    assert feature_cache_key(bb, EngineSpec("torch", "fp32"), "flip") != feature_cache_key(bb, EngineSpec("torch", "fp32"))
    with pytest.raises(ValueError, match="tta 'mirror' is not one of none, flip"):
        _extract(scan_folder(plain).records, cache_dir, tta="mirror")


def test_crop_ratio_one_keeps_the_whole_frame_and_is_cached_apart(tmp_path, cache_dir):
    """backbone.crop = 1.0: the short side is resized to the input size and nothing of a square frame is
    cut (a 1-px border survives); 0.875 (ImageNet's evaluation crop) cuts it. Features of the two are
    cached apart, and the 0.875 key is the one earlier versions wrote."""
    from PIL import Image

    from selflabel.config import RunConfig, validate

    arr = np.zeros((32, 32, 3), np.uint8)
    arr[[0, -1], :] = arr[:, [0, -1]] = [255, 0, 0]
    img = Image.fromarray(arr)
    full = create_backbone("mobilenet_v2", image_size=160, crop_ratio=1.0)
    eval_crop = create_backbone("mobilenet_v2", image_size=160)
    a, b = full.make_pixels()(img), eval_crop.make_pixels()(img)
    assert a.shape == b.shape == (3, 160, 160)
    assert a[0, 0, 0] > 200 and a[0, -1, 80] > 200 and a[0, 80, -1] > 200  # the border is there
    assert b[0, 0, 0] < 20 and b[0, :, :5].max() < 20  # cut
    assert full.decode_size() == 160 and eval_crop.decode_size() == 183
    assert eval_crop.cache_key() == f"mobilenet_v2-{eval_crop.weights_id}-s160-crop-draft-tv"
    assert full.cache_key() == f"mobilenet_v2-{full.weights_id}-s160-crop1-draft-tv"
    for i in range(3):
        Image.fromarray(np.roll(arr, i, 0)).save(tmp_path / f"{i}.png")
    recs = scan_folder(tmp_path).records
    kw = dict(engine="torch", amp="fp32", batch_size=8, num_workers=0, cache_dir=cache_dir, show_progress=False)
    tiny, tiny_full = create_backbone("tiny", None, 32), create_backbone("tiny", None, 32, 1.0)
    assert extract_features(recs, tiny, **kw).n_computed == 3
    other = extract_features(recs, tiny_full, **kw)
    assert other.n_computed == 3  # not served from the 0.875 cache
    assert np.abs(other.features - extract_features(recs, tiny, **kw).features).max() > 1e-4
    cfg = RunConfig()
    cfg.backbone.crop = 0.3
    with pytest.raises(InputError, match=r"backbone.crop: 0.3 is not allowed \(a share of the short side in \[0.5, 1.0\]"):
        validate(cfg)


def test_the_run_and_an_ensemble_use_the_crop_setting():
    """`--set backbone.crop=1` reaches the backbone of a run, and every member of an ensemble."""
    from selflabel.ensemble import create_feature_source

    assert create_feature_source("tiny", None, None, 1.0).crop_ratio == 1.0
    ens = create_feature_source("mobilenet_v2+efficientnet_lite0", None, None, 1.0)
    assert [m.crop_ratio for m in ens.members] == [1.0, 1.0]
    assert create_feature_source("tiny").crop_ratio == 0.875
