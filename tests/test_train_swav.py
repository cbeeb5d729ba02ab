"""SwAV trainer: recovery of planted clusters (balanced and not), queue, prototype freeze, resume, finetune."""
import numpy as np
import pytest
import torch

from selflabel.config import RunConfig
from selflabel.metrics import nmi
from selflabel.train.common import TrainingInterrupted
from selflabel.train.swav import build_model, queue_length, train_swav


def blobs(sizes, d=16, sep=4.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(sizes), d)) * sep
    x = np.concatenate([c + rng.normal(size=(s, d)) for c, s in zip(centers, sizes)]).astype(np.float32)
    return x, np.repeat(np.arange(len(sizes)), sizes)


def small_cfg(epochs=8, seed=0, **swav) -> RunConfig:
    cfg = RunConfig()
    cfg.seed = seed
    cfg.swav.epochs, cfg.swav.batch_size, cfg.swav.freeze_prototypes_iters = epochs, 64, 10
    for key, value in swav.items():
        setattr(cfg.swav, key, value)
    return cfg


def test_recovers_balanced_blobs_with_heads():
    x, y = blobs([100] * 5)
    res = train_swav(x, 5, small_cfg(), heads=[3, 10])
    assert nmi(y, res.labels) > 0.95
    assert set(res.head_labels) == {3, 10} and res.head_labels[10].max() <= 9 and res.head_labels[3].max() <= 2
    assert res.prototypes.shape == (5, 16) and res.probs.shape == (500, 5)
    np.testing.assert_allclose(np.linalg.norm(res.prototypes, axis=1), 1.0, atol=1e-5)
    assert ((res.confidence > 0) & (res.confidence <= 1)).all()
    assert res.info["ks"] == [5, 3, 10] and res.info["final_assign"] == "argmax"
    assert res.info["loss"][-1] < res.info["loss"][0]


def test_recovers_imbalanced_blobs():
    # softer codes (eps 0.1) and batches of 128: the per-batch equipartition then pulls less on the big blob
    # (with eps 0.05 / batch 64, 2 of 4 blob seeds merged two small blobs and split the big one)
    sizes = [300, 200, 150, 100]
    x, y = blobs(sizes, seed=1)
    res = train_swav(x, 4, small_cfg(eps=0.1, batch_size=128))
    assert nmi(y, res.labels) > 0.9
    np.testing.assert_allclose(np.sort(np.bincount(res.labels)), sorted(sizes), atol=15)  # sizes follow the data


def test_sinkhorn_final_assignment_is_balanced():
    x, y = blobs([80] * 5)
    res = train_swav(x, 5, small_cfg(epochs=4, final_assign="sinkhorn"))
    assert np.bincount(res.labels, minlength=5).tolist() == [80] * 5
    assert res.info["final"]["marginal_err"][0] < 1e-5 and nmi(y, res.labels) > 0.9


def test_queue_length_and_use():
    cfg = small_cfg()
    assert queue_length(cfg.swav, [10], 64, 10_000) == 0  # batch already holds >= 4 samples per prototype
    assert queue_length(cfg.swav, [100], 64, 10_000) == 768  # 8 * 100 - 64, rounded up to whole batches
    cfg.swav.queue_length = 1000
    assert queue_length(cfg.swav, [10], 64, 10_000) == 960
    x, y = blobs([60] * 5)
    res = train_swav(x, 5, small_cfg(epochs=5, batch_size=16, queue_length=64, queue_start_epoch=2))
    assert res.info["queue_length"] == 64 and nmi(y, res.labels) > 0.9


def test_prototypes_frozen_for_the_first_iterations(tmp_path):
    x, _ = blobs([64] * 4)  # 4 steps of 64 per epoch
    start = torch.nn.functional.normalize(build_model(16, [4], small_cfg().swav, seed=0).prototypes.layers[0].weight, dim=1)
    cfg = small_cfg(epochs=20, freeze_prototypes_iters=8)  # 80 iterations; the first 8 (2 epochs) frozen

    def prototypes_after(epochs):
        with pytest.raises(TrainingInterrupted):
            train_swav(x, 4, cfg, out_dir=tmp_path / str(epochs), stop_after_epoch=epochs)
        state = torch.load(tmp_path / str(epochs) / "checkpoints" / "swav.pt", weights_only=True)
        return torch.nn.functional.normalize(state["model"]["prototypes.layers.0.weight"], dim=1)

    assert torch.allclose(prototypes_after(2), start, atol=1e-6)  # no update during the freeze
    assert not torch.allclose(prototypes_after(3), start, atol=1e-3)  # then they learn
    cfg.swav.freeze_prototypes_iters = 10_000
    assert train_swav(x, 4, cfg).info["freeze_prototypes_iters"] == 8  # capped at a tenth of the run


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    x, _ = blobs([40] * 4, seed=3)
    cfg = small_cfg(epochs=5, batch_size=16, queue_length=32, queue_start_epoch=1)
    full = train_swav(x, 4, cfg, heads=[6], out_dir=tmp_path / "full")
    with pytest.raises(TrainingInterrupted):
        train_swav(x, 4, cfg, heads=[6], out_dir=tmp_path / "cut", stop_after_epoch=3)
    state = torch.load(tmp_path / "cut" / "checkpoints" / "swav.pt", weights_only=True)
    assert state["epoch"] == 3 and state["queue"]["filled"] == 32  # the queue is saved and restored
    resumed = train_swav(x, 4, cfg, heads=[6], out_dir=tmp_path / "cut")
    assert resumed.info["resumed_from_epoch"] == 3
    assert np.array_equal(full.labels, resumed.labels) and np.array_equal(full.head_labels[6], resumed.head_labels[6])
    np.testing.assert_array_equal(full.probs, resumed.probs)
    assert full.info["loss"] == resumed.info["loss"]


def test_finetune_mode_trains_the_backbone_on_cpu():
    from PIL import Image

    from selflabel.backbones import create_backbone

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, size=(36, 36, 3), dtype=np.uint8)) for _ in range(16)]
    backbone = create_backbone("tiny")
    backbone.image_size = 32
    with torch.no_grad():
        feats = backbone(torch.stack([backbone.make_transform(32)(im) for im in images])).global_feat.numpy()
    before = backbone.net[0].weight.detach().clone()
    cfg = small_cfg(epochs=1, batch_size=8, finetune_epochs=1, nmb_crops=[2, 2], freeze_prototypes_iters=0)
    cfg.cluster.finetune = True
    cfg.backbone.num_workers = 0
    res = train_swav(feats, 2, cfg, records=images, backbone=backbone)
    assert res.info["mode"] == "finetune" and res.labels.shape == (16,)
    assert not torch.equal(before, backbone.net[0].weight)
