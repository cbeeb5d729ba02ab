"""`selflabel.Run`: a run folder from Python (labels with review edits applied, features, clusters,
export, assign)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .assign import UNSURE_QUANTILE, assign_folder
from .errors import InputError
from .export import export_run
from .geometry import Geometry
from .geometry_io import load_geometry
from .review.store import effective_labels
from .runfiles import FEATURES, LABELS, read_manifest


class Run:
    """A run folder written by `selflabel label` (or `assign`). Open one with `Run.open(path)`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest: dict[str, Any] = read_manifest(self.path)
        if not (self.path / LABELS).is_file():
            raise InputError(f"{self.path}: no {LABELS}; not a selflabel run folder")

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        return cls(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, k={self.manifest.get('k')}, n_images={self.manifest.get('n_images')})"

    @property
    def labels(self) -> pd.DataFrame:
        """One row per image (labels.csv order) with every review edit applied: path, cluster, name,
        confidence, status (ok | rejected | unsure), gt when known, and any extra columns (head_<K>...)."""
        rows, names, rejected, unsure = effective_labels(self.path)
        df = pd.DataFrame({
            "path": [r.path for r in rows],
            "cluster": np.array([r.cluster for r in rows], dtype=np.int64),
            "name": [names.get(r.cluster, "") for r in rows],
            "confidence": np.array([r.confidence for r in rows], dtype=np.float32),
            "status": ["rejected" if r.path in rejected else "unsure" if r.path in unsure else "ok" for r in rows],
        })
        if any(r.gt is not None for r in rows):
            df["gt"] = [r.gt for r in rows]
        extra = [c for c in dict.fromkeys(k for r in rows for k in r.extra) if c not in df.columns]
        for col in extra:
            df[col] = [r.extra.get(col, "") for r in rows]
        return df

    @property
    def features(self) -> np.ndarray:
        """features.npy, memory-mapped read-only: row i <-> labels row i."""
        return np.load(self.path / FEATURES, mmap_mode="r", allow_pickle=False)

    @property
    def clusters(self) -> pd.DataFrame:
        """One row per reviewed cluster: cluster, name, images, rejected and unsure counts (largest first)."""
        df = self.labels
        g = df.groupby(["cluster", "name"], sort=False)
        out = pd.DataFrame({"images": g.size(), "rejected": g["status"].apply(lambda s: int((s == "rejected").sum())),
                            "unsure": g["status"].apply(lambda s: int((s == "unsure").sum()))}).reset_index()
        return out.sort_values(["images", "cluster"], ascending=[False, True], ignore_index=True)

    @property
    def geometry(self) -> Geometry:
        """The stored geometry (centring mean, prototypes, temperature) the clustering worked in."""
        return load_geometry(self.path)

    def export(self, format: str = "csv", dest: str | Path | None = None, **options: Any) -> Path:
        """Export as csv | imagefolder | coco (see `selflabel export`); returns the path written."""
        target, _n = export_run(self.path, format, dest, **options)
        return Path(target)

    def assign(self, folder: str | Path, out: str | Path | None = None, *, unsure_quantile: float = UNSURE_QUANTILE,
               show_progress: bool = False, **options: Any) -> "Run":
        """Label the images under `folder` with this run's reviewed clusters (`selflabel assign`)."""
        out = Path(out) if out is not None else self.path.parent / f"{self.path.name}-assigned-{Path(folder).name}"
        assign_folder(self.path, folder, out, unsure_quantile=unsure_quantile, show_progress=show_progress, **options)
        return Run(out)
