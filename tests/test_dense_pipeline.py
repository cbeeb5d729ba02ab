import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from selflabel.backbones import create_backbone
from selflabel.config import RunConfig
from selflabel.data import scan_folder
from selflabel.dense.evaluate import evaluate_dense, find_label_map
from selflabel.dense.graph import load_graph
from selflabel.dense.pipeline import concepts_from_parts, segment
from selflabel.export.coco import export_coco_dense

SKY, ROAD, CAR = (70, 130, 220), (110, 110, 110), (200, 30, 30)


def _scenes(root, n=10, seed=0):
    """Street-like scenes: sky over road with one or two red cars; labels 0 sky, 1 road, 2 car, 255 void."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("sky\nroad\ncar\n")
    for i in range(n):
        H, W = 48, 64
        horizon = int(rng.integers(18, 26))
        lab = np.ones((H, W), np.uint8)
        lab[:horizon] = 0
        for _ in range(int(rng.integers(1, 3))):
            y, x = int(rng.integers(horizon - 6, H - 14)), int(rng.integers(0, W - 20))
            lab[y:y + 12, x:x + 20] = 2
        colours = np.array([SKY, ROAD, CAR], np.float32)
        img = colours[lab] + rng.normal(0, 12, (H, W, 3))
        lab[0, :4] = 255
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "images" / f"s{i:02d}.jpg", quality=95)
        Image.fromarray(lab).save(root / "labels" / f"s{i:02d}.png")
    (root / "images" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return root


def _tiny_dense_config(n_overlays: int) -> RunConfig:
    """The small dense settings both fixtures run with (tiny backbone, 48 px, 12 parts)."""
    cfg = RunConfig()
    cfg.backbone.num_workers = 0
    cfg.backbone.amp = "fp32"
    cfg.dense.image_size = 48
    cfg.dense.k_parts = 12
    cfg.dense.pca_dim = 16
    cfg.dense.min_area = 16
    cfg.dense.n_overlays = n_overlays
    return cfg


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    root = _scenes(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("run")
    cfg = _tiny_dense_config(n_overlays=3)
    # the fixed settings and the fg/bg split; refined_run runs the label-free defaults without the split
    cfg.dense.select, cfg.dense.fg_cut, cfg.dense.split_fg = "fixed", "fixed", True
    scan = scan_folder(root)
    summary = segment(scan.records, create_backbone("tiny"), cfg, out, torch.device("cpu"), show_progress=False)
    return root, out, summary


def test_outputs_and_summary(dense_run):
    root, out, summary = dense_run
    d = out / "dense"
    meta = json.loads((d / "dense.json").read_text())
    assert summary["n_images"] == 10 and summary["n_skipped"] == 1
    assert meta["skipped"][0]["path"] == "images/broken.jpg"
    assert summary["k_parts"] == 12 and summary["n_concepts"] == len(meta["concepts"]) >= 2
    assert [c["id"] for c in meta["concepts"]] == list(range(1, summary["n_concepts"] + 1))
    assert all(c["name"] == f"concept_{c['id']:02d}" for c in meta["concepts"])
    assert sorted(p for c in meta["concepts"] for p in c["parts"]) == list(range(12))
    assert len(list((d / "overlays").rglob("*.png"))) == 3
    assert len(list((d / "maps").rglob("*.png"))) == 10
    assert np.load(d / "prototypes.npy").shape == (12, 16)
    for e in meta["images"]:
        lm = np.asarray(Image.open(d / e["map"]))
        assert lm.shape == (48, 64) and lm.dtype == np.uint8
        assert 0 < lm.max() <= summary["n_concepts"]
    g = load_graph(d / "graph.json")
    assert sorted(g.nodes) == list(range(12))
    assert [g.nodes[p]["concept"] for p in range(12)] == meta["part_concept"]
    assert all(g.nodes[u]["kind"] == g.nodes[v]["kind"] for u, v in g.edges)  # split_fg


def _assert_coco_decodes_to_maps(d, summary):
    meta = json.loads((d / "dense.json").read_text())
    coco = COCO(str(d / "coco.json"))
    assert len(coco.getImgIds()) == 10 and len(coco.getAnnIds()) == summary["n_annotations"] > 0
    kinds = {c["id"]: c["kind"] for c in meta["concepts"]}
    for img, e in zip(coco.loadImgs(sorted(coco.getImgIds())), meta["images"]):
        assert img["file_name"] == e["id"]
        lm = np.asarray(Image.open(d / e["map"]))
        painted = np.zeros_like(lm)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])):
            m = coco.annToMask(ann).astype(bool)
            painted[m] = ann["category_id"]
            assert ann["area"] >= e["min_area"]
        np.testing.assert_array_equal(painted, lm)
        stuff = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])) if kinds[a["category_id"]] == "stuff"]
        assert len(stuff) == len({a["category_id"] for a in stuff})  # one stuff annotation per concept per image
    return coco


def test_coco_round_trip(dense_run):
    _, out, summary = dense_run
    coco = _assert_coco_decodes_to_maps(out / "dense", summary)
    # renaming through the exporter keeps the masks
    export_coco_dense(out, out / "renamed.json", names={1: "road-ish"})
    renamed = COCO(str(out / "renamed.json"))
    assert renamed.loadCats(1)[0]["name"] == "road-ish"
    assert len(renamed.getAnnIds()) == len(coco.getAnnIds())


def test_evaluate_dense_scores(dense_run):
    root, out, _ = dense_run
    assert find_label_map(root, "images/s03.jpg") == root / "labels" / "s03.png"
    assert find_label_map(root / "images", "s03.jpg") == root / "labels" / "s03.png"
    res = evaluate_dense(out)
    assert res["n_images"] == 10 and res["n_classes"] == 3 and res["class_spec"].endswith("classes.txt")
    # measured (random-init `tiny` CNN, 6 x 8 patches): parts overclustering 0.71, concepts Hungarian 0.71
    assert res["parts"]["miou_overcluster"] > 0.6
    assert res["concepts"]["miou_hungarian"] > 0.6
    assert res["concepts"]["miou_overcluster"] >= res["concepts"]["miou_hungarian"] - 1e-9
    assert 0.25 < res["concepts"]["boundary_f"] <= 1.0  # measured 0.36 (blocky 6 x 8 patch maps, 1 px tolerance)
    res2 = evaluate_dense(out, labels_dir=root / "labels")
    assert res2["concepts"] == res["concepts"]


def test_concepts_scored_from_the_coco_export(dense_run, tmp_path):
    """source="coco" decodes the RLE masks of coco.json back into maps: the same maps, so the same scores; a
    mask removed from the export (and nothing else) lowers them, so the export is what is read."""
    import shutil

    from selflabel.dense.evaluate import coco_label_maps

    root, out, _ = dense_run
    d = out / "dense"
    meta = json.loads((d / "dense.json").read_text())
    maps = coco_label_maps(d / "coco.json")
    assert sorted(maps) == sorted(e["id"] for e in meta["images"])
    for e in meta["images"]:
        np.testing.assert_array_equal(maps[e["id"]], np.asarray(Image.open(d / e["map"])))
    from_coco = evaluate_dense(out, source="coco")
    assert from_coco["source"] == "coco" and from_coco["concepts"] == evaluate_dense(out)["concepts"]
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    doc = json.loads((cut / "dense" / "coco.json").read_text())
    doc["annotations"] = doc["annotations"][1:]
    (cut / "dense" / "coco.json").write_text(json.dumps(doc))
    assert evaluate_dense(cut, source="coco")["concepts"]["miou_hungarian"] < from_coco["concepts"]["miou_hungarian"]
    assert evaluate_dense(cut)["concepts"] == evaluate_dense(out)["concepts"]  # the PNG maps are untouched


@pytest.fixture(scope="module")
def refined_run(tmp_path_factory, dense_run):
    root, _, _ = dense_run
    out = tmp_path_factory.mktemp("refined")
    cfg = _tiny_dense_config(n_overlays=0)
    cfg.dense.refine = "guided"
    cfg.dense.guided_radius = 8
    cfg.dense.guided_subsample = 2
    cfg.dense.select = "stability"
    cfg.dense.fg_threshold = 0.99  # unused by fg_cut=otsu (a run that read it would fail Otsu's criterion below)
    cfg.dense.resolution_grid = [0.5, 2.0, 4.0, 8.0]  # without 1.0, the fixed default
    cfg.dense.select_seeds = 4
    summary = segment(scan_folder(root).records, create_backbone("tiny"), cfg, out, torch.device("cpu"),
                      show_progress=False)
    return root, out, summary


def test_refined_label_free_run_records_its_settings_and_round_trips(refined_run, dense_run):
    root, out, summary = refined_run
    d = out / "dense"
    settings = json.loads((d / "settings.json").read_text())
    meta = json.loads((d / "dense.json").read_text())
    assert meta["settings"] == settings and settings["select"] == "stability"
    assert [c["resolution"] for c in settings["curve"]] == [0.5, 2.0, 4.0, 8.0]
    assert all({"stability", "modularity", "n_concepts"} <= set(c) for c in settings["curve"])
    assert settings["resolution"] in (0.5, 2.0, 4.0, 8.0) and summary["resolution"] == settings["resolution"]
    assert load_graph(d / "graph.json").graph["resolution"] == settings["resolution"]
    assert summary["refine"] == "guided" and meta["config"]["refine"] == "guided"
    _assert_coco_decodes_to_maps(d, summary)
    fixed = json.loads((dense_run[1] / "dense" / "settings.json").read_text())
    vote = fixed.pop("consensus")  # the default vote of 5 fits, recorded with what each fit found
    assert vote["n_fits"] == 5 and vote["seeds"] == [0, 1, 2, 3, 4] and vote["cut"] == 0.5
    assert len(vote["n_concepts_per_fit"]) == 5 and vote["n_concepts"] == dense_run[2]["n_concepts"]
    assert -1 <= vote["agreement_min"] <= vote["agreement"] <= 1
    assert fixed == {"select": "fixed", "resolution": 1.0, "n_concepts": dense_run[2]["n_concepts"],
                     "parts": {"k_parts_select": "fixed", "k_parts": 12},
                     "foreground": {"fg_cut": "fixed", "fg_threshold": 0.5, "n_foreground_parts": fixed["foreground"][
                         "n_foreground_parts"], "rule": "dense.fg_threshold"}}
    fg = settings["foreground"]  # the default cut: Otsu's, between two of the recorded part precisions
    assert fg["fg_cut"] == "otsu" and fg["rule"].startswith("Otsu")
    prec = np.array(meta["part_fg_precision"])
    assert fg["n_foreground_parts"] == int((prec >= fg["fg_threshold"] - 1e-4).sum()) == sum(meta["part_foreground"])
    g = load_graph(d / "graph.json")
    seen = np.sort(prec[[g.nodes[p]["n_images"] > 0 for p in range(len(prec))]])

    def between(t):  # Otsu's criterion of a cut, by brute force
        lo, hi = seen[seen < t], seen[seen >= t]
        return len(lo) * len(hi) * (lo.mean() - hi.mean()) ** 2 if len(lo) and len(hi) else -1.0
    best = max(between((a + b) / 2) for a, b in zip(seen[:-1], seen[1:]) if b > a)
    assert between(fg["fg_threshold"]) >= best - 1e-6
    res = evaluate_dense(out)
    assert res["concepts"]["miou_hungarian"] > 0.5 and 0 <= res["concepts"]["boundary_f"] <= 1


@pytest.mark.parametrize("key,value,allowed", [("refine", "crf", "none, slic, guided"),
                                               ("select", "best", "fixed, stability")])
def test_refine_and_select_settings_are_checked(key, value, allowed):
    from selflabel.config import apply_overrides
    from selflabel.errors import InputError

    with pytest.raises(InputError, match=f"dense.{key}.*{allowed}"):
        apply_overrides(RunConfig(), [f"dense.{key}={value}"])


@pytest.mark.parametrize("key,value", [("guided_radius", 0), ("slic_segments", 0), ("select_seeds", 1),
                                       ("guided_eps", 0.0), ("resolution_grid", [])])
def test_refine_ranges_are_checked_before_the_run(key, value, tmp_path):
    from selflabel.dense.pipeline import check_refine_select
    from selflabel.errors import InputError

    cfg = RunConfig()
    cfg.dense.select = "stability"
    setattr(cfg.dense, key, value)
    with pytest.raises(InputError, match=f"dense.{key}"):
        check_refine_select(cfg.dense)


def test_concepts_numbered_by_area():
    comm = np.array([0, 0, 1, 2, 2])
    area = np.array([0.1, 0.1, 0.5, 0.2, 0.1])
    fg = np.array([True, True, False, False, False])
    cop, concepts = concepts_from_parts(comm, area, fg)
    assert cop.tolist() == [3, 3, 1, 2, 2]
    assert [c["kind"] for c in concepts] == ["stuff", "stuff", "thing"]
    assert concepts[0]["area_fraction"] == pytest.approx(0.5)


def test_label_maps_beside_images_are_not_segmented(tmp_path):
    from selflabel.data import ImageRecord
    from selflabel.dense.pipeline import drop_label_maps

    ids = ["images/a.jpg", "labels/a.png", "labels/b.png", "x/images/c.jpg", "x/labels/c.png", "other/labels/c.png"]
    kept = drop_label_maps([ImageRecord(i, tmp_path / i) for i in ids])
    assert [r.id for r in kept] == ["images/a.jpg", "labels/b.png", "x/images/c.jpg", "other/labels/c.png"]
