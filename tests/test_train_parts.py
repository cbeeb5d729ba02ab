"""Trainer parts alone: SwAV loss, feature queue, augmentations, schedules, checkpoints, heads."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from selflabel.errors import InputError
from selflabel.train.augment import ImageViews, feature_view, make_generator
from selflabel.train.checkpoint import checkpoint_path, fingerprint, load_checkpoint, save_checkpoint
from selflabel.train.common import FeatureSource, cluster_prototypes, cosine_lr, head_ks, update_epochs
from selflabel.train.heads import Prototypes, SelaNet
from selflabel.train.losses import multihead_cross_entropy, swav_loss
from selflabel.train.queue import FeatureQueue


def test_swav_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    s = [torch.randn(4, 3) for _ in range(3)]
    q0, q1 = torch.softmax(torch.randn(4, 3), 1), torch.softmax(torch.randn(4, 3), 1)
    ce = lambda q, z: -(q * torch.log_softmax(z / 0.1, 1)).sum(1).mean()  # noqa: E731
    expected = ((ce(q0, s[1]) + ce(q0, s[2])) / 2 + (ce(q1, s[0]) + ce(q1, s[2])) / 2) / 2
    assert swav_loss(s, {0: q0, 1: q1}, 0.1).item() == pytest.approx(expected.item(), rel=1e-6)
    # one-hot codes predicted perfectly (huge margin) give ~0 loss
    q = F.one_hot(torch.tensor([0, 1, 2]), 3).float()
    assert swav_loss([q * 10, q * 10], {0: q, 1: q}, 0.1).item() < 1e-6


def test_multihead_cross_entropy_is_the_mean_over_heads():
    a, b = torch.randn(5, 3), torch.randn(5, 7)
    ya, yb = torch.randint(3, (5,)), torch.randint(7, (5,))
    expected = (F.cross_entropy(a, ya) + F.cross_entropy(b, yb)) / 2
    assert multihead_cross_entropy([a, b], [ya, yb]).item() == pytest.approx(expected.item())


def test_queue_is_fifo_and_used_only_when_full():
    q = FeatureQueue(n_views=1, length=4, dim=2)
    w = torch.eye(2)
    batch = torch.ones(2, 2)
    assert torch.equal(q.extend_scores(0, batch, w), batch)  # not full: batch only
    q.push(0, torch.tensor([[1.0, 0], [2.0, 0]]), last_view=True)
    q.push(0, torch.tensor([[3.0, 0], [4.0, 0]]), last_view=True)
    assert q.full and q.z[0, :, 0].tolist() == [3.0, 4.0, 1.0, 2.0]  # newest first
    out = q.extend_scores(0, batch, w)
    assert out.shape == (6, 2) and out[:4, 0].tolist() == [3.0, 4.0, 1.0, 2.0]
    q2 = FeatureQueue(1, 4, 2)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.z, q.z) and q2.filled == 4


def test_feature_view_noise_norm_dropout_and_determinism():
    x = F.normalize(torch.randn(256, 1024), dim=1)
    v = feature_view(x, make_generator(0, 1), noise=0.3)
    assert (v - x).norm(dim=1).mean().item() == pytest.approx(0.3, rel=0.05)
    assert torch.equal(v, feature_view(x, make_generator(0, 1), noise=0.3))
    assert not torch.equal(v, feature_view(x, make_generator(0, 2), noise=0.3))
    d = feature_view(x, make_generator(0), noise=0.0, dropout=0.5)
    assert (d == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_image_views_shapes_and_determinism():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    views = ImageViews(size=32, small_size=16, n_large=2, n_small=3)
    out = views.views(img, make_generator(1))
    assert [tuple(v.shape) for v in out] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    again = views.views(img, make_generator(1))
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    assert views.plain(img).shape == (3, 32, 32)


def test_schedules():
    assert update_epochs(30, 10) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
    assert update_epochs(3, 10) == [0, 1, 2] and update_epochs(5, 1) == [0]
    assert cosine_lr(1.0, 0, 100) == pytest.approx(1.0)
    assert cosine_lr(1.0, 100, 100) == pytest.approx(0.01)
    assert cosine_lr(1.0, 0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert head_ks(10, [50, 10, 3]) == [10, 50, 3]
    with pytest.raises(InputError):
        head_ks(1, [])


def test_checkpoint_roundtrip_weights_only_and_fingerprint(tmp_path):
    path = checkpoint_path(tmp_path, "sela")
    fp = fingerprint(a=1, b=[2, 3])
    state = {"fingerprint": fp, "epoch": 3, "model": SelaNet(8, [3, 5]).state_dict(), "labels": [torch.arange(4)],
             "history": {"loss": [1.0, 0.5]}}
    save_checkpoint(path, state)
    assert sorted(p.name for p in path.parent.iterdir()) == ["sela.pt"]  # no temp file left behind
    loaded = load_checkpoint(path, fp)
    assert loaded["epoch"] == 3 and torch.equal(loaded["labels"][0], torch.arange(4))
    assert torch.load(path, weights_only=True)["history"]["loss"] == [1.0, 0.5]
    assert load_checkpoint(path, fingerprint(a=2, b=[2, 3])) is None  # another run's checkpoint
    path.write_bytes(b"not a checkpoint")
    assert load_checkpoint(path, fp) is None  # unreadable: start from scratch


def test_prototypes_normalise_and_cluster_means():
    p = Prototypes(4, [3, 6])
    p.normalize_()
    for layer in p.layers:
        np.testing.assert_allclose(layer.weight.norm(dim=1).detach().numpy(), 1.0, rtol=1e-6)
        assert layer.bias is None
    x = np.array([[1, 0], [3, 0], [0, 2], [0, 5]], dtype=np.float32)
    protos = cluster_prototypes(FeatureSource(x, "cpu"), np.array([0, 0, 1, 1]), 3)
    np.testing.assert_allclose(protos, [[1, 0], [0, 1], [0, 0]], atol=1e-6)  # empty cluster -> zeros


def test_feature_source_memmap_matches_memory(tmp_path):
    x = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    streamed = FeatureSource(mm, "cpu", max_ram_bytes=0)  # forced to read batch by batch
    idx = torch.tensor([5, 99, 0, 5])
    assert torch.equal(streamed.rows(idx), torch.from_numpy(x[[5, 99, 0, 5]]))
    assert torch.allclose(streamed.mean(), torch.from_numpy(x.mean(0)), atol=1e-6)
    assert math.isclose(float(FeatureSource(x, "cpu").mean().sum()), float(x.mean(0).sum()), rel_tol=1e-5)
