"""YOLO exports (Ultralytics layouts, https://docs.ultralytics.com/datasets/):

- classification: <out>/{train,val}/<class>/<image>, the split-folder tree `yolo classify` trains on;
- instance segmentation (dense runs): <out>/images/{train,val}/, <out>/labels/{train,val}/<stem>.txt with
  one `class x1 y1 x2 y2 ...` line per instance (polygon normalised to [0, 1]), and <out>/data.yaml.

The train/val split is per class and deterministic (a hash of each path), so re-exporting after a
review moves only the images whose labels changed.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import yaml

from ..annotations import label_map_annotations, mask_polygons, rle_to_mask
from ..atomic import atomic_write_text
from ..naming import flatten_path, sanitize_name
from .files import check_mode, place, staged_dir
from .view import ExportView

SPLITS = ("train", "val")


def _rank(path: str) -> str:
    return hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


def split_paths(paths_by_class: dict[str, list[str]], val_fraction: float) -> dict[str, str]:
    """path -> "train" | "val": per class the `val_fraction` of its images with the smallest hash go to
    val, at least one when the class has two or more images, never all of them."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1) (got {val_fraction})")
    out: dict[str, str] = {}
    for paths in paths_by_class.values():
        ordered = sorted(paths, key=_rank)
        n_val = min(len(ordered) - 1, max(1 if len(ordered) >= 2 and val_fraction > 0 else 0, round(val_fraction * len(ordered))))
        for i, p in enumerate(ordered):
            out[p] = "val" if i < n_val else "train"
    return out


def folder_names(classes: Iterable[str]) -> dict[str, str]:
    """A safe, case-insensitively unique folder per class name."""
    out, used = {}, set()
    for c in classes:
        base = sanitize_name(c, "class")
        name, i = base, 1
        while name.lower() in used:
            i += 1
            name = f"{base}_{i}"
        used.add(name.lower())
        out[c] = name
    return out


def export_yolo_cls(view: ExportView, out_dir: str | Path, val_fraction: float = 0.2, mode: str = "copy") -> int:
    """The classification tree. Returns the number of images written."""
    check_mode(mode)
    by_class: dict[str, list[str]] = {}
    for i in view.items:
        by_class.setdefault(i.name, []).append(i.path)
    split = split_paths(by_class, val_fraction)
    folder = folder_names(view.classes)
    with staged_dir(out_dir) as tmp:
        for s in SPLITS:  # every class folder in both splits, so train and val list the same classes
            for f in folder.values():
                (tmp / s / f).mkdir(parents=True, exist_ok=True)
        for i in view.items:
            place(view.source(i), tmp / split[i.path] / folder[i.name] / flatten_path(i.path), mode)
    return len(view.items)


def polygon_line(cls: int, poly, width: int, height: int) -> str:
    """`cls x1 y1 ...` with coordinates normalised by the image size and clipped to [0, 1]."""
    xy = [f"{min(max(float(x) / width, 0.0), 1.0):.6f} {min(max(float(y) / height, 0.0), 1.0):.6f}" for x, y in poly]
    return f"{cls} " + " ".join(xy)


def export_yolo_seg(view: ExportView, out_dir: str | Path, val_fraction: float = 0.2, mode: str = "copy") -> int:
    """Instance-segmentation dataset from a dense run's concept maps: every 8-connected component of a
    concept is one instance. Returns the number of images written."""
    check_mode(mode)
    concept_names = list(dict.fromkeys(view.concepts.values()))
    cls_of = {cid: concept_names.index(n) for cid, n in view.concepts.items()}
    maps = list(view.dense_maps())
    split = split_paths({"all": [item.path for item, _, _ in maps]}, val_fraction)
    used: set[str] = set()
    with staged_dir(out_dir) as tmp:
        for s in SPLITS:
            (tmp / "images" / s).mkdir(parents=True)
            (tmp / "labels" / s).mkdir(parents=True)
        for item, entry, lm in maps:
            stem = Path(flatten_path(item.path))
            name = stem.stem
            while name.lower() in used:  # YOLO pairs an image with its labels by stem
                name += "_"
            used.add(name.lower())
            H, W = lm.shape
            lines = []
            for ann in label_map_annotations(lm, image_id=0, first_id=1, min_area=int(entry.get("min_area", 1))):
                poly = mask_polygons(rle_to_mask(ann["segmentation"]))
                if poly:
                    lines.append(polygon_line(cls_of[ann["category_id"]], poly[0], W, H))
            s = split[item.path]
            place(view.source(item), tmp / "images" / s / f"{name}{stem.suffix}", mode)
            atomic_write_text(tmp / "labels" / s / f"{name}.txt", "".join(f"{ln}\n" for ln in lines))
        data = {"path": str(Path(out_dir).resolve()), "train": "images/train", "val": "images/val",
                "names": dict(enumerate(concept_names))}
        atomic_write_text(tmp / "data.yaml", yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return len(maps)
