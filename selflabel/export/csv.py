"""CSV export: one row per image with the reviewed cluster, its name, status and suggested name."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ..atomic import atomic_write_text
from .view import ExportView


def export_csv(view: ExportView, out_path: str | Path) -> int:
    """Write path,cluster,name,confidence,status,suggested_name[,gt]. Returns rows written."""
    has_gt = any(i.gt is not None for i in view.items)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "cluster", "name", "confidence", "status", "suggested_name"] + (["gt"] if has_gt else []))
    for i in view.items:
        w.writerow([i.path, i.cluster, i.name, f"{i.confidence:.6f}", i.status, i.suggested_name]
                   + ([i.gt or ""] if has_gt else []))
    atomic_write_text(out_path, buf.getvalue())
    return len(view.items)
