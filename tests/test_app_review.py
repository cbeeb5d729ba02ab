"""The Streamlit review app, driven by AppTest: each action lands in the database and in the exports."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from streamlit.testing.v1 import AppTest

from benchmarks.sample_run import make_sample_run
from selflabel.annotations import rle_to_mask
from selflabel.export import export_run, formats_for
from selflabel.review.store import ReviewStore
from selflabel.runfiles import LabelRow, read_labels, write_labels

APP = Path(__file__).resolve().parents[1] / "app" / "review_app.py"


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    return make_sample_run(tmp_path, per_class=10, mistakes=3)


def open_app(run: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("SELFLABEL_RUN", str(run))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception, at.exception
    return at


def show(at: AppTest, view: str, cluster: int | None = None) -> AppTest:
    if cluster is not None:
        at.selectbox(key="cluster").set_value(cluster)
    at.radio(key="view").set_value(view).run()
    assert not at.exception, at.exception
    return at


def click(at: AppTest, key: str) -> AppTest:
    at.button(key=key).click().run()
    assert not at.exception, at.exception
    return at


def db(run: Path) -> ReviewStore:
    return ReviewStore(run)


def exported_csv(run: Path) -> dict[str, dict[str, str]]:
    with open(run / "exports" / "labels.csv", newline="") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def test_every_view_renders(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_app(run, monkeypatch)
    assert at.radio(key="view").options == ["Overview", "Suggestions", "Cluster", "Duplicates", "Map", "Export"]  # no dense outputs here
    assert "4 clusters · 40 images" in at.header[0].value
    assert sorted(b.key for b in at.button if b.key.startswith("open|")) == [f"open|{i}" for i in range(4)]
    show(at, "Cluster", 0)
    sizes = {c.id: c.size for c in db(run).clusters()}
    assert len([c for c in at.checkbox if c.key.startswith("sel|")]) == sizes[0]
    show(at, "Map")
    assert len(at.get("vega_lite_chart")) == 2  # size bars and the feature map
    show(at, "Export")
    assert [b.key for b in at.button if b.key.startswith("export|")] == [f"export|{f}" for f in formats_for(run)]
    assert "export|yolo-seg" not in [b.key for b in at.button]  # not a dense run: no instance masks to export


def test_open_card_shows_its_cluster(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = click(open_app(run, monkeypatch), "open|2")
    assert at.radio(key="view").value == "Cluster" and at.selectbox(key="cluster").value == 2
    assert at.header[0].value == "cluster_02"


def test_rename_then_export_csv(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = show(open_app(run, monkeypatch), "Cluster", 1)
    at.text_input(key="rename|1").input("grass")
    click(at, "rename")
    assert at.success[0].value == "Renamed."
    assert db(run).names()[1] == "grass"
    assert at.header[0].value == "grass"
    click(show(at, "Export"), "export|csv")
    rows = exported_csv(run)
    assert len(rows) == 40
    assert {r["name"] for r in rows.values() if r["cluster"] == "1"} == {"grass"}


def test_merge(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {c.id: c.size for c in db(run).clusters()}
    at = show(open_app(run, monkeypatch), "Cluster", 0)
    at.multiselect(key="merge_sources").set_value([2, 3])
    click(at, "merge")
    after = {c.id: c.size for c in db(run).clusters()}
    assert after == {0: before[0] + before[2] + before[3], 1: before[1]}
    assert at.selectbox(key="cluster").options == [f"cluster_00 ({after[0]})", f"cluster_01 ({after[1]})"]
    click(show(at, "Export"), "export|imagefolder")
    tree = run / "exports" / "imagefolder"
    assert {p.name: len(list(p.iterdir())) for p in tree.iterdir()} == {"cluster_00": after[0], "cluster_01": after[1]}


def test_split(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = show(open_app(run, monkeypatch), "Cluster", 0)
    members = {m.path for m in db(run).members(0)}
    at.number_input(key="split_k").set_value(2)
    at.selectbox(key="split_method").set_value("kmeans")
    click(at, "split")
    s = db(run)
    assert s.cluster_size(0) == 0
    new = s.history(1)[0].args["new"]
    assert new == [4, 5] and {m.path for i in new for m in s.members(i)} == members
    assert at.selectbox(key="cluster").value in {1, 2, 3, 4, 5}  # the emptied cluster is no longer selected


def test_move_selected_images(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = show(open_app(run, monkeypatch), "Cluster", 0)
    picked = [m.path for m in db(run).members(0, least_confident=True, limit=2)]
    for p in picked:
        at.checkbox(key=f"sel|{p}").check()
    at.selectbox(key="move_target").set_value(3).run()
    click(at, "move")
    s = db(run)
    assert {s.member(p).cluster for p in picked} == {3}
    assert all(not c.value for c in at.checkbox if c.key.startswith("sel|"))  # selection cleared
    # and into a new, named cluster
    show(at, "Cluster", 3)
    at.checkbox(key=f"sel|{picked[0]}").check()
    at.selectbox(key="move_target").set_value(-1)
    at.text_input(key="move_name").input("odd").run()
    click(at, "move")
    s = db(run)
    assert s.member(picked[0]).cluster == 4 and s.names()[4] == "odd"


def test_reject_and_unsure_then_export_all_formats(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = show(open_app(run, monkeypatch), "Cluster", 1)
    paths = [m.path for m in db(run).members(1)]
    at.checkbox(key=f"sel|{paths[0]}").check().run()
    click(at, "status|rejected")
    at.checkbox(key=f"sel|{paths[1]}").check().run()
    click(at, "status|unsure")
    s = db(run)
    assert s.member(paths[0]).status == "rejected" and s.member(paths[1]).status == "unsure"
    show(at, "Export")
    for fmt in ("csv", "imagefolder", "coco"):
        click(at, f"export|{fmt}")
    assert sorted(b.key for b in at.download_button) == ["download|coco", "download|csv"]
    rows = exported_csv(run)
    assert paths[0] not in rows and rows[paths[1]]["status"] == "unsure" and len(rows) == 39
    coco = json.loads((run / "exports" / "coco.json").read_text())
    assert len(coco["images"]) == 39
    assert paths[0] not in {im["file_name"] for im in coco["images"]}
    assert sorted(c["name"] for c in coco["categories"]) == [f"cluster_{i:02d}" for i in range(4)]
    assert sum(len(list(d.iterdir())) for d in (run / "exports" / "imagefolder").iterdir()) == 39


def test_undo_restores_the_previous_state(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = show(open_app(run, monkeypatch), "Cluster", 2)
    assert at.button(key="undo").disabled
    start = db(run).state()
    at.text_input(key="rename|2").input("sky")
    click(at, "rename")
    renamed = db(run).state()
    at.multiselect(key="merge_sources").set_value([0])
    click(at, "merge")
    assert db(run).cluster_size(0) == 0
    click(at, "undo")
    assert db(run).state() == renamed and db(run).names()[2] == "sky"
    click(at, "undo")
    assert db(run).state() == start
    assert at.button(key="undo").disabled


def test_two_tabs_edit_the_same_run(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tab1 = show(open_app(run, monkeypatch), "Cluster", 0)
    tab2 = show(open_app(run, monkeypatch), "Cluster", 1)
    tab1.text_input(key="rename|0").input("reds")
    tab2.text_input(key="rename|1").input("greens")
    click(tab1, "rename")
    click(tab2, "rename")
    assert db(run).names() == {0: "reds", 1: "greens", 2: "cluster_02", 3: "cluster_03"}
    tab1.run()
    assert "greens (" in " ".join(tab1.selectbox(key="cluster").options)  # each tab sees the other's edits


def test_a_crafted_path_is_never_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_sample_run(tmp_path)
    Image.new("RGB", (24, 24), (255, 255, 255)).save(tmp_path / "secret.png")  # white: no other image is
    rows = read_labels(run)
    rows[0] = LabelRow("../secret.png", rows[0].cluster, 0.99)  # most confident: first in the grid
    write_labels(run / "labels.csv", rows)
    at = show(open_app(run, monkeypatch), "Cluster", rows[0].cluster)
    assert "(unreadable)" in [c.value for c in at.caption]
    at.selectbox(key="inspect").set_value("../secret.png").run()
    assert not at.exception
    assert any("refusing" in e.value for e in at.error)
    assert all(url for img in at.get("image") for url in img.value)  # the other images are shown
    thumbs = list((run / "thumbs").iterdir())
    assert len(thumbs) >= 9
    for t in thumbs:  # no thumbnail of the secret was made
        with Image.open(t) as im:
            assert np.asarray(im.convert("L")).min() < 250


def test_dense_view(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_sample_run(tmp_path, dense=True)
    at = open_app(run, monkeypatch)
    assert "Dense" in at.radio(key="view").options
    show(at, "Dense")
    assert [h.value for h in at.header] == ["Concept graph", "Mask overlays (4)"]
    images = at.get("image")
    assert len(images) == 5  # the graph figure and four overlays
    assert sorted(c for img in images[1:] for c in img.captions) == sorted(
        d["id"] for d in json.loads((run / "dense" / "dense.json").read_text())["images"])
    assert len(at.dataframe) == 1 and list(at.dataframe[0].value["name"]) == [f"concept_0{i}" for i in range(1, 5)]
    at.toggle(key="part_graph").set_value(True).run()
    assert not at.exception and len(at.get("image")) == 5
    # and the overlay of an image is shown beside it in the Cluster view
    first = json.loads((run / "dense" / "dense.json").read_text())["images"][0]["id"]
    cid = ReviewStore(run).member(first).cluster
    show(at, "Cluster", cid)
    at.selectbox(key="inspect").set_value(first).run()
    assert not at.exception
    assert "concept mask overlay" in [c for img in at.get("image") for c in img.captions]


def test_rename_concept_and_reject_then_export_dense_coco(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_sample_run(tmp_path, dense=True)
    entries = json.loads((run / "dense" / "dense.json").read_text())["images"]
    at = show(open_app(run, monkeypatch), "Dense")
    at.selectbox(key="concept").set_value(2)
    at.text_input(key="concept_name").input("road sign")
    click(at, "rename_concept")
    assert list(at.dataframe[0].value["name"]) == ["concept_01", "road sign", "concept_03", "concept_04"]
    assert db(run).concept_names() == {2: "road sign"}
    # reject the first dense image in its cluster, then export COCO from the Export view
    first = entries[0]["id"]
    db(run).set_status([first], "rejected")
    show(at, "Export")
    click(at, "export|coco")
    coco = COCO(str(run / "exports" / "coco.json"))
    names = {c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert "road sign" in names and "concept_02" not in names
    files = {im["file_name"] for im in coco.loadImgs(coco.getImgIds())}
    assert files == {e["id"] for e in entries[1:]}  # the rejected image is left out
    for im in coco.loadImgs(coco.getImgIds()):  # masks still decode to the label maps, concept by concept
        entry = next(e for e in entries if e["id"] == im["file_name"])
        lm = np.asarray(Image.open(run / "dense" / entry["map"]))
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]])):
            assert rle_to_mask(ann["segmentation"]).sum() == ann["area"] and (lm[rle_to_mask(ann["segmentation"]) > 0] > 0).all()
    # two undos (the rejection, then the rename) bring the default name back; the CLI's export sees it
    click(at, "undo")
    assert db(run).concept_names() == {2: "road sign"} and db(run).member(first).status == "ok"
    click(at, "undo")
    assert db(run).concept_names() == {}
    path, n = export_run(run, "coco", tmp_path / "cli.json")
    coco = COCO(str(path))
    assert n == 4 and "concept_02" in {c["name"] for c in coco.loadCats(coco.getCatIds())}


def test_no_run_folder_is_an_error_not_a_crash(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SELFLABEL_RUN", str(tmp_path))
    at = AppTest.from_file(str(APP), default_timeout=30).run()
    assert not at.exception
    assert "not a selflabel run folder" in at.error[0].value
