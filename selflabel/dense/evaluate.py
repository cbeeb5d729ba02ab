"""mIoU and boundary F of a dense run's concept (and part) maps against ground-truth label maps.

Ground truth is found by the layout `<root>/images/x.jpg` <-> `<root>/labels/x.png` (same stem, any
image extension), or in `labels_dir` (same relative path, or same stem). Two scores, as Leopart reports:
- Hungarian: one-to-one matching of predicted segments to classes (unmatched classes score IoU 0);
- overclustering: many-to-one, every segment goes to its majority class.
and the boundary F-measure of the concept maps (`metrics.boundary_fscore`, BSDS/DAVIS: tolerance 0.75 % of
the image diagonal rounded up, mean over images). Void pixels are ignored. `source="coco"` scores the
concept masks a user gets, painted back per image from the RLE masks of `dense/coco.json`, instead of the
PNG maps. The class count and void value
come from `classes.txt` beside the labels folder when present (one name per line; a line `void` marks the
void value), else from known layouts (CamVid: 11 classes, 11 = void), else void = 255 and classes 0..max label.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from ..annotations import paint_annotations
from ..errors import InputError
from ..metrics import boundary_fscore, confusion, miou_hungarian, miou_overcluster
from .masks import resize_labels

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg", ".webp", ".gif")
BOUNDARY_TOLERANCE = 0.0075  # boundary match distance as a share of the image diagonal (BSDS's maxDist)
CAMVID_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car",
                  "pedestrian", "bicyclist")


def find_label_map(data_root: Path, image_id: str, labels_dir: Path | None = None) -> Path | None:
    """The ground-truth label map of one image, or None."""
    rel = PurePosixPath(image_id)
    candidates: list[Path] = []
    if labels_dir is not None:
        sub = PurePosixPath(*rel.parts[1:]) if len(rel.parts) > 1 and rel.parts[0] == "images" else rel
        for base in (labels_dir / sub.parent, labels_dir):
            candidates += [base / (rel.stem + ext) for ext in IMAGE_EXTS]
    full = Path(data_root).joinpath(*rel.parts)
    parts = list(full.parts)
    for j in range(len(parts) - 2, -1, -1):  # the innermost "images" folder (in the id or the root) becomes "labels"
        if parts[j] == "images":
            base = Path(*parts[:j], "labels", *parts[j + 1:-1])
            candidates += [base / (rel.stem + ext) for ext in IMAGE_EXTS]
            break
    for c in candidates:
        if c.is_file():
            return c
    return None


def class_spec(labels_root: Path, observed_max: int) -> tuple[int, int | None, list[str] | None, str]:
    """(n_classes, void value, class names, where the spec came from)."""
    for f in (labels_root / "classes.txt", labels_root.parent / "classes.txt"):
        if f.is_file():
            names = [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
            void = names.index("void") if "void" in names else None
            kept = [nm for nm in names if nm != "void"]
            return len(kept), void, kept, str(f)
    if "camvid" in str(labels_root).lower() and observed_max <= 11:
        return 11, 11, list(CAMVID_CLASSES), "camvid layout (0-10 classes, 11 = void)"
    return observed_max + 1, 255, None, "default (void = 255, classes 0..max)"


def _read_map(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def boundary_tolerance(shape: tuple[int, ...], share: float = BOUNDARY_TOLERANCE) -> float:
    """Boundary match distance in pixels: `share` of the diagonal of an (H, W) map, rounded up as DAVIS does
    (5 px for 480 x 360, never under 1 px)."""
    return float(max(1.0, np.ceil(share * np.hypot(shape[0], shape[1]))))


def mean_boundary_f(gts: list[np.ndarray], preds: list[np.ndarray], void: int | None,
                    share: float = BOUNDARY_TOLERANCE) -> dict[str, float]:
    """Mean over images of the boundary F, precision and recall (DAVIS averages per frame)."""
    scores = np.array([boundary_fscore(g, p, boundary_tolerance(g.shape, share), void) for g, p in zip(gts, preds)])
    if not len(scores):
        return {"f": float("nan"), "precision": float("nan"), "recall": float("nan")}
    return {"f": float(scores[:, 0].mean()), "precision": float(scores[:, 1].mean()), "recall": float(scores[:, 2].mean())}


def coco_label_maps(coco_path: str | Path) -> dict[str, np.ndarray]:
    """Concept label map per image `file_name`, painted back from a COCO file's RLE masks (0 = no mask):
    what a consumer of the export sees, to be scored like the PNG maps."""
    doc = json.loads(Path(coco_path).read_text(encoding="utf-8"))
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in doc["annotations"]:
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    return {im["file_name"]: paint_annotations(by_image.get(int(im["id"]), []), int(im["height"]), int(im["width"]))
            for im in doc["images"]}


def evaluate_dense(run_dir: str | Path, labels_dir: str | Path | None = None, *, n_classes: int | None = None,
                   void: int | None = None, source: str = "maps") -> dict[str, Any]:
    """mIoU (Hungarian and overclustering) of concepts and parts, and the concepts' boundary F, of
    `run_dir/dense` against label maps; concepts from the PNG maps (`source="maps"`) or decoded from the
    COCO export (`source="coco"`)."""
    dense_dir = Path(run_dir) / "dense"
    meta_path = dense_dir / "dense.json"
    if not meta_path.is_file():
        raise InputError(f"{run_dir}: no dense/dense.json (not a dense run)")
    if source not in ("maps", "coco"):
        raise InputError(f"evaluate_dense: source '{source}' is not one of maps, coco")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    coco_maps = coco_label_maps(dense_dir / "coco.json") if source == "coco" else None
    root = Path(meta["data_root"])
    ldir = Path(labels_dir) if labels_dir is not None else None
    pairs = []
    for entry in meta["images"]:
        gt_path = find_label_map(root, entry["id"], ldir)
        if gt_path is not None:
            pairs.append((entry, gt_path))
    if not pairs:
        raise InputError(f"{run_dir}: no ground-truth label maps found (expected <root>/labels/<name>.png beside "
                         f"<root>/images/, or pass labels_dir)")
    gts = [_read_map(p) for _, p in pairs]
    if any(g.ndim != 2 for g in gts):
        raise InputError("ground-truth label maps must be single-channel class-index images")
    observed = max(int(g.max()) for g in gts)
    spec_n, spec_void, names, spec_source = class_spec(pairs[0][1].parent, observed)
    n_cls = n_classes if n_classes is not None else spec_n
    void_v = void if void is not None else spec_void
    n_concepts = len(meta["concepts"])
    k = int(meta["parts"]["k"])
    conf_c = np.zeros((n_concepts + 1, n_cls), dtype=np.int64)
    conf_p = np.zeros((k + 1, n_cls), dtype=np.int64)
    cmaps = []
    for (entry, _), gt in zip(pairs, gts):
        raw = coco_maps[entry["id"]] if coco_maps is not None else _read_map(dense_dir / entry["map"])
        cmap = resize_labels(raw.astype(np.int64), gt.shape)
        pmap = resize_labels(_read_map(dense_dir / entry["parts"]).astype(np.int64), gt.shape)
        conf_c += confusion(gt, cmap, n_cls, n_concepts + 1, void=void_v)
        conf_p += confusion(gt, pmap, n_cls, k + 1, void=void_v)
        cmaps.append(cmap)
    bf = mean_boundary_f(gts, cmaps, void_v)
    c_h, c_h_iou = miou_hungarian(conf_c)
    c_o, _ = miou_overcluster(conf_c)
    p_h, _ = miou_hungarian(conf_p)
    p_o, _ = miou_overcluster(conf_p)
    valid = conf_c.sum()
    pixel_acc = float(conf_c.max(1).sum() / valid) if valid else float("nan")
    per_class = {(names[i] if names and i < len(names) else str(i)): round(float(v), 4)
                 for i, v in enumerate(c_h_iou) if not np.isnan(v)}
    return {
        "n_images": len(pairs),
        "n_missing_gt": len(meta["images"]) - len(pairs),
        "n_classes": n_cls,
        "void": void_v,
        "class_spec": spec_source,
        "source": source,
        "concepts": {"n": n_concepts, "miou_hungarian": c_h, "miou_overcluster": c_o,
                     "pixel_accuracy_overcluster": pixel_acc, "iou_per_class_hungarian": per_class,
                     "boundary_f": bf["f"], "boundary_precision": bf["precision"], "boundary_recall": bf["recall"],
                     "boundary_tolerance": f"{BOUNDARY_TOLERANCE:.2%} of the diagonal"},
        "parts": {"n": k, "miou_hungarian": p_h, "miou_overcluster": p_o},
    }
