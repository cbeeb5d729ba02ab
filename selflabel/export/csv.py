"""CSV export: one row per image with the reviewed cluster, its name and status."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable

from ..atomic import atomic_write_text
from ..runfiles import LabelRow
from ..naming import default_name


def export_csv(rows: Iterable[LabelRow], names: dict[int, str], out_path: str | Path,
               rejected: set[str] = frozenset(), unsure: set[str] = frozenset(), include_rejected: bool = False) -> int:
    """Write path,cluster,name,confidence,status[,gt]; rejected images are left out unless asked. Returns rows written."""
    rows = list(rows)
    has_gt = any(r.gt is not None for r in rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "cluster", "name", "confidence", "status"] + (["gt"] if has_gt else []))
    n = 0
    for r in rows:
        status = "rejected" if r.path in rejected else "unsure" if r.path in unsure else "ok"
        if status == "rejected" and not include_rejected:
            continue
        w.writerow([r.path, r.cluster, names.get(r.cluster, default_name(r.cluster)), f"{r.confidence:.6f}", status]
                   + ([r.gt or ""] if has_gt else []))
        n += 1
    atomic_write_text(out_path, buf.getvalue())
    return n
