"""Dense object concepts on CamVid val: concept and part mIoU against the 11 classes, vs k-means.

Question: do the Leopart-style concepts (Sinkhorn part prototypes -> CBFE -> co-occurrence graph ->
Louvain) segment street scenes better than plain k-means on the same patch features?

1. `selflabel.dense.pipeline.segment` end to end (default config, mobilenet_v2), scored by
   `evaluate_dense` (Hungarian one-to-one and many-to-one overclustering mIoU, void ignored).
2. The same patch features (extracted once more, same settings) for the variants: k-means
   (sklearn MiniBatchKMeans on the same L2-normalised projected patch sample, K = 11 and K = 150),
   the Sinkhorn prototypes at K = 11, python-louvain vs networkx, resolutions, no fg/bg split.
   Every variant's maps go through the same upsampling, argmax and small-region filling as the
   pipeline and are scored at the ground truth's full resolution.

    python -m benchmarks.dense [--quick] [--data DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `selflabel` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from benchmarks.common import machine_info, markdown_table, shared_root, write_result
from selflabel.metrics import confusion, miou_hungarian, miou_overcluster

N_CLASSES, VOID = 11, 11
CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "sign", "fence", "car", "pedestrian", "bicyclist")
QUICK_IMAGES = 30


def camvid_val() -> Path:
    return shared_root() / "camvid" / "val"


def kmeans_parts(sample: np.ndarray, k: int, seed: int = 0):
    """sklearn MiniBatchKMeans on the L2-normalised patch sample; centres as unit prototypes."""
    from sklearn.cluster import MiniBatchKMeans

    from selflabel.dense.parts import PartModel

    x = sample / np.linalg.norm(sample, axis=1, keepdims=True)
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=4096).fit(x)
    c = km.cluster_centers_
    return PartModel(prototypes=(c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32), info={"method": "kmeans"})


class Scorer:
    """Full-resolution part maps of one set of prototypes, scored as parts or through a concept lookup."""

    def __init__(self, feats, gts: list[np.ndarray], prototypes: np.ndarray, mask_size: int, min_area: int):
        from selflabel.dense.pipeline import part_map

        self.gts, self.min_area = gts, min_area
        self.k = prototypes.shape[0]
        p = torch.from_numpy(prototypes)
        self.maps = [part_map(f, p, g.shape, mask_size).astype(np.int32) for f, g in zip(feats.feats, gts)]

    def parts(self) -> dict[str, Any]:
        conf = sum(confusion(g, m - 1, N_CLASSES, self.k, void=VOID) for g, m in zip(self.gts, self.maps))
        return self._scores(conf, self.k)

    def concepts(self, lut: np.ndarray) -> dict[str, Any]:
        from selflabel.dense.pipeline import concept_map

        n = int(lut.max()) + 1
        conf = sum(confusion(g, concept_map(m, lut, self.min_area)[0], N_CLASSES, n, void=VOID)
                   for g, m in zip(self.gts, self.maps))
        return self._scores(conf, n - 1)

    @staticmethod
    def _scores(conf: np.ndarray, n: int) -> dict[str, Any]:
        h, iou = miou_hungarian(conf)
        return {"n": n, "hungarian": h, "overcluster": miou_overcluster(conf)[0], "iou": iou}


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dense", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"first {QUICK_IMAGES} images, fewer variants")
    ap.add_argument("--data", type=Path, default=None, help="CamVid split with images/ and labels/ (default: shared camvid/val)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda[:N]")
    args = ap.parse_args(argv)
    name = "dense" + ("-quick" if args.quick else "")
    data = args.data or camvid_val()
    if not (data / "images").is_dir():
        return write_result(name, f"## Dense object concepts\n\nskipped: {data}/images not found\n").read_text()

    from selflabel.backbones import create_backbone
    from selflabel.config import RunConfig
    from selflabel.data import scan_folder
    from selflabel.dense.evaluate import evaluate_dense
    from selflabel.dense.extract import extract_dense
    from selflabel.dense.parts import fit_part_prototypes
    from selflabel.dense.pipeline import fit_concepts, segment
    from selflabel.features import autocast_dtype, resolve_device

    torch.manual_seed(0)
    records = scan_folder(data / "images").records
    if args.quick:
        records = records[:QUICK_IMAGES]
    cfg = RunConfig()
    dcfg = cfg.dense
    bb = create_backbone("mobilenet_v2")
    dev = resolve_device(args.device)

    # 1. the pipeline end to end
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        summary = segment(records, bb, cfg, tmp, dev, show_progress=False)
        wall = time.perf_counter() - t
        ev = evaluate_dense(tmp)
    n_img = summary["n_images"]

    # 2. variants on the same patch features
    t = time.perf_counter()
    feats = extract_dense(records, bb, image_size=dcfg.image_size, device=dev, keep_aspect=dcfg.keep_aspect,
                          pca_dim=dcfg.pca_dim, batch_size=16, dtype=autocast_dtype("auto", dev), seed=cfg.seed,
                          show_progress=False)
    t_feat = time.perf_counter() - t
    gts = [np.asarray(Image.open(data / "labels" / (Path(r.id).stem + ".png"))) for r in feats.records]
    sample = feats.sample(dcfg.max_patches, cfg.seed)
    rows: list[list[Any]] = []
    per_class: list[list[Any]] = []

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    def add(method: str, res: dict[str, Any], fit_s: float, note: str = "") -> None:
        rows.append([method, res["n"], res["hungarian"], res["overcluster"], fit_s, note])

    model, t_fit = timed(lambda: fit_concepts(feats, dcfg, cfg.seed))
    sc = Scorer(feats, gts, model.parts.prototypes, dcfg.mask_size, dcfg.min_area)
    add(f"selflabel parts (Sinkhorn prototypes, K={model.k})", sc.parts(), model.timings["parts"], "raw part clusters")
    main_res = sc.concepts(model.lut)
    add("**selflabel concepts** (CBFE + graph + Louvain networkx, r=1)", main_res, t_fit,
        f"{sum(c['kind'] == 'thing' for c in model.concepts)} things / {int(model.foreground.sum())} fg parts")
    per_class.append(["selflabel concepts (Hungarian)"] + [round(float(v), 3) for v in main_res["iou"]])

    variants = [("python-louvain, r=1", {"louvain": "python-louvain"}), ("networkx, r=2", {"resolution": 2.0}),
                ("no fg/bg split, r=1", {"split_fg": False})]
    if not args.quick:
        variants = [("networkx, r=0.5", {"resolution": 0.5})] + variants + [("networkx, r=3", {"resolution": 3.0})]
    for label, change in variants:
        m, t_v = timed(lambda: fit_concepts(feats, dataclasses.replace(dcfg, **change), cfg.seed, parts=model.parts))
        add(f"concepts: {label}", sc.concepts(m.lut), t_v, "same parts")

    km, t_km = timed(lambda: kmeans_parts(sample, model.k, cfg.seed))
    add(f"k-means parts (MiniBatchKMeans, K={model.k})", Scorer(feats, gts, km.prototypes, dcfg.mask_size, dcfg.min_area).parts(), t_km, "baseline")
    km11, t_km11 = timed(lambda: kmeans_parts(sample, N_CLASSES, cfg.seed))
    res_km11 = Scorer(feats, gts, km11.prototypes, dcfg.mask_size, dcfg.min_area).parts()
    add(f"k-means (MiniBatchKMeans, K={N_CLASSES})", res_km11, t_km11, "baseline, K = number of classes")
    per_class.append([f"k-means K={N_CLASSES} (Hungarian)"] + [round(float(v), 3) for v in res_km11["iou"]])
    sk11, t_sk11 = timed(lambda: fit_part_prototypes(sample, N_CLASSES, eps=dcfg.eps, iters=dcfg.epochs, seed=cfg.seed))
    add(f"Sinkhorn prototypes, K={N_CLASSES}", Scorer(feats, gts, sk11.prototypes, dcfg.mask_size, dcfg.min_area).parts(), t_sk11,
        "balanced clusters, K = number of classes")

    timing = summary["timings"]
    text = "\n".join([
        "## Dense object concepts: CamVid val" + (" (quick)" if args.quick else ""),
        "",
        f"{n_img} CamVid val images (480 x 360), 11 classes, void ignored; mobilenet_v2 (ImageNet, offline), "
        f"image_size {dcfg.image_size} (short side, aspect kept: 14 x 19 patches at stride 32), standardise + PCA {dcfg.pca_dim}, "
        f"K={dcfg.k_parts} parts, seed {cfg.seed}. mIoU at full resolution: Hungarian = one-to-one match of segments to "
        "classes (unmatched classes count 0); overclustering = every segment to its majority class (Leopart). "
        f"Machine: {machine_info()}.",
        "",
        "### End to end (`selflabel.dense.pipeline.segment` + `evaluate_dense`)",
        "",
        markdown_table(
            ["images", "concepts (things/stuff)", "concepts mIoU Hungarian", "concepts mIoU overcluster", "parts mIoU overcluster",
             "features s", "parts s", "CBFE s", "graph s", "maps+COCO s", "total s"],
            [[n_img, f"{summary['n_concepts']} ({summary['n_things']}/{summary['n_stuff']})", ev["concepts"]["miou_hungarian"],
              ev["concepts"]["miou_overcluster"], ev["parts"]["miou_overcluster"], timing["features"], timing["parts"],
              timing["foreground"], timing["graph"], timing["maps"], wall]]),
        "",
        f"### Same patch features ({t_feat:.1f} s to extract): concepts and baselines",
        "",
        markdown_table(["method", "segments", "mIoU Hungarian", "mIoU overcluster", "fit s", "note"], rows),
        "",
        "### Per-class IoU (Hungarian)",
        "",
        markdown_table(["method", *CLASSES], per_class),
        "",
    ])
    write_result(name, text)
    return text


if __name__ == "__main__":
    main()
