import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from selflabel.annotations import (
    categories_from_names,
    label_map_annotations,
    mask_bbox,
    mask_to_rle,
    paint_annotations,
    rle_to_mask,
)
from selflabel.export.coco import export_coco_dense, export_coco_image_level
from selflabel.runfiles import LabelRow


def _label_map() -> np.ndarray:
    """Concept 1 = stuff (sky band + a detached patch), concepts 2 and 3 = things with 2 and 1 components."""
    lm = np.zeros((40, 60), dtype=np.uint8)
    lm[:10] = 1
    lm[35:, 50:] = 1
    lm[15:25, 5:15] = 2  # car A
    lm[15:30, 40:48] = 2  # car B
    lm[28:33, 20:31] = 3
    return lm


def test_rle_round_trip_and_json_safe():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 13), (64, 48)]:
        m = rng.random(shape) > 0.6
        rle = mask_to_rle(m)
        assert isinstance(rle["counts"], str)
        assert rle["size"] == list(shape)
        back = rle_to_mask(json.loads(json.dumps(rle)))
        np.testing.assert_array_equal(back, m)


def test_bbox_is_xywh():
    m = np.zeros((10, 20), bool)
    m[2:5, 7:16] = True
    assert mask_bbox(m) == [7.0, 2.0, 9.0, 3.0]


def test_label_map_annotations_components_and_stuff():
    lm = _label_map()
    anns = label_map_annotations(lm, image_id=7, first_id=100, min_area=1, instance_ids={2, 3})
    by_cat = {}
    for a in anns:
        by_cat.setdefault(a["category_id"], []).append(a)
    assert len(by_cat[1]) == 1  # stuff: one annotation with both pieces
    assert by_cat[1][0]["area"] == 10 * 60 + 5 * 10
    assert len(by_cat[2]) == 2  # two separate cars
    assert sorted(a["area"] for a in by_cat[2]) == [100, 120]
    assert sorted(a["bbox"] for a in by_cat[2]) == [[5.0, 15.0, 10.0, 10.0], [40.0, 15.0, 8.0, 15.0]]
    assert [a["id"] for a in anns] == list(range(100, 100 + len(anns)))
    assert all(a["iscrowd"] == 0 and a["image_id"] == 7 for a in anns)
    np.testing.assert_array_equal(paint_annotations(anns, *lm.shape), lm)


def test_min_area_drops_small_components():
    lm = _label_map()
    anns = label_map_annotations(lm, image_id=1, first_id=1, min_area=101, instance_ids={2, 3})
    assert sorted((a["category_id"], a["area"]) for a in anns) == [(1, 650), (2, 120)]


def test_categories_merge_renamed_alike():
    cats, cat_of = categories_from_names([3, 1, 2], {1: "car", 3: "car"}, lambda i: f"concept_{i:02d}")
    assert [c["name"] for c in cats] == ["car", "concept_02"]
    assert cat_of == {1: 1, 2: 2, 3: 1}


def _fake_dense_run(tmp_path, maps):
    dense = tmp_path / "dense"
    (dense / "maps").mkdir(parents=True)
    entries = []
    for i, lm in enumerate(maps):
        Image.fromarray(lm).save(dense / "maps" / f"im{i}.png")
        entries.append({"id": f"images/im{i}.jpg", "map": f"maps/im{i}.png", "min_area": 1})
    meta = {"concepts": [{"id": 1, "name": "concept_01", "kind": "stuff"}, {"id": 2, "name": "concept_02", "kind": "thing"},
                         {"id": 3, "name": "concept_03", "kind": "thing"}], "images": entries}
    (dense / "dense.json").write_text(json.dumps(meta))
    return tmp_path


def test_dense_coco_loads_and_decodes_pixel_for_pixel(tmp_path):
    maps = [_label_map(), np.rot90(_label_map()).copy(), np.zeros((40, 60), np.uint8)]
    run = _fake_dense_run(tmp_path, maps)
    n = export_coco_dense(run, tmp_path / "out.json", names={2: "car"})
    assert n == 3
    coco = COCO(str(tmp_path / "out.json"))
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"concept_01", "car", "concept_03"}
    car = coco.getCatIds(catNms=["car"])[0]
    assert coco.loadCats(car)[0]["supercategory"] == "thing"
    for img_id, lm in zip(sorted(coco.getImgIds()), maps):
        info = coco.loadImgs(img_id)[0]
        assert (info["height"], info["width"]) == lm.shape
        painted = np.zeros(lm.shape, np.int64)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img_id])):
            m = coco.annToMask(ann).astype(bool)
            assert not painted[m].any()  # annotations never overlap
            painted[m] = ann["category_id"]
            assert ann["area"] == int(m.sum())
        np.testing.assert_array_equal(painted, lm)
    assert len(coco.getAnnIds(imgIds=[3])) == 0


def test_image_level_export(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (30, 20), "red").save(root / "a" / "x.png")
    Image.new("RGB", (10, 40), "blue").save(root / "a" / "y.jpg")
    Image.new("RGB", (8, 8), "green").save(root / "z.png")
    # EXIF orientation 6 (rotate 90): stored 50 x 24, seen as 24 x 50
    im = Image.new("RGB", (50, 24))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(root / "rot.jpg", exif=exif)
    rows = [LabelRow("a/x.png", 0, 0.9), LabelRow("a/y.jpg", 1, 0.8), LabelRow("z.png", 2, 0.7),
            LabelRow("rot.jpg", 1, 0.6), LabelRow("gone.png", 0, 0.5)]
    out = tmp_path / "coco.json"
    n = export_coco_image_level(rows, {0: "cat", 1: "cat", 2: "dog"}, root, out, rejected={"z.png"})
    assert n == 3  # z.png rejected, gone.png unreadable
    coco = COCO(str(out))
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == ["cat"]
    imgs = {i["file_name"]: i for i in coco.loadImgs(coco.getImgIds())}
    assert set(imgs) == {"a/x.png", "a/y.jpg", "rot.jpg"}
    assert (imgs["rot.jpg"]["width"], imgs["rot.jpg"]["height"]) == (24, 50)
    for ann in coco.loadAnns(coco.getAnnIds()):
        info = coco.loadImgs(ann["image_id"])[0]
        assert ann["bbox"] == [0.0, 0.0, info["width"], info["height"]]
        assert coco.annToMask(ann).all()
        assert ann["area"] == info["width"] * info["height"]


def test_rle_rejects_3d():
    with pytest.raises(ValueError):
        mask_to_rle(np.zeros((2, 2, 2)))
