"""Mask maths shared by the dense pipeline and the exporters (pure): COCO RLE, boxes, per-instance
annotations from a label map, polygons for YOLO / Label Studio, and the COCO document.

Format: https://cocodataset.org/#format-data. Masks are stored as compressed RLE
(`pycocotools.mask.encode`, Fortran-ordered uint8), with `counts` decoded to str so the file is
plain JSON. bbox is [x, y, width, height] in pixels; area is the mask's pixel count.
No I/O here: the dense pipeline (below the exporters) and every exporter call these.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import contourpy
import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage

from .naming import concept_name

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


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


def mask_polygons(mask: np.ndarray, min_points: int = 3) -> list[np.ndarray]:
    """Outer boundaries of a binary mask as closed polygons [P, 2] of (x, y) in pixel units, largest first.

    Marching squares (contourpy) at level 0.5 on the zero-padded mask, in pixel-edge coordinates
    (pixel (i, j) spans x in [j, j+1]): straight runs lie on the pixel edges, corners are cut by half
    a pixel. Holes are dropped (YOLO and Label Studio polygons have none); collinear points removed.
    """
    m = np.pad(np.asarray(mask, dtype=np.float64), 1)
    lines = contourpy.contour_generator(z=m, line_type=contourpy.LineType.Separate).lines(0.5)
    polys = []
    for line in lines:
        pts = np.asarray(line, dtype=np.float64)[:-1] - 1.0 + 0.5  # unpad; pixel (i, j) centre is at (j+.5, i+.5)
        if len(pts) < min_points:
            continue
        if _signed_area(pts) < 0:  # contourpy runs holes the other way round from outer boundaries
            continue
        polys.append(_drop_collinear(pts))
    if not polys:  # a mask too thin for a boundary line: fall back to its box
        x, y, w, h = mask_bbox(mask)
        return [np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]])] if w else []
    return sorted(polys, key=lambda p: -abs(_signed_area(p)))


def _signed_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _drop_collinear(pts: np.ndarray) -> np.ndarray:
    prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (nxt[:, 0] - pts[:, 0])
    keep = np.abs(cross) > 1e-9
    return pts[keep] if keep.sum() >= 3 else pts


def coco_document(images: Sequence[Mapping[str, Any]], annotations: Sequence[Mapping[str, Any]],
                  categories: Sequence[Mapping[str, Any]], description: str) -> dict[str, Any]:
    return {
        "info": {"description": description, "version": "1.0", "contributor": "selflabel"},
        "licenses": [],
        "images": list(images),
        "annotations": list(annotations),
        "categories": list(categories),
    }


def categories_from_names(ids: Iterable[int], names: Mapping[int, str], default: Callable[[int], str] = concept_name,
                          supercategory: Mapping[int, str] | None = None) -> tuple[list[dict[str, Any]], dict[int, int]]:
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
