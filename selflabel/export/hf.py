"""Hugging Face `datasets` export: an `imagefolder` tree <out>/images/... with <out>/metadata.csv
(file_name, label, cluster, confidence, status, suggested_name) that
`datasets.load_dataset("imagefolder", data_dir=out)` loads as it is."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ..atomic import atomic_write_text
from ..naming import flatten_path
from .files import check_mode, place, staged_dir
from .view import ExportView

METADATA = "metadata.csv"


def export_hf_imagefolder(view: ExportView, out_dir: str | Path, mode: str = "copy") -> int:
    """Images flattened into <out>/images/ (flat, so `datasets` takes the labels from metadata.csv,
    not from folder names). Returns the number of images."""
    check_mode(mode)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file_name", "label", "cluster", "confidence", "status", "suggested_name"])
    used: set[str] = set()
    with staged_dir(out_dir) as tmp:
        for i in view.items:
            name = flatten_path(i.path)
            while name.lower() in used:
                name = "_" + name
            used.add(name.lower())
            place(view.source(i), tmp / "images" / name, mode)
            w.writerow([f"images/{name}", i.name, i.cluster, f"{i.confidence:.6f}", i.status, i.suggested_name])
        atomic_write_text(tmp / METADATA, buf.getvalue())
    return len(view.items)
