"""The Python API: `selflabel.label` equals the CLI, `Run` reflects review edits, the stored geometry
reproduces the clustering, `selflabel assign` carries a review over to new images."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import selflabel
from selflabel.cli import app
from selflabel.errors import InputError
from selflabel.geometry import prepare
from selflabel.geometry_io import load_geometry
from selflabel.review.launch import check_run_dir
from selflabel.review.store import ReviewStore, effective_labels

from conftest import COLORS, make_image

runner = CliRunner()


def _cluster_of(run: selflabel.Run, cls: str) -> int:
    df = run.labels
    return int(df[df.path.str.startswith(cls + "/")].cluster.mode()[0])


def test_label_api_equals_cli(color_folder, cache_dir, tmp_path):
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    res = runner.invoke(app, ["label", str(color_folder), "--out", str(cli_out), "--backbone", "tiny", "--k", "3",
                              "--seed", "2", "--cache-dir", str(cache_dir), "--set", "cluster.iters=5", "-q"])
    assert res.exit_code == 0, res.output
    run = selflabel.label(color_folder, out=api_out, backbone="tiny", k=3, seed=2, cache_dir=cache_dir,
                          overrides=["cluster.iters=5"])
    assert isinstance(run, selflabel.Run) and run.path == api_out
    assert (api_out / "labels.csv").read_text() == (cli_out / "labels.csv").read_text()
    cfg_api = json.loads((api_out / "manifest.json").read_text())["config"]
    cfg_cli = json.loads((cli_out / "manifest.json").read_text())["config"]
    assert {**cfg_api, "out": None} == {**cfg_cli, "out": None}  # the same resolved config but --out
    np.testing.assert_array_equal(np.load(api_out / "prototypes.npy"), np.load(cli_out / "prototypes.npy"))


def test_label_api_defaults_are_the_cli_defaults():
    cfg = selflabel.run_config("imgs")
    assert cfg.out == "runs/latest" and cfg.cluster.method == "neighbors" and cfg.cluster.k is None
    assert cfg.backbone.name == "mobilenet_v2" and cfg.dense.enabled is False
    with pytest.raises(InputError, match="cluster.k"):
        selflabel.run_config("imgs", k="many")


@pytest.fixture
def run(color_folder, cache_dir, tmp_path) -> selflabel.Run:
    return selflabel.label(color_folder, out=tmp_path / "run", backbone="tiny", k=3, seed=0, cache_dir=cache_dir,
                           gt="folders")


def test_run_labels_reflect_review_edits(run):
    df = run.labels
    assert list(df.columns[:5]) == ["path", "cluster", "name", "confidence", "status"] and "gt" in df
    assert len(df) == 24 and set(df.status) == {"ok"}
    red, green = _cluster_of(run, "red"), _cluster_of(run, "green")
    moved = df.path[df.path.str.startswith("blue/")].iloc[0]
    with ReviewStore(run.path) as store:
        store.rename(red, "tomato")
        store.move([moved], green)
        store.set_status(list(df.path[df.cluster == green][:2]), "rejected")
    after = selflabel.Run.open(run.path).labels
    assert set(after.name[after.cluster == red]) == {"tomato"}
    assert after.set_index("path").loc[moved, "cluster"] == green
    assert (after.status == "rejected").sum() == 2
    clusters = run.clusters
    assert clusters.images.sum() == 24 and clusters.rejected.sum() == 2
    assert clusters.set_index("cluster").loc[green, "images"] == 9  # 8 green + the moved blue
    assert run.features.shape == (24, 64) and isinstance(run.features, np.memmap)
    target = run.export("csv", run.path / "out.csv")
    text = target.read_text()
    assert "tomato" in text and target.is_file()


@pytest.mark.parametrize("method", ["neighbors", "sinkhorn", "kmeans", "sela", "swav"])
def test_stored_geometry_is_the_same_for_every_method(color_folder, cache_dir, tmp_path, method):
    run = selflabel.label(color_folder, out=tmp_path / method, backbone="tiny", k=3, method=method, cache_dir=cache_dir,
                          overrides=["sela.epochs=2", "swav.epochs=2", "neighbors.epochs=2"])
    g = load_geometry(run.path)
    feats = np.asarray(run.features, dtype=np.float64)
    np.testing.assert_allclose(g.mean, feats.mean(0), rtol=1e-5, atol=1e-6)  # the centring mean is stored
    labels = run.labels.cluster.to_numpy()
    x = prepare(feats, g.mean).numpy()
    sums = np.stack([x[labels == c].sum(0) for c in range(3)])
    norms = np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)  # an empty cluster: a zero row
    np.testing.assert_allclose(g.prototypes, sums / norms, atol=1e-5)
    assert g.method == method and g.temperature == {"sela": 0.1, "swav": 0.1}.get(method, 0.1)
    if method in ("neighbors", "sinkhorn", "kmeans"):  # the run's confidences are the geometry's probabilities
        p = g.probabilities(feats)
        np.testing.assert_allclose(p[np.arange(24), labels], run.labels.confidence, atol=1e-5)


def test_assign_carries_the_review_to_new_images(run, cache_dir, tmp_path):
    new = tmp_path / "new"
    for ci, (name, color) in enumerate(COLORS.items()):
        for i in range(4):
            make_image(new / name / f"late_{i}.png", color, seed=1000 + ci * 10 + i)
    shutil.copy(sorted((run.path.parent / "imgs" / "red").iterdir())[0], new / "red" / "seen_before.png")
    red, green = _cluster_of(run, "red"), _cluster_of(run, "green")
    with ReviewStore(run.path) as store:
        store.rename(red, "tomato")
        store.set_status(list(run.labels.path[run.labels.cluster == green]), "rejected")  # the whole cluster
    res = runner.invoke(app, ["assign", str(run.path), str(new), "--out", str(tmp_path / "assigned"), "--cache-dir",
                              str(cache_dir), "-q"])
    assert res.exit_code == 0, res.output
    out = selflabel.Run.open(tmp_path / "assigned")
    check_run_dir(out.path)  # the review app opens it
    df = out.labels.set_index("path")
    assert len(df) == 13
    assert set(df.name[df.index.str.startswith("red/")]) == {"tomato"}
    assert set(df.cluster[df.index.str.startswith("green/")]) == {green}
    assert set(df.status[df.index.str.startswith("green/")]) == {"rejected"}  # the rejection carried over
    assert set(df.status[df.index.str.startswith("blue/")]) <= {"ok", "unsure"}
    man = json.loads((out.path / "manifest.json").read_text())
    assert man["features"]["computed"] == 12 and man["features"]["cached"] == 1  # only new features computed
    assert man["assigned_from"]["rejected_clusters"] == [green]
    # the new run's geometry is the reviewed one: assigning its own images again gives the same clusters
    again = out.assign(new, tmp_path / "again")
    assert list(again.labels.cluster) == list(out.labels.cluster)
    assert set(again.labels.name[again.labels.path.str.startswith("red/")]) == {"tomato"}
    rows, names, rejected, _ = effective_labels(out.path)
    assert names[red] == "tomato" and len(rejected) == 4


def test_assign_refuses_bad_input_before_work(run, tmp_path):
    res = runner.invoke(app, ["assign", str(tmp_path / "nope"), str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not a selflabel run folder" in res.output
    res = runner.invoke(app, ["assign", str(run.path), str(tmp_path), "--out", str(run.path)])
    assert res.exit_code == 2 and "must not overwrite" in res.output
    (run.path / "geometry.json").unlink()
    res = runner.invoke(app, ["assign", str(run.path), str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "geometry.json: missing" in res.output


def test_review_app_opens_an_assigned_run(run, cache_dir, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    red = _cluster_of(run, "red")
    with ReviewStore(run.path) as store:
        store.rename(red, "tomato")
    new = tmp_path / "new"
    for i in range(3):
        make_image(new / "red" / f"late_{i}.png", COLORS["red"], seed=2000 + i)
    assigned = run.assign(new, tmp_path / "assigned", cache_dir=cache_dir)
    monkeypatch.setenv("SELFLABEL_RUN", str(assigned.path))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app" / "review_app.py"), default_timeout=60).run()
    assert not at.exception, at.exception
    shown = " ".join(str(e.value) for e in [*at.markdown, *at.caption, *at.selectbox] if getattr(e, "value", None))
    shown += " ".join(str(o) for sb in at.selectbox for o in sb.options)
    assert "tomato" in shown


def test_assign_places_old_images_where_the_clustering_placed_them(run, color_folder, cache_dir, tmp_path):
    again = run.assign(color_folder, tmp_path / "again", cache_dir=cache_dir)
    old, new = run.labels, again.labels
    assert list(old.path) == list(new.path)
    same = (old.cluster == new.cluster).to_numpy()
    assert same.mean() == 1.0  # separable colours: the nearest prototype is the balanced label
    # the confidence the clustering gave (cluster.py's own preparation) is the one the stored geometry gives
    np.testing.assert_allclose(new.confidence[same], old.confidence[same], atol=1e-5)
    assert json.loads((again.path / "manifest.json").read_text())["features"]["computed"] == 0


def test_assign_checks_the_weights_not_the_preprocessing_version(run, color_folder, cache_dir, tmp_path, caplog):
    """A run labelled before a preprocessing change still takes new images (with a warning); other
    weights are refused before any work."""
    man_path = run.path / "manifest.json"
    man = json.loads(man_path.read_text())
    key = man["backbone"]["cache_key"]
    man["backbone"]["cache_key"] = key.removesuffix("-tv")  # as an earlier version wrote it
    man_path.write_text(json.dumps(man))
    with caplog.at_level("WARNING"):
        again = run.assign(color_folder, tmp_path / "again", cache_dir=cache_dir)
    assert len(again.labels) == len(run.labels) and "earlier preprocessing" in caplog.text
    man["backbone"]["cache_key"] = key.replace(key.split("-")[1], "otherweights", 1)
    man_path.write_text(json.dumps(man))
    res = runner.invoke(app, ["assign", str(run.path), str(color_folder), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "weights differ" in res.output
