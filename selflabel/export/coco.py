"""COCO exports: dense concept instances and image-level annotations (the mask maths is in
selflabel.annotations). `pycocotools.coco.COCO(path)` loads them and `annToMask` gives the masks back."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image

from ..annotations import categories_from_names, coco_document, label_map_annotations
from ..atomic import atomic_write_json
from ..errors import InputError
from ..naming import concept_name, default_name
from .view import ExportView

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- exporters (I/O)
def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header only."""
    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # malformed EXIF: the stored size is what load_rgb will see too
            orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def export_coco_image_level(rows: Iterable[Any], names: Mapping[int, str], data_root: str | Path,
                            out_path: str | Path, rejected: set[str] | None = None) -> int:
    """Image-level COCO: one whole-image annotation per image, category = its cluster's name.

    `rows` are `runfiles.LabelRow`s (path relative to `data_root`, cluster); rows whose path is in
    `rejected`, or with a negative cluster, are left out, and so are images that cannot be opened
    (logged). Clusters renamed to the same name share one category. Returns the number of images.
    """
    root = Path(data_root)
    rejected = rejected or set()
    kept = [r for r in rows if r.path not in rejected and int(r.cluster) >= 0]
    categories, cat_of = categories_from_names((r.cluster for r in kept), names, default_name)
    images, anns, missing = [], [], []
    for r in kept:
        try:
            w, h = _image_size(root / r.path)
        except OSError as exc:
            missing.append(r.path)
            log.warning("coco export: %s left out (%s)", r.path, exc)
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": r.path, "width": w, "height": h})
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat_of[int(r.cluster)],
                     "segmentation": [[0.0, 0.0, float(w), 0.0, float(w), float(h), 0.0, float(h)]],
                     "area": float(w * h), "bbox": [0.0, 0.0, float(w), float(h)], "iscrowd": 0,
                     "score": float(getattr(r, "confidence", 1.0))})
    doc = coco_document(images, anns, categories, "selflabel image-level labels (one whole-image box per image)")
    atomic_write_json(out_path, doc)
    log.info("coco: %d images, %d categories -> %s (%d left out unreadable)", len(images), len(categories), out_path, len(missing))
    return len(images)


def export_coco_dense(run_dir: str | Path, out_path: str | Path | None = None,
                      names: Mapping[int, str] | None = None, rejected: set[str] | None = None) -> int:
    """COCO instances from a dense run's concept maps (`dense/dense.json` + `dense/maps/*.png`).

    Thing concepts give one annotation per connected component, stuff concepts one per image.
    `names` renames concepts (concept id -> name); defaults are the names stored in dense.json.
    Images in `rejected` (ids as in labels.csv) are left out. Returns the number of images.
    """
    dense_dir = Path(run_dir) / "dense"
    meta_path = dense_dir / "dense.json"
    if not meta_path.is_file():
        raise InputError(f"{run_dir}: no dense/dense.json (run `selflabel segment` first)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    concepts = meta["concepts"]
    stored = {int(c["id"]): c["name"] for c in concepts}
    merged_names = {**stored, **{int(k): v for k, v in (names or {}).items()}}
    kinds = {int(c["id"]): c.get("kind", "thing") for c in concepts}
    categories, cat_of = categories_from_names(stored, merged_names, concept_name, supercategory=kinds)
    things = {cid for cid, kind in kinds.items() if kind == "thing"}
    images, anns = [], []
    for entry in meta["images"]:
        if rejected and entry["id"] in rejected:
            continue
        lm = np.asarray(Image.open(dense_dir / entry["map"]))
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": entry["id"], "width": int(lm.shape[1]), "height": int(lm.shape[0])})
        anns += label_map_annotations(lm, image_id=image_id, first_id=len(anns) + 1, min_area=int(entry.get("min_area", 1)),
                                      instance_ids=things, category_of=cat_of)
    out = Path(out_path) if out_path is not None else dense_dir / "coco.json"
    atomic_write_json(out, coco_document(images, anns, categories, "selflabel dense object concepts (unsupervised)"))
    log.info("coco: %d images, %d instance/stuff annotations, %d categories -> %s", len(images), len(anns), len(categories), out)
    return len(images)


def export_coco(view: ExportView, out_path: str | Path) -> int:
    """Dense runs: concept instances with the review's concept names; otherwise one whole-image box per
    image. Images the view leaves out (rejected, duplicates) are left out here too."""
    kept = {i.path for i in view.items}
    if view.is_dense:
        dropped = {e["id"] for e in view.dense_meta()["images"]} - kept
        return export_coco_dense(view.run, out_path, names=view.concepts, rejected=dropped)
    return export_coco_image_level(view.rows(), view.names, view.data_root, out_path)
