"""The same code on a GPU: results equal the CPU ones (skipped without CUDA; run on the lent device).

CI has no GPU, so these run only where `torch.cuda.is_available()`; see README "Tests" for the
command used on the device machine.
"""
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CUDA = torch.device("cuda")


def _scores(n, k, seed=0, dim=32):
    g = torch.Generator().manual_seed(seed)
    protos = torch.nn.functional.normalize(torch.randn(k, dim, generator=g), dim=1)
    z = torch.randint(0, k, (n,), generator=g)
    x = torch.nn.functional.normalize(protos[z] + 0.3 * torch.randn(n, dim, generator=g), dim=1)
    return x @ protos.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("log_domain", [False, True])
def test_sinkhorn_on_gpu_equals_cpu_and_pot(dtype, log_domain):
    import ot as pot

    from selflabel.ot import sinkhorn

    s = _scores(3000, 40).to(dtype)
    cpu = sinkhorn(s, eps=0.05, n_iters=50, log_domain=log_domain)
    gpu = sinkhorn(s.to(CUDA), eps=0.05, n_iters=50, log_domain=log_domain)
    assert gpu.plan.device.type == "cuda" and gpu.plan.dtype == cpu.plan.dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-7
    np.testing.assert_allclose(gpu.plan.cpu().numpy(), cpu.plan.numpy(), rtol=1e-4, atol=tol)
    ref = pot.sinkhorn(np.full(3000, 1 / 3000), np.full(40, 1 / 40), -s.double().numpy(), 0.05, numItermax=50,
                       stopThr=0.0)
    np.testing.assert_allclose(gpu.plan.double().cpu().numpy(), ref, rtol=1e-3, atol=1e-9 if dtype == torch.float64 else 2e-7)
    rows = gpu.plan.double().sum(1).cpu().numpy()
    np.testing.assert_allclose(rows, 1 / 3000, rtol=1e-4)


def test_sinkhorn_to_tolerance_and_peaked_logits_on_gpu():
    from selflabel.ot import sinkhorn, sinkhorn_unbalanced

    s = _scores(5000, 100, seed=1) * 20  # peaked: exp(scores / eps) spans ~1e170, beyond float32
    res = sinkhorn(s.to(CUDA), eps=0.05, tol=1e-5, max_iters=3000)
    cpu = sinkhorn(s, eps=0.05, tol=1e-5, max_iters=3000)
    assert res.log_domain == cpu.log_domain and res.converged and cpu.converged
    assert abs(res.n_iters - cpu.n_iters) < 10  # the GPU reads the error every 10th iteration only
    np.testing.assert_allclose(res.plan.double().sum(1).cpu().numpy(), 1 / 5000, rtol=1e-5)
    assert (res.plan.argmax(1).cpu() == cpu.plan.argmax(1)).float().mean() > 0.999
    ub_gpu = sinkhorn_unbalanced(s[:500].to(CUDA), eps=0.1, reg_m=1.0, n_iters=100)
    ub_cpu = sinkhorn_unbalanced(s[:500], eps=0.1, reg_m=1.0, n_iters=100)
    np.testing.assert_allclose(ub_gpu.plan.cpu().numpy(), ub_cpu.plan.numpy(), rtol=1e-3, atol=1e-9)


def test_overflow_while_iterating_falls_back_from_the_last_checked_state(monkeypatch):
    """u, v leave float32 between two of the GPU's (every 10th iteration) checks: the log domain must
    take over from the last checked potentials and give the log-domain answer."""
    import selflabel.ot as sot
    import selflabel.ot.backend as ot_backend

    rng = np.random.default_rng(10)
    s = torch.as_tensor(rng.standard_normal((100, 6)) * 30.0)
    ref = sot.sinkhorn(s, eps=0.05, n_iters=30, log_domain=True)
    monkeypatch.setattr(ot_backend, "log_threshold", lambda dtype: 1e9)  # let the kernel form start anyway
    res = sot.sinkhorn(s.float().to(CUDA), eps=0.05, n_iters=30)
    assert res.log_domain and res.n_iters == 30
    np.testing.assert_allclose(res.plan.double().cpu().numpy(), ref.plan.numpy(), rtol=1e-4, atol=1e-8)


def test_fused_triton_pass_equals_two_products():
    from selflabel.ot import triton_pass as ot_triton

    for dtype in (torch.float32, torch.float64):
        K = torch.rand(20_001, 1_000, dtype=dtype, device=CUDA)
        v, a = torch.rand(1_000, dtype=dtype, device=CUDA), torch.rand(20_001, dtype=dtype, device=CUDA)
        assert ot_triton.available(K)
        u = torch.empty_like(a)
        col = torch.empty(1_000, dtype=torch.float64, device=CUDA)
        ot_triton.fused_pass(K, v, a, u, col)
        u_ref = a / (K @ v)
        torch.testing.assert_close(u, u_ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(col, u_ref.double() @ K.double(), rtol=1e-5, atol=0)


def test_sinkhorn_cluster_on_gpu_equals_cpu():
    from selflabel.cluster import sinkhorn_cluster

    noise = torch.randn(2000, 64, generator=torch.Generator().manual_seed(3))
    x = (_scores(2000, 64, seed=2) + 0.05 * noise).numpy().astype(np.float32)
    cpu = sinkhorn_cluster(x, 8, seed=0, device="cpu")
    gpu = sinkhorn_cluster(x, 8, seed=0, device="cuda")
    assert (cpu.labels == gpu.labels).mean() > 0.995
    sizes_cpu, sizes_gpu = np.bincount(cpu.labels, minlength=8), np.bincount(gpu.labels, minlength=8)
    assert np.abs(sizes_gpu - sizes_cpu).max() <= 10 and sizes_gpu.min() > 2000 // 8 * 0.8  # argmax of a balanced plan


@pytest.mark.parametrize("method", ["sela", "swav"])
def test_trainers_on_gpu(method):
    from selflabel.config import load_config
    from selflabel.metrics import cluster_metrics
    from selflabel.train.sela import train_sela
    from selflabel.train.swav import train_swav

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 24)) * 2
    truth = np.repeat(np.arange(5), 80)
    x = (centers[truth] + rng.normal(size=(400, 24))).astype(np.float32)
    cfg = load_config(None, [f"{method}.epochs=6", f"{method}.batch_size=100", "seed=1"])
    fn = train_sela if method == "sela" else train_swav
    gpu = fn(x, 5, cfg, heads=[3], device="cuda")
    cpu = fn(x, 5, cfg, heads=[3], device="cpu")
    assert cluster_metrics(truth, gpu.labels)["accuracy"] > 0.95
    assert cluster_metrics(cpu.labels, gpu.labels)["accuracy"] > 0.98  # same algorithm, other summation order
    assert gpu.head_labels[3].shape == (400,) and gpu.prototypes.shape == (5, 24)


def test_feature_extraction_on_gpu(tmp_path):
    from PIL import Image

    from selflabel.backbones import create_backbone
    from selflabel.data import scan_folder
    from selflabel.features import extract_features

    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    recs = scan_folder(tmp_path).records
    bb = create_backbone("tiny")
    kw = dict(batch_size=8, num_workers=0, show_progress=False)
    cpu = extract_features(recs, bb, device="cpu", amp="fp32", engine="torch", cache_dir=tmp_path / "c1", **kw)
    gpu = extract_features(recs, bb, device="cuda", amp="fp32", cache_dir=tmp_path / "c2", **kw)
    assert gpu.computed_on == {"device": "cuda", "engine": "torch", "precision": "fp32"}
    np.testing.assert_allclose(gpu.features, cpu.features, rtol=1e-3, atol=1e-4)
    amp = extract_features(recs, bb, device="cuda", amp="bf16", cache_dir=tmp_path / "c3", **kw)
    cos = (amp.features * cpu.features).sum(1) / np.linalg.norm(amp.features, axis=1) / np.linalg.norm(cpu.features, axis=1)
    assert cos.min() > 0.99


def test_dense_pipeline_on_gpu():
    from selflabel.backbones import create_backbone
    from selflabel.data import scan_folder
    from selflabel.dense.extract import extract_dense
    from selflabel.sample import sample_dir

    recs = scan_folder(sample_dir()).records[:6]
    bb = create_backbone("tiny_vit")
    kw = dict(image_size=64, num_workers=0, show_progress=False)
    cpu = extract_dense(recs, bb, device=torch.device("cpu"), **kw)
    gpu = extract_dense(recs, bb, device=CUDA, **kw)
    assert [r.id for r in gpu.records] == [r.id for r in cpu.records]
    for a, b in zip(cpu.feats, gpu.feats):  # PCA signs may differ: compare patch-to-patch similarities
        fa, fb = a.reshape(-1, a.shape[-1]).astype(np.float32), b.reshape(-1, b.shape[-1]).astype(np.float32)
        np.testing.assert_allclose(fb @ fb.T, fa @ fa.T, rtol=0.05, atol=0.05 * np.abs(fa @ fa.T).max())
    for a, b in zip(cpu.saliency, gpu.saliency):
        np.testing.assert_allclose(b, a, rtol=1e-2, atol=1e-3)


def test_gpu_jpeg_decode_equals_cpu_decode(tmp_path, monkeypatch):
    """nvJPEG in batches (rotated, CMYK and PNG files included) against the CPU path, and whole
    feature extraction with GPU decoding against CPU decoding on the same GPU model."""
    from PIL import Image

    from selflabel.backbones import create_backbone
    from selflabel.data import EncodedImages, ImageDataset, ImageRecord, decode_encoded_batch, scan_folder
    from selflabel.features import extract_features
    from selflabel.sample import sample_dir

    photos = [r.path for r in scan_folder(sample_dir()).records[::10][:8]]
    with Image.open(photos[0]) as im:
        exif = im.getexif()
        exif[0x0112] = 6
        im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
        im.convert("CMYK").save(tmp_path / "cmyk.jpg")
        im.save(tmp_path / "p.png")
    files = photos + [tmp_path / "rot.jpg", tmp_path / "cmyk.jpg", tmp_path / "p.png"]
    recs = [ImageRecord(str(i), p) for i, p in enumerate(files)]
    bb = create_backbone("mobilenet_v2")
    enc = EncodedImages(recs, bb.transform)
    x, idx, bad = decode_encoded_batch([enc[i] for i in range(len(recs))], CUDA, enc.cpu.__getitem__,
                                       bb.image_size, bb.decode_size(), bb.mean, bb.std)
    assert x.device.type == "cuda" and idx.tolist() == list(range(len(recs))) and not bad
    ref = torch.stack([ImageDataset(recs, bb.transform)[i][0] for i in range(len(recs))])
    err = (x.cpu() - ref).abs()
    assert err.mean() < 0.02 and err.max() < 0.5
    data = tmp_path / "data"
    data.mkdir()
    for i, p in enumerate(files):
        (data / f"{i}{p.suffix}").write_bytes(p.read_bytes())
    kw = dict(batch_size=4, num_workers=0, show_progress=False, device="cuda", amp="fp32")
    gpu = extract_features(scan_folder(data).records, bb, cache_dir=tmp_path / "g", **kw)
    monkeypatch.setenv("SELFLABEL_GPU_DECODE", "0")  # the workers decode on the CPU
    cpu = extract_features(scan_folder(data).records, bb, cache_dir=tmp_path / "c", **kw)
    a, b = gpu.features, cpu.features
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_label_cli_on_gpu(tmp_path):
    from selflabel.runfiles import read_manifest
    from selflabel.sample import sample_dir

    cmd = [sys.executable, "-m", "selflabel", "label", str(sample_dir()), "--backbone", "mobilenet_v2",
           "--method", "sela", "--k", "4", "--device", "cuda", "-q", "--set", "sela.epochs=3",
           "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    manifest = read_manifest(tmp_path / "run")
    assert manifest["features"]["computed_on"]["device"].startswith("cuda")  # what computed them, not the flag
    assert (tmp_path / "run" / "labels.csv").is_file()


def test_mixed_backend_reduces_cpu_and_cuda_tensors():
    """Multi-GPU groups are nccl for CUDA tensors plus gloo for CPU ones (one GPU here: a 1-rank group)."""
    import torch.distributed as dist

    from selflabel.distributed import context, process_group_backend

    dist.init_process_group(process_group_backend(True), init_method=f"tcp://127.0.0.1:{_free_port()}",
                            rank=0, world_size=1)
    try:
        assert context().uses_nccl
        for dev in ("cpu", "cuda"):
            t = torch.ones(3, device=dev)
            dist.all_reduce(t)
            assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()
