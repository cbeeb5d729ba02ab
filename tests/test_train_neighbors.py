"""The neighbour trainer: losses split two blobs, mining, determinism, resume after a kill, diagnostics, bad settings."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from selflabel.methods import cluster_features
from selflabel.config import RunConfig
from selflabel.errors import InputError
from selflabel.metrics import hungarian_accuracy
from selflabel.train.common import TrainingInterrupted, cpu_threads
from selflabel.train.neighbor_losses import scan_loss, temi_loss
from selflabel.train.neighbors import (INIT_JITTER, build_heads, head_losses, init_from_clustering, mine_neighbors,
                                       neighbor_diagnostics, train_neighbors)
from selflabel.distributed import DistContext


def blobs(n_per: int | list[int] = 60, d: int = 16, k: int = 2, sep: float = 3.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * sep
    y = np.repeat(np.arange(k), n_per)
    x = centres[y] + rng.normal(size=(len(y), d))
    return x.astype(np.float32), y


def small_cfg(**kw) -> RunConfig:
    cfg = RunConfig()
    cfg.neighbors.neighbors = 5
    cfg.neighbors.n_heads = 3
    cfg.neighbors.epochs = 8
    cfg.neighbors.batch_size = 32
    cfg.neighbors.lr = 0.01
    for key, v in kw.items():
        setattr(cfg.neighbors, key, v)
    return cfg


@pytest.mark.parametrize("objective", ["scan", "temi"])
def test_loss_drives_heads_to_the_blob_split(objective):
    """Gradient descent on the pure loss alone (one linear head, no trainer) separates two blobs."""
    x, y = blobs(sep=2.0)
    xt = torch.nn.functional.normalize(torch.from_numpy(x - x.mean(0)), dim=1)
    nb = mine_neighbors(xt, 5, DistContext())
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(1, 2, x.shape[1], generator=g) * 0.01).requires_grad_()
    teacher = w.detach().clone()
    prior = torch.full((1, 2), 0.5)
    opt = torch.optim.Adam([w], lr=0.05)
    with cpu_threads(1, "cpu", False):  # tiny steps: extra threads only spin on a shared machine
        _descend(objective, xt, nb, w, teacher, prior, opt, g)
    pred = torch.einsum("bd,hkd->hbk", xt, w.detach())[0].argmax(1).numpy()
    assert hungarian_accuracy(y, pred) == 1.0


def _descend(objective, xt, nb, w, teacher, prior, opt, g, steps=150):
    for step in range(steps):
        j = nb[torch.arange(len(xt)), torch.randint(5, (len(xt),), generator=g)]
        la, ln = torch.einsum("bd,hkd->hbk", xt, w), torch.einsum("bd,hkd->hbk", xt[j], w)
        if objective == "scan":
            loss = scan_loss(la, ln, entropy_weight=2.0)[0].sum()
        else:
            ta, tn = torch.einsum("bd,hkd->hbk", xt, teacher), torch.einsum("bd,hkd->hbk", xt[j], teacher)
            loss = temi_loss(la, ln, ta, tn, prior).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        teacher = 0.9 * teacher + 0.1 * w.detach()


def test_scan_loss_prefers_consistent_balanced_heads():
    good = torch.tensor([[[9.0, 0.0], [0.0, 9.0]]])  # two rows, two clusters, confident
    collapsed = torch.tensor([[[9.0, 0.0], [9.0, 0.0]]])
    assert scan_loss(good, good)[0] < scan_loss(collapsed, collapsed)[0]  # entropy term penalises collapse
    assert scan_loss(good, good)[0] < scan_loss(good, good.flip(-1))[0]  # disagreeing neighbours cost


def test_scan_loss_with_sizes_is_the_kl_to_them():
    """With cluster sizes, the entropy term is KL(mean prediction || sizes): equal sizes give the entropy
    loss shifted by w log K, and a head whose mean prediction matches unequal sizes pays no size term."""
    g = torch.Generator().manual_seed(0)
    a, n = torch.randn(2, 64, 3, generator=g), torch.randn(2, 64, 3, generator=g)
    plain, _, entropy = scan_loss(a, n, 5.0)
    kl_loss, _, kl = scan_loss(a, n, 5.0, sizes=torch.full((3,), 1 / 3))
    torch.testing.assert_close(kl_loss, plain + 5.0 * np.log(3))
    torch.testing.assert_close(kl, np.log(3) - entropy)
    tail = torch.tensor([[4.0, 0.0, -9.0]]).repeat(1, 50, 1)  # one head, every row p = softmax([4, 0, -9])
    p = tail[0, 0].softmax(-1)
    loss, consistency, term = scan_loss(tail, tail, 5.0, sizes=p)
    assert float(term.abs().max()) < 1e-6
    torch.testing.assert_close(loss, consistency, atol=1e-5, rtol=0)
    assert float(scan_loss(tail, tail, 5.0, sizes=torch.full((3,), 1 / 3))[2][0]) > 0.5  # uniform sizes: far


@pytest.mark.parametrize("objective, init", [("scan", "random"), ("temi", "random"), ("scan", "clustering"),
                                             ("temi", "clustering")])
def test_trainer_separates_blobs_and_writes_diagnostics(tmp_path, objective, init):
    x, y = blobs()
    records = [SimpleNamespace(gt=f"c{v}") for v in y]
    cfg = small_cfg(objective=objective, init=init, epochs=8 if objective == "scan" else 20)
    res = train_neighbors(x, 2, cfg, out_dir=tmp_path, records=records)
    assert hungarian_accuracy(y, res.labels) == 1.0
    diag = json.loads((tmp_path / "neighbors.json").read_text())
    assert diag["chosen_head"] in range(3) and len(diag["head_losses"]) == 3
    assert diag["chosen_head_loss"] == pytest.approx(min(diag["head_losses"]))
    assert sorted(diag["cluster_sizes"]) == [60, 60]
    assert diag["neighbor_purity"] == 1.0 and diag["neighbor_agreement"] == 1.0
    assert diag["init"] == init and (diag["start_sizes"] is None) == (init == "random")
    if init == "clustering":
        assert diag["start_sizes"] == pytest.approx([0.5, 0.5])
    assert res.probs.shape == (120, 2) and np.allclose(res.probs.sum(1), 1, atol=1e-5)


def test_heads_start_as_the_clusterings_prototype_classifier():
    """init=clustering: every K's head 0 is prototypes / temperature with bias log(sizes) of the run's own
    transport clustering (its labels back), the other heads the same plus small seeded noise."""
    from selflabel.default_clustering import transport_clustering
    from selflabel.geometry import prepare_features

    x, y = blobs(n_per=[90, 30], seed=1)
    cfg = small_cfg()
    xp = prepare_features(x)
    model = build_heads(x.shape[1], [2, 3], 3, seed=0)
    sizes = init_from_clustering(model, xp, [2, 3], cfg, 0, DistContext())
    for bank, kk, b in zip(model.banks, [2, 3], sizes):
        fit = transport_clustering(xp, kk, cfg.cluster, 0)
        w = torch.from_numpy(fit.prototypes) / cfg.cluster.temperature
        torch.testing.assert_close(bank.weight[0].detach(), w)
        counts = np.bincount(fit.labels, minlength=kk)
        torch.testing.assert_close(b, torch.from_numpy(counts / counts.sum()).float())  # no cluster under the floor
        torch.testing.assert_close(bank.bias.detach(), b.log()[None].expand(3, kk))
        jitter = (bank.weight[1:].detach() - w).norm(dim=2) / w.norm(dim=1)
        assert float(jitter.min()) > 0.5 * INIT_JITTER and float(jitter.max()) < 2 * INIT_JITTER
        assert (bank(xp)[0].argmax(1).detach().numpy() == fit.labels).mean() > 0.9  # the head starts as the clustering
    assert sorted(np.bincount(model.banks[0](xp)[0].argmax(1).detach().numpy()).tolist()) == [30, 90]


def test_heads_from_the_clustering_keep_a_long_tail():
    """Blobs of 150, 40 and 10 images: started from the estimated-size clustering and trained against its
    sizes, the heads keep every blob whole; SCAN's random start with its entropy term (and a balanced label
    step) pulls the sizes toward equal and splits the large blob."""
    x, y = blobs(n_per=[150, 40, 10], k=3, seed=1)
    ours = train_neighbors(x, 3, small_cfg())
    assert hungarian_accuracy(y, ours.labels) == 1.0
    assert np.bincount(ours.labels, minlength=3).tolist() == [150, 40, 10]  # numbered by size, largest first
    assert ours.info["start_sizes"] == sorted(ours.info["start_sizes"], reverse=True)  # in the same numbering
    np.testing.assert_array_equal(ours.probs.argmax(1), ours.labels)  # the probabilities' columns too
    scan = train_neighbors(x, 3, small_cfg(init="random", marginal="uniform"))
    assert hungarian_accuracy(y, scan.labels) < 0.8
    sizes = np.bincount(scan.labels, minlength=3)
    assert (np.diff(sizes) <= 0).all(), sizes  # a random start's clusters are numbered by size as well


def test_label_step_follows_the_given_sizes():
    from selflabel.train.neighbors import label_step

    probs = torch.full((200, 2), 0.5)
    probs[:, 0] += torch.linspace(-0.1, 0.1, 200)  # a ranking, no preference overall
    probs[:, 1] = 1 - probs[:, 0]
    assert np.bincount(label_step(probs, "estimated", 25.0, sizes=torch.tensor([0.8, 0.2])).numpy()).tolist() == [160, 40]
    assert np.bincount(label_step(probs, "uniform", 25.0, sizes=torch.tensor([0.8, 0.2])).numpy()).tolist() == [100, 100]


def test_head_choice_is_the_lowest_loss_over_all_pairs():
    x, y = blobs()
    nb = torch.tensor([[1], [0], [3], [2]])
    cfg = small_cfg()
    right = torch.tensor([[.99, .01], [.99, .01], [.01, .99], [.01, .99]])
    wrong = torch.tensor([[.99, .01], [.01, .99], [.99, .01], [.01, .99]])  # splits every neighbour pair
    losses = head_losses(torch.stack([wrong, right]), nb, cfg.neighbors)
    assert int(losses.argmin()) == 1


def test_neighbor_diagnostics():
    labels = np.array([0, 0, 1, 1])
    nb = np.array([[1], [0], [3], [0]])
    d = neighbor_diagnostics(labels, nb, ["a", "a", "b", "a"])
    assert d["neighbor_agreement"] == 0.75 and d["cluster_sizes"] == [2, 2]
    assert d["neighbor_purity"] == 0.75
    assert "neighbor_purity" not in neighbor_diagnostics(labels, nb, None)


def test_deterministic_for_a_seed_and_seed_matters():
    x, _ = blobs(k=4, n_per=40, sep=1.0)
    a = train_neighbors(x, 4, small_cfg(feature_noise=0.3))
    b = train_neighbors(x, 4, small_cfg(feature_noise=0.3))
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.probs, b.probs)
    cfg = small_cfg(feature_noise=0.3)
    cfg.seed = 1
    assert not np.array_equal(train_neighbors(x, 4, cfg).probs, a.probs)


@pytest.mark.parametrize("objective, self_label, init", [("scan", 0, "clustering"), ("temi", 0, "clustering"),
                                                         ("scan", 3, "clustering"), ("scan", 3, "random")])
def test_resume_after_kill_gives_the_same_labels(tmp_path, objective, self_label, init):
    x, _ = blobs(k=3, n_per=40, sep=1.0)
    cfg = small_cfg(objective=objective, self_label_epochs=self_label, confidence=0.6, feature_noise=0.2, init=init)
    full = train_neighbors(x, 3, cfg)
    with pytest.raises(TrainingInterrupted):
        train_neighbors(x, 3, cfg, out_dir=tmp_path, stop_after_epoch=cfg.neighbors.epochs - 2 + self_label)
    assert (tmp_path / "checkpoints" / "neighbors.pt").is_file()
    resumed = train_neighbors(x, 3, cfg, out_dir=tmp_path)
    assert resumed.info["resumed_from_epoch"] == cfg.neighbors.epochs - 2 + self_label
    np.testing.assert_array_equal(resumed.labels, full.labels)
    np.testing.assert_allclose(resumed.probs, full.probs, atol=1e-6)


def test_self_labelling_and_sinkhorn_assign_balance_the_clusters():
    x, y = blobs(k=2, n_per=60, sep=0.6, seed=3)
    res = train_neighbors(x, 2, small_cfg(self_label_epochs=3, confidence=0.5, final_assign="sinkhorn", marginal="uniform"))
    assert sorted(np.bincount(res.labels).tolist()) == [60, 60]  # uniform marginal in the label step
    assert res.info["epochs"] == 11 and len(res.info["loss"]) == 11


def test_extra_heads_and_dispatch():
    x, y = blobs(k=2)
    cfg = small_cfg()
    cfg.cluster.method = "neighbors"
    cfg.cluster.heads = [4]
    res = cluster_features(x, 2, cfg)
    assert res.info["method"] == "neighbors" and set(res.head_labels) == {4}
    assert res.head_labels[4].max() <= 3


@pytest.mark.parametrize("key, value, match", [
    ("neighbors", 120, "neighbors.neighbors=120"),
    ("neighbors", 0, "neighbors.neighbors=0"),
    ("n_heads", 0, "neighbors.n_heads=0"),
    ("objective", "dino", "neighbors.objective"),
    ("init", "kmeans", "neighbors.init"),
    ("marginal", "zipf", "neighbors.marginal"),
    ("final_assign", "vote", "neighbors.final_assign"),
    ("confidence", 1.0, "neighbors.confidence"),
    ("batch_size", 1, "neighbors.batch_size"),
])
def test_bad_settings_fail_fast(key, value, match):
    x, _ = blobs()
    with pytest.raises(InputError, match=match):
        train_neighbors(x, 2, small_cfg(**{key: value}))


def test_shipped_yaml_mirrors_the_defaults():
    from dataclasses import asdict
    from pathlib import Path

    from selflabel.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "neighbors.yaml")
    assert cfg.cluster.method == "neighbors"
    assert asdict(cfg.neighbors) == asdict(RunConfig().neighbors)


def test_mining_takes_the_index_beyond_the_exact_limit(monkeypatch):
    """One process mines with `knn(method="auto")`: exact up to EXACT_MAX_ROWS, the faiss index beyond (as the
    curation); here the limit is lowered and the index replaced by a recorder, so no faiss is needed."""
    import selflabel.neighbors as nbmod
    from selflabel.distributed import DistContext
    from selflabel.train.neighbors import mine_neighbors

    x = torch.nn.functional.normalize(torch.from_numpy(blobs()[0]), dim=1)
    exact = mine_neighbors(x, 5, DistContext())
    calls = []

    def fake_faiss(queries, k, database=None, *, exclude_self=False, **kw):
        calls.append((k, exclude_self, kw.get("normalized")))
        return nbmod.knn_exact(queries, k, database, exclude_self=exclude_self, normalized=True)

    monkeypatch.setattr(nbmod, "EXACT_MAX_ROWS", 50)
    monkeypatch.setattr(nbmod, "faiss_available", lambda: True)
    monkeypatch.setattr(nbmod, "knn_faiss", fake_faiss)
    assert torch.equal(mine_neighbors(x, 5, DistContext()), exact)
    assert calls == [(5, True, True)]  # 120 rows > 50: the index, on the already normalised rows


def test_default_neighbour_count_is_a_clusters_worth_in_small_folders():
    from selflabel.train.neighbors import neighbor_count

    cfg = RunConfig().neighbors  # neighbors: null
    assert neighbor_count(cfg, 10_000, 10) == 20  # SCAN's 20 where clusters are large
    assert neighbor_count(cfg, 100, 10) == 9  # 10 images a class: the other 9, not 11 strangers more
    assert neighbor_count(cfg, 9, 3) == 2
    assert neighbor_count(cfg, 3, 3) == 1  # never below one
    cfg.neighbors = 5
    assert neighbor_count(cfg, 100, 10) == 5  # an explicit setting is kept
