"""Exporters: CSV, ImageFolder tree and COCO JSON, all with the review edits applied."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..runfiles import DENSE, EXPORTS, read_manifest

FORMATS = ("csv", "imagefolder", "coco")


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, *, include_rejected: bool = False,
               mode: str = "copy") -> tuple[Path, int]:
    """Export a run in `fmt`; returns (written path, number of images)."""
    if fmt not in FORMATS:
        raise InputError(f"unknown export format '{fmt}' (choose {', '.join(FORMATS)})")
    run = Path(run_dir)
    manifest = read_manifest(run)
    from ..review.store import effective_review

    rows, names, rejected, unsure, concepts = effective_review(run)  # the review's edits (labels.csv alone if none)
    default = {"csv": "labels.csv", "imagefolder": "imagefolder", "coco": "coco.json"}[fmt]
    target = Path(out) if out else run / EXPORTS / default
    if fmt == "csv":
        from .csv import export_csv

        n = export_csv(rows, names, target, rejected, unsure, include_rejected=include_rejected)
    elif fmt == "imagefolder":
        from .imagefolder import export_imagefolder

        n = export_imagefolder(rows, names, manifest["data_root"], target, rejected, mode=mode)
    else:
        n = _export_coco(run, manifest, rows, names, rejected, concepts, target)
    return target, n


def _export_coco(run: Path, manifest: dict, rows, names, rejected, concepts: dict[int, str], target: Path) -> int:
    """Dense runs: instance masks with the user's concept names, rejected images left out; otherwise one
    whole-image box per image."""
    from . import coco

    if (run / DENSE / "dense.json").is_file():
        return coco.export_coco_dense(run, target, names=concepts, rejected=rejected)
    return coco.export_coco_image_level(rows, names, manifest["data_root"], target, rejected)
