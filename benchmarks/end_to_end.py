"""End to end: `selflabel label` on real folders, first run (empty cache) vs cached run.

Question: how long does labelling a folder take, where does the time go, how much does the
feature cache save on a second run, and how good are the labels (NMI / ARI / Hungarian
accuracy against the class folders)? Runs `selflabel.pipeline.label_folder` exactly as the CLI
does (`selflabel label DIR --out RUN --k 10`), with a fresh temporary cache.

    python -m benchmarks.end_to_end [--quick] [--full] [--device auto]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `selflabel` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import markdown_table, write_result
from benchmarks.features import library_spec, shared_data, stratified
from selflabel.devices import resolve_device
from selflabel.precision import cpu_summary
from selflabel.config import RunConfig
from selflabel.data import ImageRecord, scan_folder
from selflabel.evaluate import evaluate_run
from selflabel.pipeline import label_folder
from selflabel.runfiles import read_labels

STAGES = ("ingest", "load_backbone", "features", "cluster", "write")
CIFAR_SUBSET = 2000
QUICK_SUBSET = 50


def link_subset(records: Sequence[ImageRecord], root: Path, dst: Path) -> Path:
    """A folder of symlinks `dst/<class>/<file>` to `records` (no image is copied)."""
    for r in records:
        link = dst / r.id
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(r.path if r.path.is_absolute() else root / r.path, link)
    return dst


def make_config(data: Path, out: Path, cache: Path, *, k: int, device: str, backbone: str) -> RunConfig:
    cfg = RunConfig(data=str(data), out=str(out), seed=0)
    cfg.backbone.name = backbone
    cfg.backbone.cache_dir = str(cache)
    cfg.backbone.device = device
    cfg.cluster.k = k
    return cfg


def first_and_cached(data: Path, work: Path, *, k: int, device: str, backbone: str) -> dict:
    """Label `data` twice into two run folders sharing one fresh cache; timings, counts and metrics."""
    cache = work / "cache"
    runs = {}
    for name in ("first", "cached"):
        out = work / name
        summary = label_folder(make_config(data, out, cache, k=k, device=device, backbone=backbone), show_progress=False)
        runs[name] = {"summary": summary, "metrics": evaluate_run(out)["image"],
                      "labels": np.array([row.cluster for row in read_labels(out)])}
    runs["same_labels"] = bool(np.array_equal(runs["first"]["labels"], runs["cached"]["labels"]))
    return runs


def rows_for(dataset: str, note: str, runs: dict) -> list[list]:
    rows = []
    totals = {name: sum(runs[name]["summary"].timings.values()) for name in ("first", "cached")}
    for name in ("first", "cached"):
        s, m = runs[name]["summary"], runs[name]["metrics"]
        t = s.timings
        rows.append([dataset if name == "first" else "", note if name == "first" else "", name,
                     f"{s.n_images:,}", f"{s.n_computed:,} / {s.n_cached:,}",
                     *(f"{t.get(st, 0.0):.2f}" for st in STAGES), f"{totals[name]:.1f}",
                     f"{s.n_images / t['features']:.0f}" if t.get("features") else "-",
                     f"**{totals['first'] / totals[name]:.1f}x**" if name == "cached" else "1x",
                     f"{m['nmi']:.3f}", f"{m['ari']:.3f}", f"{m['accuracy']:.3f}"])
    return rows


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.end_to_end", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_SUBSET} images of each data set")
    ap.add_argument("--full", action="store_true", help="all 10,000 cifar10-test images (default: a 2,000 subset)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args(argv)

    plan = []  # (label, folder name, subset size or None, note)
    if args.quick:
        plan += [("imagenette-val", "imagenette-val", QUICK_SUBSET, f"{QUICK_SUBSET}-image class-balanced subset (quick)"),
                 ("cifar10-test", "cifar10-test", QUICK_SUBSET, f"{QUICK_SUBSET}-image class-balanced subset (quick)")]
    else:
        plan += [("imagenette-val", "imagenette-val", None, "all images"),
                 ("cifar10-test", "cifar10-test", None if args.full else CIFAR_SUBSET,
                  "all images (--full)" if args.full else
                  f"{CIFAR_SUBSET:,}-image class-balanced subset (32 px images upscaled to 224; all 10,000 with --full)")]

    rows, same = [], []
    for label, folder, subset, note in plan:
        src = shared_data(folder)
        with tempfile.TemporaryDirectory(prefix=f"selflabel-bench-{label}-") as tmp:
            work = Path(tmp)
            data = src
            if subset is not None:
                scan = scan_folder(src, gt="folders")  # the classes only stratify the subset
                data = link_subset(stratified(scan.records, subset), scan.root, work / "data")
            runs = first_and_cached(data, work, k=args.k, device=args.device, backbone=args.backbone)
        rows += rows_for(label, note, runs)
        same.append(f"{label}: {'identical' if runs['same_labels'] else '**different**'}")

    headers = ["data set", "images used", "run", "images", "computed / cached", *(f"{s} s" for s in STAGES),
               "total s", "features img/s", "speed-up vs first", "NMI", "ARI", "accuracy"]
    text = "\n".join([
        "## End to end: `selflabel label` first run vs cached run" + (" (quick)" if args.quick else ""),
        "",
        f"`label_folder` as `selflabel label DIR --out RUN --k {args.k}` runs it: backbone {args.backbone}, "
        f"device {args.device}, amp auto, engine {library_spec(resolve_device(args.device)).tag} (the defaults on "
        f"this machine; CPU: {cpu_summary()}), clustering sinkhorn, seed 0; a fresh temporary feature cache "
        "(and exported engine models) for the "
        "first run, the same cache for the second. Metrics against the class folders (Hungarian accuracy). "
        "Labels of the two runs: " + "; ".join(same) + ".",
        "",
        markdown_table(headers, rows),
        "",
    ])
    write_result("end_to_end" + ("-quick" if args.quick else ""), text)
    return text


if __name__ == "__main__":
    main()
