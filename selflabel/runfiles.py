"""The run folder: where each output lives, and reading/writing the label table."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .atomic import atomic_write_json, atomic_write_text
from .errors import InputError

LABELS = "labels.csv"
SKIPPED = "skipped.csv"
MANIFEST = "manifest.json"
FEATURES = "features.npy"
PROTOTYPES = "prototypes.npy"
CHECKPOINTS = "checkpoints"
DENSE = "dense"
REVIEW_DB = "review.sqlite"
EXPORTS = "exports"
THUMBS = "thumbs"  # the review app's thumbnail cache
RUN_JSON = "run.json"  # the configuration this folder's run was started with (written first)
LOCK = ".lock"  # held (flock) by the `selflabel label` writing the folder; holds its pid
# everything a run writes; `--overwrite` removes these (the review database is kept aside instead)
RUN_OUTPUTS = (LABELS, SKIPPED, MANIFEST, FEATURES, PROTOTYPES, CHECKPOINTS, DENSE, EXPORTS, THUMBS, RUN_JSON)


@dataclass
class LabelRow:
    """One image's label. `path` is POSIX and relative to the run's data root."""

    path: str
    cluster: int
    confidence: float
    gt: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def write_labels(path: str | Path, rows: Iterable[LabelRow]) -> None:
    """Write labels.csv atomically: path,cluster,confidence[,gt][,extra columns]."""
    rows = list(rows)
    has_gt = any(r.gt is not None for r in rows)
    extra_cols: list[str] = []
    for r in rows:
        for k in r.extra:
            if k not in extra_cols:
                extra_cols.append(k)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "cluster", "confidence"] + (["gt"] if has_gt else []) + extra_cols)
    for r in rows:
        w.writerow(
            [r.path, int(r.cluster), f"{float(r.confidence):.6f}"]
            + ([r.gt if r.gt is not None else ""] if has_gt else [])
            + [r.extra.get(k, "") for k in extra_cols]
        )
    atomic_write_text(path, buf.getvalue())


def read_labels(path: str | Path) -> list[LabelRow]:
    """Read a labels.csv (ours or a user's edited copy), validating every row."""
    p = Path(path)
    if p.is_dir():
        p = p / LABELS
    if not p.is_file():
        raise InputError(f"{p}: labels file not found (is this a selflabel run folder?)")
    rows: list[LabelRow] = []
    with open(p, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "cluster", "confidence"} - set(reader.fieldnames or [])
        if missing:
            raise InputError(f"{p}: missing column(s) {', '.join(sorted(missing))}")
        for i, rec in enumerate(reader, start=2):
            try:
                cluster = int(rec["cluster"])
                conf = float(rec["confidence"])
            except (TypeError, ValueError):
                raise InputError(f"{p}: line {i}: cluster must be an integer and confidence a number") from None
            extra = {k: v for k, v in rec.items() if k not in {"path", "cluster", "confidence", "gt"} and k}
            gt = rec.get("gt")
            rows.append(LabelRow(rec["path"], cluster, conf, gt if gt not in (None, "") else None, extra))
    return rows


def write_skipped(path: str | Path, skipped: Iterable[Any]) -> None:
    """skipped.csv: path,reason (one row per file that could not be used)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "reason"])
    for s in skipped:
        w.writerow([s.path, s.reason])
    atomic_write_text(path, buf.getvalue())


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    p = Path(run_dir) / MANIFEST
    if not p.is_file():
        raise InputError(f"{run_dir}: no {MANIFEST}; not a selflabel run folder")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}: corrupt manifest ({exc})") from None


def write_manifest(run_dir: str | Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / MANIFEST, manifest)
