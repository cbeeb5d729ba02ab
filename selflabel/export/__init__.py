"""Exporters: every format reads the run through one `ExportView` (review edits, names, left-out
images applied in `view.build_view`), so a format is one function of the view in its own file plus
one line in EXPORTERS."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection

from ..curate.duplicates import duplicate_paths
from ..errors import InputError
from ..runfiles import DENSE, EXPORTS, LABELS, read_labels
from ..suggest import zero_shot_for_run
from .coco import export_coco
from .csv import export_csv
from .hf import export_hf_imagefolder
from .imagefolder import export_imagefolder
from .labelstudio import export_labelstudio
from .view import ExportView, build_view
from .yolo import export_yolo_cls, export_yolo_seg


@dataclass
class ExportOptions:
    mode: str = "copy"  # folder formats: copy | hardlink | symlink
    url_prefix: str | None = None  # labelstudio: where the images are served (default: its local-files endpoint)
    val_fraction: float = 0.2  # yolo: share of each class in val/


def _imagefolder(view: ExportView, target: Path, o: ExportOptions) -> int:
    index = view.class_index()  # clusters renamed alike share one folder
    rows = [r.__class__(r.path, index[i.name], r.confidence, r.gt) for r, i in zip(view.rows(), view.items)]
    return export_imagefolder(rows, dict(enumerate(view.classes)), view.data_root, target, mode=o.mode)


# format -> (default target under RUN/exports, writer)
EXPORTERS: dict[str, tuple[str, Callable[[ExportView, Path, ExportOptions], int]]] = {
    "csv": ("labels.csv", lambda v, t, o: export_csv(v, t)),
    "imagefolder": ("imagefolder", _imagefolder),
    "coco": ("coco.json", lambda v, t, o: export_coco(v, t)),
    "labelstudio": ("labelstudio", lambda v, t, o: export_labelstudio(v, t, o.url_prefix)),
    "yolo-cls": ("yolo-cls", lambda v, t, o: export_yolo_cls(v, t, o.val_fraction, o.mode)),
    "yolo-seg": ("yolo-seg", lambda v, t, o: export_yolo_seg(v, t, o.val_fraction, o.mode)),
    "hf": ("hf-imagefolder", lambda v, t, o: export_hf_imagefolder(v, t, o.mode)),
}
FORMATS = tuple(EXPORTERS)
DENSE_ONLY = {"yolo-seg"}


def formats_for(run_dir: str | Path) -> tuple[str, ...]:
    """The formats a run can be exported in (yolo-seg only for dense runs): for the review app's buttons."""
    dense = (Path(run_dir) / DENSE / "dense.json").is_file()
    return tuple(f for f in FORMATS if dense or f not in DENSE_ONLY)


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, *, include_rejected: bool = False,
               mode: str = "copy", names: str = "reviewed", leave_out: Collection[str] = (),
               url_prefix: str | None = None, val_fraction: float = 0.2, vocab: str | Path | None = None,
               include_duplicates: bool = True) -> tuple[Path, int]:
    """Export a run in `fmt`; returns (written path, number of images).

    names: "reviewed" or "suggested" (unrenamed clusters take their suggested name); leave_out: image
    paths to drop; include_duplicates=False also drops the near-duplicate copies labels.csv marks
    (`duplicate_of`, one image of each group kept); vocab: a words file for zero-shot suggested names (open_clip)."""
    if fmt not in EXPORTERS:
        raise InputError(f"unknown export format '{fmt}' (choose {', '.join(FORMATS)})")
    run = Path(run_dir)
    if vocab is not None:
        zero_shot_for_run(run, vocab)
    if not include_duplicates and (run / LABELS).is_file():
        leave_out = set(leave_out) | duplicate_paths(read_labels(run / LABELS))
    view = build_view(run, include_rejected=include_rejected and fmt == "csv", names=names, leave_out=leave_out)
    if fmt in DENSE_ONLY and not view.is_dense:
        raise InputError(f"{run}: '{fmt}' needs a dense run (run `selflabel segment` first)")
    default, write = EXPORTERS[fmt]
    target = Path(out) if out else run / EXPORTS / default
    return target, write(view, target, ExportOptions(mode=mode, url_prefix=url_prefix, val_fraction=val_fraction))
