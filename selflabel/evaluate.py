"""`selflabel eval`: compare a run's labels with ground truth (class folders or a CSV)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .data import GT_SOURCES, read_gt_csv
from .errors import InputError
from .metrics import cluster_metrics
from .runfiles import DENSE, read_labels, read_manifest


def evaluate_run(run_dir: str | Path, gt_csv: str | None = None, reviewed: bool = False,
                 gt: str | None = None) -> dict[str, Any]:
    """NMI / ARI / Hungarian accuracy of the main labels and of every extra head.

    Ground truth: `gt_csv`, else with ``gt="folders"`` the first-level folder of each image path,
    else the gt column the labelling run wrote (only when it was asked for ground truth).

    `reviewed=True` scores the labels after the review app's edits (rejected images left out).
    Dense runs also get mIoU from `selflabel.dense` when label maps are found."""
    run = Path(run_dir)
    manifest = read_manifest(run)
    if reviewed:
        from .review.store import effective_labels

        rows, _, rejected, _ = effective_labels(run)
        rows = [r for r in rows if r.path not in rejected]
    else:
        rows = read_labels(run)
    if gt not in (None, "none", *GT_SOURCES):
        raise InputError(f"--gt {gt!r}: unknown ground-truth source (allowed: {', '.join(GT_SOURCES)}; or --gt-csv FILE)")
    gt_table = read_gt_csv(gt_csv) if gt_csv else None
    if gt_table is not None:
        truth = [gt_table.get(r.path) for r in rows]
    elif gt == "folders":
        truth = [r.path.split("/", 1)[0] if "/" in r.path else None for r in rows]
    else:
        truth = [r.gt for r in rows]
    gt = truth
    keep = [i for i, g in enumerate(gt) if g is not None]
    out: dict[str, Any] = {"run": str(run), "n_images": len(rows)}
    if keep:
        y_true = np.array([gt[i] for i in keep])
        y_pred = np.array([rows[i].cluster for i in keep])
        out.update({"n_with_gt": len(keep), "n_classes": int(len(set(y_true))), "k": int(len(set(y_pred)))})
        out["image"] = cluster_metrics(y_true, y_pred)
        heads = {}
        for col in sorted({c for r in rows for c in r.extra if c.startswith("head_")}, key=lambda c: int(c[5:])):
            pred = np.array([int(rows[i].extra[col]) for i in keep])
            heads[col[5:]] = cluster_metrics(y_true, pred)
        if heads:
            out["heads"] = heads
    dense_dir = run / DENSE
    if dense_dir.is_dir() and manifest.get("dense"):  # a dense/ the run did not write (an older run's) is not read
        from .dense.evaluate import evaluate_dense

        try:
            out["dense"] = evaluate_dense(run)
        except InputError as exc:  # no label maps: image-level scores may still exist
            if "image" not in out:
                raise
            out["dense_note"] = str(exc)
    if "image" not in out and "dense" not in out:
        raise InputError(f"{run}: no ground truth: pass --gt folders (class folder names, data root "
                         f"{manifest.get('data_root')}) or --gt-csv FILE with columns path,label")
    return out
