"""Exports through one view (review edits, names, left-out images) and each format loaded by its real
consumer where it is installed (datasets, label-studio-sdk, ultralytics, fiftyone, pycocotools)."""
from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.path import Path as MplPath

from selflabel.annotations import mask_polygons
from selflabel.export import FORMATS, export_run
from selflabel.export.view import build_view
from selflabel.export.yolo import split_paths
from selflabel.errors import InputError
from benchmarks.sample_run import CLASSES, make_sample_run
from selflabel.review.store import ReviewStore
from selflabel.runfiles import read_labels
from selflabel.suggest import vote_names, write_votes


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    """A sample run (4 clusters x 10) with per-image votes: cluster c votes CLASSES[c] 8 times in 10."""
    r = make_sample_run(tmp_path, per_class=10, mistakes=0, dense=True)
    rows = read_labels(r)
    votes = np.array([row.cluster if i % 10 < 8 else 4 for i, row in enumerate(rows)])
    write_votes(r, votes, [*CLASSES, "other"], source="test")
    return r


def reviewed(run: Path) -> tuple[str, str]:
    """Rename cluster 1, reject one image of cluster 0; returns (rejected path, a kept path of cluster 2)."""
    rows = read_labels(run)
    rejected = next(r.path for r in rows if r.cluster == 0)
    kept = next(r.path for r in rows if r.cluster == 2)
    with ReviewStore(run) as store:
        store.rename(1, "meadow")
        store.set_status([rejected], "rejected")
    return rejected, kept


def test_vote_names_majority_share_and_alternatives():
    votes = np.array([0, 0, 0, 1, 2, 2, 2, 2, -1])
    clusters = np.array([5, 5, 5, 5, 7, 7, 7, 9, 9])
    names = vote_names(votes, clusters, ["church", "tench", "golf ball"])
    assert set(names) == {5, 7, 9}
    assert (names[5].name, names[5].share, names[5].n) == ("church", 0.75, 4)
    assert names[5].alternatives == (("tench", 0.25),)
    assert names[5].label == "church (75 %)"
    assert (names[9].name, names[9].n) == ("golf ball", 1)  # the -1 vote (image not seen) counts for nothing


def test_view_applies_review_names_and_leave_out(run: Path):
    rejected, kept = reviewed(run)
    view = build_view(run)
    paths = {i.path for i in view.items}
    assert rejected not in paths and len(paths) == 39
    assert view.names[1] == "meadow" and view.names[0] == "cluster_00"
    item = next(i for i in view.items if i.cluster == 2)
    assert item.suggested_name == f"{CLASSES[2]} (80 %)"
    # suggested: clusters the user did not rename take their suggested name, the renamed keep the user's
    view = build_view(run, names="suggested", leave_out={kept})
    assert view.names[1] == "meadow" and view.names[0] == CLASSES[0]
    assert kept not in {i.path for i in view.items} and len(view.items) == 38
    with pytest.raises(InputError, match="names policy"):
        build_view(run, names="bogus")


def test_suggested_names_follow_a_review_merge(run: Path):
    with ReviewStore(run) as store:
        store.merge([3], 2)
    view = build_view(run)
    # cluster 2 now holds 20 images: 8 votes for CLASSES[2], 8 for CLASSES[3], 4 for "other"
    s = view.suggested[2]
    assert s.n == 20 and s.share == 0.4 and s.name in (CLASSES[2], CLASSES[3])
    assert 3 not in view.suggested


def test_csv_has_status_and_suggested_name(run: Path, tmp_path: Path):
    rejected, _ = reviewed(run)
    path, n = export_run(run, "csv", tmp_path / "l.csv", include_rejected=True)
    rows = {r["path"]: r for r in csv.DictReader(open(path))}
    assert n == 40 and rows[rejected]["status"] == "rejected"
    assert {r["suggested_name"] for r in rows.values() if r["cluster"] == "1"} == {f"{CLASSES[1]} (80 %)"}
    assert {r["name"] for r in rows.values() if r["cluster"] == "1"} == {"meadow"}


def test_mask_polygons_cover_the_mask():
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = np.zeros((60, 80), dtype=bool)
        cy, cx, ry, rx = rng.integers(15, 45), rng.integers(20, 60), rng.integers(5, 14), rng.integers(5, 18)
        yy, xx = np.mgrid[:60, :80]
        m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        m[cy, : cx] = True  # a thin arm: one pixel wide
        poly = mask_polygons(m)[0]
        # polygons are in pixel-edge coordinates: pixel (i, j) is inside when its centre (j+.5, i+.5) is
        centres = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1)
        back = MplPath(poly).contains_points(centres).reshape(m.shape)
        np.testing.assert_array_equal(back, m)
    two = np.zeros((10, 10), dtype=bool)
    two[1:3, 1:3] = two[5:9, 5:9] = True
    assert len(mask_polygons(two)) == 2 and abs(mask_polygons(two)[0]).max() <= 10


def test_split_paths_is_deterministic_per_class():
    by_class = {"a": [f"a/{i}.jpg" for i in range(10)], "b": ["b/0.jpg", "b/1.jpg"], "c": ["c/0.jpg"]}
    s = split_paths(by_class, 0.2)
    assert sum(v == "val" for k, v in s.items() if k.startswith("a/")) == 2
    assert sorted(s[p] for p in by_class["b"]) == ["train", "val"] and s["c/0.jpg"] == "train"
    assert split_paths(by_class, 0.2) == s


def test_labelstudio_tasks_are_predictions_with_scores(run: Path, tmp_path: Path):
    rejected, _ = reviewed(run)
    out, n = export_run(run, "labelstudio", tmp_path / "ls", url_prefix="http://localhost:8081/img")
    tasks = json.loads((out / "tasks.json").read_text())
    conf = {r.path: r.confidence for r in read_labels(run)}
    assert n == len(tasks) == 39 and rejected not in {t["data"]["path"] for t in tasks}
    for t in tasks:
        assert "annotations" not in t
        (pred,) = t["predictions"]
        assert pred["score"] == pytest.approx(conf[t["data"]["path"]], abs=1e-6) and pred["model_version"]
        assert t["data"]["image"].startswith("http://localhost:8081/img/")
    meadow = [t for t in tasks if t["predictions"][0]["result"][0]["value"]["choices"] == ["meadow"]]
    assert len(meadow) == 10
    polys = [r for t in tasks for r in t["predictions"][0]["result"] if r["type"] == "polygonlabels"]
    assert len(polys) == 3  # the sample maps 4 images (one square each); the rejected image is one of them
    pts = np.array(polys[0]["value"]["points"])
    assert pts.min() >= 25 - 1e-6 and pts.max() <= 75 + 1e-6  # the 12 x 12 square at 6..18 of 24 px, in percent
    cfg = ET.fromstring((out / "config.xml").read_text())
    assert "meadow" in [c.get("value") for c in cfg.iter("Choice")]
    assert {lab.get("value") for lab in cfg.iter("Label")} == {f"concept_{i:02d}" for i in range(1, 5)}


def test_labelstudio_sdk_accepts_config_and_predictions(run: Path, tmp_path: Path):
    li_mod = pytest.importorskip("label_studio_sdk.label_interface", reason="label-studio-sdk not installed")
    out, _ = export_run(run, "labelstudio", tmp_path / "ls")
    li = li_mod.LabelInterface((out / "config.xml").read_text())
    tasks = json.loads((out / "tasks.json").read_text())
    assert tasks[0]["data"]["image"].startswith("/data/local-files/?d=")
    for t in tasks:
        assert li.validate_prediction(t["predictions"][0]), t["predictions"][0]
    bad = {"result": [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["nope"]}}]}
    assert not li.validate_prediction(bad)  # the check can fail: a class the config does not list


def test_yolo_cls_tree(run: Path, tmp_path: Path):
    reviewed(run)
    out, n = export_run(run, "yolo-cls", tmp_path / "ycls", names="suggested", mode="symlink")
    assert n == 39
    for split in ("train", "val"):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted([CLASSES[0], "meadow", CLASSES[2], CLASSES[3]])
    assert sum(1 for _ in (out / "val").rglob("*.png")) == 8  # 2 of each class's 9 or 10
    utils = pytest.importorskip("ultralytics.data.utils", reason="ultralytics not installed")
    info = utils.check_cls_dataset(out)
    assert info["nc"] == 4 and sorted(info["names"].values()) == sorted([CLASSES[0], "meadow", CLASSES[2], CLASSES[3]])


def test_yolo_seg_labels_and_data_yaml(run: Path, tmp_path: Path):
    out, n = export_run(run, "yolo-seg", tmp_path / "yseg")
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert n == 4 and data["names"] == {i: f"concept_{i + 1:02d}" for i in range(4)}
    labels = sorted((out / "labels").rglob("*.txt"))
    assert len(labels) == 4 and len(list((out / "images").rglob("*.png"))) == 4
    for lab in labels:
        (line,) = lab.read_text().splitlines()
        vals = np.array(line.split()[1:], dtype=float).reshape(-1, 2)
        assert vals.min() >= 0.25 - 1e-6 and vals.max() <= 0.75 + 1e-6
    with pytest.raises(InputError, match="dense run"):
        export_run(make_sample_run(tmp_path / "flat"), "yolo-seg")
    dataset = pytest.importorskip("ultralytics.data.dataset", reason="ultralytics not installed")
    utils = pytest.importorskip("ultralytics.data.utils")
    cfg = utils.check_det_dataset(str(out / "data.yaml"))
    ds = dataset.YOLODataset(img_path=cfg["train"], data=cfg, task="segment", imgsz=32, augment=False)
    assert len(ds.labels) == len(list((out / "labels" / "train").glob("*.txt")))
    assert all(len(lb["segments"]) == 1 and lb["cls"].shape == (1, 1) for lb in ds.labels)


def test_hf_imagefolder_loads_with_datasets(run: Path, tmp_path: Path):
    reviewed(run)
    out, n = export_run(run, "hf", tmp_path / "hf")
    meta = list(csv.DictReader(open(out / "metadata.csv")))
    assert n == len(meta) == 39 and all((out / m["file_name"]).is_file() for m in meta)
    datasets = pytest.importorskip("datasets", reason="datasets not installed")
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hfcache"))
    assert len(ds) == 39 and {"image", "label", "confidence", "suggested_name"} <= set(ds.column_names)
    assert sorted(set(ds["label"])) == ["cluster_00", "cluster_02", "cluster_03", "meadow"]
    assert ds[0]["image"].size == (24, 24)


def test_fiftyone_loads_coco_and_imagefolder(run: Path, tmp_path: Path):
    fo = pytest.importorskip("fiftyone", reason="fiftyone not installed")
    reviewed(run)
    tree, n = export_run(run, "imagefolder", tmp_path / "tree")
    try:
        fo.list_datasets()  # FiftyOne keeps its datasets in MongoDB: its own mongod, or config.database_uri
    except Exception as exc:  # ServiceExecutableNotFound, FiftyOneConfigError, ConnectionError
        pytest.skip(f"fiftyone is installed but its database does not start: {type(exc).__name__}")
    ds = fo.Dataset.from_dir(dataset_dir=str(tree), dataset_type=fo.types.ImageClassificationDirectoryTree)
    assert len(ds) == n == 39 and "meadow" in ds.distinct("ground_truth.label")
    coco, _ = export_run(run, "coco", tmp_path / "coco.json")
    root = json.loads((run / "manifest.json").read_text())["data_root"]
    dense = fo.Dataset.from_dir(dataset_type=fo.types.COCODetectionDataset, data_path=root,
                                labels_path=str(coco), label_types=["segmentations"])
    assert len(dense) >= 1


def test_every_format_exports(run: Path, tmp_path: Path):
    for fmt in FORMATS:
        target, n = export_run(run, fmt, tmp_path / fmt)
        assert target.exists() and n > 0, fmt
