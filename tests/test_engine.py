"""CPU inference engines: exported backbones give torch's three outputs; any failure falls back to torch."""
import logging

import numpy as np
import pytest
import torch

from selflabel.backbones import create_backbone
from selflabel.data import ImageDataset, scan_folder
from selflabel.engine import EngineSpec, TorchRunner, cosine_per_image, export_onnx, make_runner, plan_engine
from selflabel.engine import runners
from selflabel.features import FeatureCache, extract_features, feature_cache_key
from selflabel.sample import sample_dir

CPU = torch.device("cpu")
ENGINES = [e for e in ("openvino", "onnxruntime") if runners.engine_installed(e)]
needs_engine = pytest.mark.skipif(not ENGINES, reason="neither openvino nor onnxruntime is installed")


def _photos(bb, n=6, size=None):
    """`n` real photos (the imagenette sample shipped in the package) through the backbone's transform."""
    recs = scan_folder(sample_dir()).records[::10][:n]
    tf = bb.make_transform(size) if size else bb.transform
    return torch.stack([x for x, _, err in (ImageDataset(recs, tf)[i] for i in range(len(recs))) if err is None])


def _assert_parity(got, ref, need=0.999):
    for name in ("global_feat", "dense", "saliency"):
        g, r = getattr(got, name), getattr(ref, name)
        assert g.shape == r.shape, name
        cos = cosine_per_image(g.numpy(), r.numpy())
        assert cos.min() >= need, (name, cos.min())


CASES = [(n, e) for n in ("tiny", "tiny_vit") for e in ENGINES] + [(n, e) for n in ("mobilenet_v2", "efficientnet_lite0")
                                                                    for e in ENGINES[:1]]  # real: the default engine


@needs_engine
@pytest.mark.parametrize("name, engine", CASES)
def test_engine_matches_torch_on_real_photos(tmp_path, engine, name):
    """All three outputs (global, dense map, saliency), CNNs and ViTs, per-image cosine >= 0.999 in fp32."""
    bb = create_backbone(name)
    x = _photos(bb)
    runner = make_runner(bb, CPU, EngineSpec(engine, "fp32"), tmp_path)
    got = runner(x)
    assert runner.active == EngineSpec(engine, "fp32")  # no fallback happened
    _assert_parity(got, TorchRunner(bb, CPU, "fp32")(x))
    assert not bb.training  # the exporter leaves modules in training mode; ours must not
    # a second size (dense maps of another shape) is exported and checked separately
    if name.startswith("tiny"):
        x2 = torch.nn.functional.interpolate(x, size=(96, 128), mode="bilinear")
        _assert_parity(runner(x2), TorchRunner(bb, CPU, "fp32")(x2))


@pytest.mark.skipif(not runners.engine_installed("openvino"), reason="openvino not installed")
def test_openvino_bf16_stays_close_to_torch(tmp_path):
    bb = create_backbone("mobilenet_v2")
    x = _photos(bb)
    runner = make_runner(bb, CPU, EngineSpec("openvino", "bf16"), tmp_path)
    got, ref = runner(x), TorchRunner(bb, CPU, "fp32")(x)
    assert runner.active.engine == "openvino"
    assert cosine_per_image(got.global_feat.numpy(), ref.global_feat.numpy()).min() >= 0.995


@needs_engine
def test_export_is_cached_and_atomic(tmp_path):
    bb = create_backbone("tiny")
    p1 = export_onnx(bb, 64, 64, tmp_path)
    mtime = p1.stat().st_mtime_ns
    p2 = export_onnx(bb, 64, 64, tmp_path)
    assert p1 == p2 and p2.stat().st_mtime_ns == mtime  # built once
    assert export_onnx(bb, 64, 96, tmp_path) != p1  # input size is part of the name
    assert not list(p1.parent.glob(".*.tmp"))


def test_plan_engine_rules(monkeypatch):
    monkeypatch.delenv(runners.ENGINE_ENV, raising=False)
    monkeypatch.setattr(runners, "engine_installed", lambda name: name in {"openvino", "onnxruntime", "onnx"})
    assert plan_engine("auto", CPU, "bf16") == EngineSpec("openvino", "bf16")
    assert plan_engine("onnxruntime", CPU, "bf16") == EngineSpec("onnxruntime", "fp32")  # no bf16 kernels in ORT CPU
    assert plan_engine("auto", torch.device("cuda"), "bf16") == EngineSpec("torch", "bf16")
    monkeypatch.setenv(runners.ENGINE_ENV, "torch")
    assert plan_engine(None, CPU, "fp32") == EngineSpec("torch", "fp32")
    monkeypatch.setattr(runners, "engine_installed", lambda name: False)
    assert plan_engine("auto", CPU, "fp32") == EngineSpec("torch", "fp32")
    monkeypatch.setattr(runners, "engine_installed", lambda name: name == "openvino")  # no onnx: cannot export
    assert plan_engine("openvino", CPU, "fp32") == EngineSpec("torch", "fp32")
    with pytest.raises(ValueError, match="not one of"):
        plan_engine("tensorrt", CPU, "fp32")


@needs_engine
def test_failing_engine_falls_back_to_torch_with_one_line(tmp_path, monkeypatch, caplog):
    bb = create_backbone("tiny")
    x = _photos(bb, 3)

    def broken(*a, **k):
        raise RuntimeError("export exploded")

    monkeypatch.setattr(runners, "export_onnx", broken)
    runner = make_runner(bb, CPU, EngineSpec(ENGINES[0], "fp32"), tmp_path)
    with caplog.at_level(logging.WARNING, logger="selflabel.engine.runners"):
        out = runner(x)
        runner(x)
    assert runner.active == EngineSpec("torch", "fp32")
    assert [r.message for r in caplog.records if "using torch" in r.message] == [
        f"engine {ENGINES[0]} failed for tiny (RuntimeError: export exploded): using torch instead"]
    np.testing.assert_allclose(out.global_feat.numpy(), TorchRunner(bb, CPU, "fp32")(x).global_feat.numpy(), rtol=1e-5)


@needs_engine
def test_wrong_engine_output_is_caught_and_not_cached(color_folder, cache_dir, monkeypatch, caplog):
    """An engine whose numbers disagree with torch is dropped before any shard is written."""
    real = runners.EngineRunner._compile

    def skewed(self, path, pixels=False):
        run = real(self, path, pixels)
        return lambda x: [o * (1.0 + np.arange(o.size).reshape(o.shape) % 3) for o in run(x)]

    monkeypatch.setattr(runners.EngineRunner, "_compile", skewed)
    recs = scan_folder(color_folder).records
    bb = create_backbone("tiny")
    with caplog.at_level(logging.WARNING):
        res = extract_features(recs, bb, num_workers=0, cache_dir=cache_dir, amp="fp32", engine=ENGINES[0],
                               show_progress=False)
    assert any("differs from torch" in r.message for r in caplog.records)
    assert res.computed_on == {"device": "cpu", "engine": "torch", "precision": "fp32"}
    assert len(FeatureCache(cache_dir, feature_cache_key(bb, EngineSpec("torch", "fp32")))) == 24
    assert len(FeatureCache(cache_dir, feature_cache_key(bb, EngineSpec(ENGINES[0], "fp32")))) == 0


def test_cache_key_changes_with_precision_and_engine(color_folder, cache_dir):
    """An fp32 rerun never reuses bf16 features, nor torch runs an engine's."""
    recs = scan_folder(color_folder).records
    bb = create_backbone("tiny")
    kw = dict(num_workers=0, cache_dir=cache_dir, show_progress=False)
    runs = [("bf16", "torch"), ("fp32", "torch"), *[("fp32", e) for e in ENGINES]]
    for amp, engine in runs:
        res = extract_features(recs, bb, amp=amp, engine=engine, **kw)
        assert (res.n_computed, res.n_cached) == (24, 0), (amp, engine)
        assert res.computed_on == {"device": "cpu", "engine": engine, "precision": amp}
    for amp, engine in runs:
        assert extract_features(recs, bb, amp=amp, engine=engine, **kw).n_cached == 24
    keys = {feature_cache_key(bb, EngineSpec(e, a)) for a, e in runs}
    assert len(keys) == len(runs) and all(k.startswith(bb.cache_key()) for k in keys)


@pytest.mark.skipif(not runners.engine_installed("openvino"), reason="openvino not installed")
def test_openvino_streams_split_the_batch_and_keep_its_order(tmp_path, monkeypatch):
    """Two one-thread streams each run part of the batch: the outputs are the single request's, in order."""
    bb = create_backbone("tiny")
    x = _photos(bb, n=5)  # an odd batch: unequal parts
    out = {}
    for streams in ("1", "2"):
        monkeypatch.setenv(runners.STREAMS_ENV, streams)
        runner = make_runner(bb, CPU, EngineSpec("openvino", "fp32"), tmp_path, threads=2)
        out[streams] = runner(x)
        assert runner.active == EngineSpec("openvino", "fp32")
    for name in ("global_feat", "dense", "saliency"):
        torch.testing.assert_close(getattr(out["2"], name), getattr(out["1"], name), rtol=1e-4, atol=1e-5)
    monkeypatch.delenv(runners.STREAMS_ENV)
    assert runners.openvino_streams(2) == 2 and runners.openvino_streams(1) == 1


@pytest.mark.skipif(not runners.engine_installed("openvino"), reason="openvino not installed")
def test_openvino_takes_uint8_pixels_and_normalises_them_in_the_graph(tmp_path):
    """`runner.pixels(uint8)` equals torch on the normalised batch; the check is recorded per input kind."""
    bb = create_backbone("mobilenet_v2")
    recs = scan_folder(sample_dir()).records[::10][:6]
    ds = ImageDataset(recs, bb.make_pixels())
    x = torch.stack([ds[i][0] for i in range(len(recs))])
    assert x.dtype == torch.uint8
    runner = make_runner(bb, CPU, EngineSpec("openvino", "fp32"), tmp_path)
    _assert_parity(runner.pixels(x), TorchRunner(bb, CPU, "fp32")(bb.normalize_pixels(x)))
    assert runner.active == EngineSpec("openvino", "fp32")
    assert len(list((tmp_path / "engines").glob("*-u8.checked.json"))) == 1
    _assert_parity(TorchRunner(bb, CPU, "fp32").pixels(x), TorchRunner(bb, CPU, "fp32")(bb.normalize_pixels(x)), 0.99999)


@needs_engine
def test_engine_failing_part_way_keeps_each_engines_features_under_its_own_key(color_folder, cache_dir, monkeypatch):
    """The engine crashes after its first batches: those stay in the engine's cache, the rest are torch's,
    cached under torch's key, and the run returns every image (no shard mixes two engines)."""
    real = runners.EngineRunner._compile
    calls = {"n": 0}

    def dies_later(self, path, pixels=False):
        run = real(self, path, pixels)

        def counted(x):
            calls["n"] += 1
            if calls["n"] > 4:  # the parity check, the warm-up and two batches of 4 work, then it crashes
                raise RuntimeError("engine crashed")
            return run(x)
        return counted

    monkeypatch.setattr(runners.EngineRunner, "_compile", dies_later)
    recs = scan_folder(color_folder).records
    bb = create_backbone("tiny")
    kw = dict(batch_size=4, num_workers=0, cache_dir=cache_dir, amp="fp32", show_progress=False)
    res = extract_features(recs, bb, engine=ENGINES[0], **kw)
    engine_cache = FeatureCache(cache_dir, feature_cache_key(bb, EngineSpec(ENGINES[0], "fp32")))
    torch_cache = FeatureCache(cache_dir, feature_cache_key(bb, EngineSpec("torch", "fp32")))
    assert len(res.records) == 24 and len(engine_cache) == 8 and len(torch_cache) == 16
    assert res.computed_on["engine"] == "torch"
    ref = extract_features(recs, bb, engine="torch", **{**kw, "cache_dir": cache_dir / "ref"})
    later = [i for i, r in enumerate(res.records) if r.id not in {x.id for x in res.records[:8]}]
    np.testing.assert_allclose(res.features[later], ref.features[later], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res.features[:8], ref.features[:8], rtol=1e-3, atol=1e-4)  # the engine's, fp32


def test_export_name_follows_the_backbone_code_and_variant(monkeypatch):
    """An edited backbones.py or another output layout names another export (never a stale graph)."""
    from selflabel.engine import export

    bb = create_backbone("tiny")
    name = export.export_name(bb, 64, 64)
    assert export.export_name(bb, 64, 96) != name
    monkeypatch.setattr(export, "_module_digest", lambda cls: "edited")
    assert export.export_name(bb, 64, 64) != name


def test_parity_rule_measures_a_reduced_precision_engine_against_the_fallback():
    """Below the fixed bf16 threshold an engine passes only when it is no further from torch fp32 than
    torch's own bf16 run (the fallback), and never below the floor."""
    assert runners.parity_failure("dense", 0.995, 0.99) is None
    assert "0.9853 < 0.99" in runners.parity_failure("dense", 0.9853, 0.99)  # no fallback measured: fails
    assert runners.parity_failure("dense", 0.9853, 0.99, fallback_cos=0.9864) is None  # CIFAR frames, this CPU
    assert runners.parity_failure("dense", 0.9816, 0.99, fallback_cos=0.9609) is None  # closer than the fallback
    why = runners.parity_failure("dense", 0.97, 0.99, fallback_cos=0.995)  # 6x the fallback's deviation
    assert why and "further from it than torch's own run" in why and "0.9950" in why
    assert runners.parity_failure("dense", 0.94, 0.99, fallback_cos=0.93) is not None  # below the floor


def _bf16_engine(noise: float):
    """A stand-in compiled engine: torch's own bf16 outputs, plus `noise` x their norm of Gaussian noise."""
    def compile_(self, path, pixels=False):
        tr = TorchRunner(self.backbone, CPU, "bf16")
        gen = torch.Generator().manual_seed(0)

        def run(x):
            out = tr(torch.from_numpy(x))
            outs = []
            for o in (out.global_feat, out.dense, out.saliency):
                e = torch.randn(o.shape, generator=gen)
                outs.append((o + noise * e * o.norm() / e.norm()).numpy())
            return outs
        return run
    return compile_


@needs_engine
@pytest.mark.parametrize("noise, keeps_engine", [(0.0, True), (0.05, False)])
def test_bf16_engine_as_close_as_torch_bf16_is_kept(tmp_path, monkeypatch, noise, keeps_engine):
    """With a threshold no bf16 run meets, an engine giving torch's bf16 outputs is kept (falling back
    would buy no accuracy, only cost speed); one that adds its own error on top falls back, with the reason."""
    monkeypatch.setattr(runners, "PARITY_BF16", 0.999999)
    monkeypatch.setattr(runners.EngineRunner, "_compile", _bf16_engine(noise))
    bb = create_backbone("tiny")
    x = _photos(bb, n=4, size=64)
    runner = make_runner(bb, CPU, EngineSpec(ENGINES[0], "bf16"), tmp_path)
    got = runner(x)
    assert runner.active.engine == (ENGINES[0] if keeps_engine else "torch")
    ref = TorchRunner(bb, CPU, "bf16")(x)
    assert cosine_per_image(got.dense.numpy(), ref.dense.numpy()).min() > (0.9999 if keeps_engine else 0.99)
