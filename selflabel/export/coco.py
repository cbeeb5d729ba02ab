"""COCO exports: RLE helpers (pure), dense concept instances and image-level annotations.

Format: https://cocodataset.org/#format-data. Masks are stored as compressed RLE
(`pycocotools.mask.encode`, Fortran-ordered uint8), with `counts` decoded to str so the file is
plain JSON; `pycocotools.coco.COCO(path)` loads it and `annToMask` gives the masks back.
bbox is [x, y, width, height] in pixels; area is the mask's pixel count.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage

from ..atomic import atomic_write_json
from ..dense.masks import EIGHT_CONNECTED
from ..errors import InputError
from .names import default_name

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- pure helpers
def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """Binary mask [H, W] -> COCO compressed RLE {"size": [H, W], "counts": str}."""
    m = np.asfortranarray(np.asarray(mask, dtype=np.uint8))
    if m.ndim != 2:
        raise ValueError(f"mask_to_rle: expected a 2-D mask, got shape {m.shape}")
    rle = mask_utils.encode(m)
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """COCO compressed RLE (counts as str or bytes) -> bool mask [H, W]."""
    counts = rle["counts"]
    r = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(r).astype(bool)


def mask_bbox(mask: np.ndarray) -> list[float]:
    """Tight box [x, y, w, h] of a non-empty mask (pixel units, COCO convention)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]


def concept_name(concept_id: int) -> str:
    """Default category name until a user renames it: concept_01, concept_02, ..."""
    return f"concept_{int(concept_id):02d}"


def label_map_annotations(label_map: np.ndarray, *, image_id: int, first_id: int, min_area: int = 1,
                          instance_ids: Iterable[int] | None = None,
                          category_of: Mapping[int, int] | None = None) -> list[dict[str, Any]]:
    """Annotations for one concept label map (0 = unassigned).

    Concepts in `instance_ids` (default: all) give one annotation per 8-connected component of at
    least `min_area` pixels (the instances); the others ("stuff") give one annotation per image
    holding all their pixels. `category_of` maps concept id -> category id (default: identity).
    """
    lm = np.asarray(label_map)
    inst = None if instance_ids is None else {int(c) for c in instance_ids}
    anns: list[dict[str, Any]] = []

    def add(mask: np.ndarray, concept: int) -> None:
        area = int(mask.sum())
        if area < max(1, min_area):
            return
        cat = int(category_of[concept]) if category_of is not None else concept
        anns.append({"id": first_id + len(anns), "image_id": int(image_id), "category_id": cat,
                     "segmentation": mask_to_rle(mask), "area": area, "bbox": mask_bbox(mask), "iscrowd": 0})

    for concept in np.unique(lm):
        concept = int(concept)
        if concept == 0:
            continue
        mask = lm == concept
        if inst is None or concept in inst:
            comps, n = ndimage.label(mask, structure=EIGHT_CONNECTED)
            if n == 0:
                continue
            for slc_idx, slc in enumerate(ndimage.find_objects(comps), start=1):
                sub = np.zeros_like(mask)
                sub[slc] = comps[slc] == slc_idx
                add(sub, concept)
        else:
            add(mask, concept)
    return anns


def paint_annotations(annotations: Iterable[Mapping[str, Any]], height: int, width: int,
                      value_of: Mapping[int, int] | None = None) -> np.ndarray:
    """Inverse of `label_map_annotations`: decode every mask and paint its category (or value_of[ann id])."""
    out = np.zeros((height, width), dtype=np.int64)
    for ann in annotations:
        m = rle_to_mask(ann["segmentation"])
        out[m] = value_of[ann["id"]] if value_of is not None else ann["category_id"]
    return out


def coco_document(images: Sequence[Mapping[str, Any]], annotations: Sequence[Mapping[str, Any]],
                  categories: Sequence[Mapping[str, Any]], description: str) -> dict[str, Any]:
    return {
        "info": {"description": description, "version": "1.0", "contributor": "selflabel"},
        "licenses": [],
        "images": list(images),
        "annotations": list(annotations),
        "categories": list(categories),
    }


def categories_from_names(ids: Iterable[int], names: Mapping[int, str], default, supercategory: Mapping[int, str] | None = None
                          ) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """One category per distinct name (so two ids renamed alike merge), numbered from 1 in id order.

    Returns (categories, id -> category id)."""
    cats: list[dict[str, Any]] = []
    by_name: dict[str, int] = {}
    id_to_cat: dict[int, int] = {}
    for i in sorted({int(x) for x in ids}):
        name = str(names.get(i, default(i))).strip() or default(i)
        if name not in by_name:
            by_name[name] = len(cats) + 1
            cat = {"id": by_name[name], "name": name, "supercategory": (supercategory or {}).get(i, "concept")}
            cats.append(cat)
        id_to_cat[i] = by_name[name]
    return cats, id_to_cat


# ----------------------------------------------------------------------------- exporters (I/O)
def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header only."""
    from PIL import Image

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
    from PIL import Image

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
