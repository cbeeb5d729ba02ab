"""Fast CPU tests of what users run and no other test covered: the default method itself, `demo`,
`segment`, `backbones`, `eval --reviewed`, `export --include-rejected`, `export --mode hardlink|symlink`,
the EfficientNet backbones and `--weights`."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from selflabel.backbones import DEFAULT_BACKBONE, create_backbone, list_backbones
from selflabel.cli import app
from selflabel.cluster import sinkhorn_cluster
from selflabel.data import load_rgb
from selflabel.metrics import cluster_metrics
from selflabel.review.store import ReviewStore
from selflabel.runfiles import read_labels
from selflabel.sample import sample_dir

runner = CliRunner()


def _blobs(sizes, d=16, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), d)) * 3
    truth = np.repeat(np.arange(len(sizes)), sizes)
    return (centres[truth] + spread * rng.normal(size=(len(truth), d))).astype(np.float32), truth


# ----------------------------------------------------------------------------- the transport clustering (--method sinkhorn, where the default starts)
def test_default_method_finds_separable_blobs():
    x, truth = _blobs([60, 60, 60, 60])
    res = sinkhorn_cluster(x, 4, seed=0)
    assert cluster_metrics(truth, res.labels)["ari"] == pytest.approx(1.0)
    assert res.probs.shape == (240, 4) and np.all((0 <= res.confidence) & (res.confidence <= 1))
    np.testing.assert_allclose(np.linalg.norm(res.prototypes, axis=1), 1.0, atol=1e-5)


def test_default_method_balances_a_long_tail():
    x, _ = _blobs([300, 60, 40], spread=1.0)  # the data's own groups are 75 %, 15 %, 10 %
    sizes = np.bincount(sinkhorn_cluster(x, 4, seed=0).labels, minlength=4)
    assert np.abs(sizes - 100).max() <= 5, sizes  # equal sizes, within 5 % of N / K


def test_default_method_honours_a_prior():
    x, truth = _blobs([200, 120, 80], spread=1.0)
    res = sinkhorn_cluster(x, 3, seed=0, prior=[0.5, 0.3, 0.2])
    sizes = sorted(np.bincount(res.labels, minlength=3).tolist(), reverse=True)
    assert np.abs(np.array(sizes) - [200, 120, 80]).max() <= 5, sizes
    uniform = sorted(np.bincount(sinkhorn_cluster(x, 3, seed=0).labels, minlength=3).tolist())
    assert 115 <= uniform[0] <= uniform[-1] <= 150, uniform  # without it the same data is cut into thirds (133 each)


@pytest.mark.xfail(strict=True, reason="known: hard labels are the plan's argmax, so groups much tighter than eps "
                                       "(all rows of a group alike) go whole to one cluster; needs a rounding of the "
                                       "plan that keeps its marginals (selflabel/cluster.py)")
def test_default_method_balances_tight_groups():
    x, _ = _blobs([300, 60, 40], spread=0.3)  # measured: sizes 154, 91, 100, 55
    sizes = np.bincount(sinkhorn_cluster(x, 4, seed=0).labels, minlength=4)
    assert np.abs(sizes - 100).max() <= 5, sizes


def _label(folder, out, cache, *extra):
    return runner.invoke(app, ["label", str(folder), "--out", str(out), "--backbone", "tiny", "--cache-dir", str(cache),
                               "-q", "--set", "backbone.num_workers=0", *extra])


def test_label_defaults_to_the_neighbors_method(color_folder, cache_dir, tmp_path):
    res = _label(color_folder, tmp_path / "run", cache_dir, "--k", "3")
    assert res.exit_code == 0, res.output
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["config"]["cluster"]["method"] == "neighbors" and man["method_info"]["objective"] == "scan"
    assert man["method_info"]["neighbors"] == 7  # 24 images, K = 3: a cluster's other members, not 20
    assert (tmp_path / "run" / "neighbors.json").is_file()
    assert sorted(np.bincount([r.cluster for r in read_labels(tmp_path / "run")])) == [8, 8, 8]


def test_the_default_mines_fewer_neighbours_in_a_small_folder(tmp_path, cache_dir):
    from conftest import COLORS, make_image

    root = tmp_path / "few"
    for ci, (name, color) in enumerate(COLORS.items()):
        for i in range(3):
            make_image(root / name / f"img_{i}.png", color, seed=ci * 100 + i)
    res = _label(root, tmp_path / "run", cache_dir, "--k", "3")
    assert res.exit_code == 0, res.output
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["method_info"]["neighbors"] == 2  # 9 images, K = 3: a cluster's other members, not 20
    assert sorted(np.bincount([r.cluster for r in read_labels(tmp_path / "run")])) == [3, 3, 3]
    res = _label(root, tmp_path / "run2", cache_dir, "--k", "3", "--set", "neighbors.neighbors=20")
    assert res.exit_code == 2 and "neighbors.neighbors=20 is not valid" in res.output  # an explicit 20 is refused


# ----------------------------------------------------------------------------- commands
def test_demo_labels_the_shipped_sample_and_scores_it(tmp_path):
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    rows = read_labels(tmp_path / "demo")
    assert len(rows) == 100 and len({r.cluster for r in rows}) == 10
    assert "evaluation of" in res.output and "main (k=10)" in res.output
    acc = cluster_metrics([r.gt for r in rows], [r.cluster for r in rows])["accuracy"]
    assert acc >= 0.8, acc  # ImageNet photos through an ImageNet backbone


def test_segment_writes_dense_concepts_loadable_by_pycocotools(color_folder, cache_dir, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "seg"
    res = runner.invoke(app, ["segment", str(color_folder), "--out", str(out), "--backbone", "tiny", "-q",
                              "--set", f"backbone.cache_dir={cache_dir}", "--set", "dense.image_size=64",
                              "--set", "dense.k_parts=6"])
    assert res.exit_code == 0, res.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["dense"]["enabled"] and man["dense"]["n_images"] == 24
    coco = COCO(str(out / "dense" / "coco.json"))
    assert len(coco.getImgIds()) == 24 and coco.getCatIds()
    assert len(list((out / "dense" / "maps").glob("**/*.png"))) == 24


def test_backbones_lists_every_registered_name():
    res = runner.invoke(app, ["backbones"])
    assert res.exit_code == 0
    text = res.output
    starts = {name: text.find("\n" + name + " ") + 1 for name in list_backbones()}
    assert all(i > 0 or text.startswith(n + " ") for n, i in starts.items()), text
    marked = text.index("(default)")
    assert max((i, n) for n, i in starts.items() if i <= marked)[1] == DEFAULT_BACKBONE  # the line marked default
    assert text.count("(default)") == 1


@pytest.fixture
def reviewed_run(color_folder, cache_dir, tmp_path):
    """A k-means run on the colour folders (perfect labels), then review edits: 4 red images moved to the
    green cluster, 2 blue ones rejected."""
    out = tmp_path / "run"
    assert _label(color_folder, out, cache_dir, "--k", "3", "--method", "kmeans", "--gt", "folders").exit_code == 0
    rows = read_labels(out)
    cluster_of = {r.gt: r.cluster for r in rows}
    reds = [r.path for r in rows if r.gt == "red"][:4]
    blues = [r.path for r in rows if r.gt == "blue"][:2]
    with ReviewStore(out) as store:
        store.move(reds, cluster_of["green"])
        store.set_status(blues, "rejected")
    return out, reds, blues


def test_eval_reviewed_scores_the_edited_labels(reviewed_run):
    out, reds, blues = reviewed_run
    plain = json.loads(runner.invoke(app, ["eval", str(out), "--json"]).output)
    res = runner.invoke(app, ["eval", str(out), "--reviewed", "--json"])
    assert res.exit_code == 0, res.output
    reviewed = json.loads(res.output)
    assert plain["n_images"] == 24 and plain["image"]["accuracy"] == pytest.approx(1.0)
    assert reviewed["n_images"] == 22  # the rejected images are left out
    assert reviewed["image"]["accuracy"] == pytest.approx(18 / 22)  # the 4 moved reds now count as errors


def test_export_include_rejected(reviewed_run, tmp_path):
    out, _, blues = reviewed_run
    for flag, n in (([], 22), (["--include-rejected"], 24)):
        target = tmp_path / f"labels{len(flag)}.csv"
        res = runner.invoke(app, ["export", str(out), "--format", "csv", "--out", str(target), *flag])
        assert res.exit_code == 0, res.output
        rows = list(csv.DictReader(open(target)))
        assert len(rows) == n
        assert sorted(r["path"] for r in rows if r["status"] == "rejected") == (sorted(blues) if flag else [])


@pytest.mark.parametrize("mode", ["hardlink", "symlink"])
def test_export_imagefolder_links(color_folder, cache_dir, tmp_path, mode):
    out = tmp_path / "run"
    assert _label(color_folder, out, cache_dir, "--k", "3").exit_code == 0
    tree = tmp_path / "tree"
    res = runner.invoke(app, ["export", str(out), "--format", "imagefolder", "--mode", mode, "--out", str(tree)])
    assert res.exit_code == 0, res.output
    files = [p for p in tree.rglob("*") if not p.is_dir()]
    assert len(files) == 24
    sources = {p.stat().st_ino for p in color_folder.rglob("*") if p.is_file()}
    for f in files:
        if mode == "symlink":
            assert f.is_symlink() and f.resolve().is_relative_to(color_folder.resolve())
        else:
            assert not f.is_symlink() and f.stat().st_ino in sources and f.stat().st_nlink == 2


# ----------------------------------------------------------------------------- backbones
@pytest.mark.parametrize("name,size", [("efficientnet_lite0", 224), ("efficientnet_lite2", 260)])
def test_efficientnet_backbones_carry_imagenet_weights(name, size):
    bb = create_backbone(name)
    assert (bb.image_size, bb.dim) == (size, 1280)
    photos = sorted((sample_dir() / "golf_ball").iterdir())[:2] + sorted((sample_dir() / "tench").iterdir())[:2]
    x = torch.stack([bb.transform(load_rgb(p)) for p in photos])
    with torch.no_grad():
        out = bb(x)
        logits = bb.net.forward_head(bb.net.forward_features(x))
    assert out.global_feat.shape == (4, 1280) and out.dense.shape[1] == 1280 and torch.isfinite(out.global_feat).all()
    top5 = logits.topk(5, dim=1).indices.tolist()
    assert [574 in top5[0], 574 in top5[1], 0 in top5[2], 0 in top5[3]] == [True] * 4  # ImageNet: golf ball, tench
    assert (logits.argmax(1) == torch.tensor([574, 574, 0, 0])).sum() >= 3


def test_weights_option_loads_a_local_checkpoint(color_folder, cache_dir, tmp_path):
    bb = create_backbone("tiny")
    state = {k: (v * 1.5 if v.dtype.is_floating_point else v) for k, v in bb.net.state_dict().items()}
    torch.save(state, tmp_path / "my_tiny.pt")
    assert _label(color_folder, tmp_path / "seed0", cache_dir, "--k", "3").exit_code == 0
    res = _label(color_folder, tmp_path / "mine", cache_dir, "--k", "3", "--weights", str(tmp_path / "my_tiny.pt"))
    assert res.exit_code == 0, res.output
    man = json.loads((tmp_path / "mine" / "manifest.json").read_text())
    assert man["config"]["backbone"]["weights"] == str(tmp_path / "my_tiny.pt")
    assert "my_tiny-" in man["backbone"]["cache_key"]  # cached apart from the seed-0 weights
    assert man["features"]["computed"] == 24
    mine, seed0 = np.load(tmp_path / "mine" / "features.npy"), np.load(tmp_path / "seed0" / "features.npy")
    assert not np.allclose(mine, seed0)
    reloaded = create_backbone("tiny", weights=str(tmp_path / "my_tiny.pt"))
    for k, v in reloaded.net.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_default_method_refuses_zero_iterations_from_python():
    """cluster.iters=0 is caught by the config; called from Python it is the same clear error, not a NameError."""
    import numpy as np

    from selflabel.cluster import sinkhorn_cluster
    from selflabel.errors import InputError

    x = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    with pytest.raises(InputError, match="iters=0"):
        sinkhorn_cluster(x, 3, iters=0)
