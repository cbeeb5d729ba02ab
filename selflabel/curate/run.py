"""The curation post-step of `selflabel label`: neighbours, near-duplicates and outlier scores into the run folder.

Writes `neighbors.npz` (each image's `N_NEIGHBOURS` nearest neighbours, the app's suggestions
read them) and adds two columns to labels.csv: `duplicate_of` (path of the copy kept, empty
otherwise) and `outlier` (see `outliers.outlier_scores`).
"""
from __future__ import annotations

import io
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write_bytes
from ..neighbors import Neighbors, knn
from ..runfiles import FEATURES, LABELS, read_labels, write_labels
from .duplicates import DUPLICATE_COLUMN, DUPLICATE_THRESHOLD, duplicate_of
from .outliers import OUTLIER_COLUMN, outlier_scores
from .prepare import centred_unit

log = logging.getLogger(__name__)

NEIGHBOURS = "neighbors.npz"
N_NEIGHBOURS = 10


def neighbours_of(x: np.ndarray, k: int = N_NEIGHBOURS, device: str = "cpu", method: str = "auto") -> Neighbors:
    """k nearest neighbours of every unit row among the others (k capped at N - 1). `method` "auto": the exact
    search up to `selflabel.neighbors.EXACT_MAX_ROWS` rows, the faiss index beyond (`neighbors.choose_method`).
    The rows are handed over as they are (no second normalised copy: at 1,000,000 x 1,280 that is 5 GB)."""
    rows = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return knn(rows, min(k, len(x) - 1), exclude_self=True, device=device, method=method, normalized=True)


def save_neighbours(path: Path, nb: Neighbors) -> None:
    buf = io.BytesIO()
    np.savez(buf, indices=nb.indices.astype(np.int32), similarities=nb.similarities.astype(np.float32))
    atomic_write_bytes(path, buf.getvalue())


def load_neighbours(path: Path) -> Neighbors:
    with np.load(path, allow_pickle=False) as z:
        return Neighbors(z["indices"].astype(np.int64), z["similarities"])


def curate_run(run_dir: str | Path, *, device: str = "cpu", threshold: float = DUPLICATE_THRESHOLD,
               method: str = "auto") -> dict[str, int]:
    """Add near-duplicates and outlier scores to RUN/labels.csv and write RUN/neighbors.npz; returns counts."""
    run = Path(run_dir)
    rows = read_labels(run / LABELS)
    if len(rows) < 2:
        return {"duplicates": 0, "groups": 0}
    x = centred_unit(np.load(run / FEATURES, mmap_mode="r", allow_pickle=False))
    nb = neighbours_of(x, device=device, method=method)
    save_neighbours(run / NEIGHBOURS, nb)
    dup = duplicate_of(nb.indices, nb.similarities, threshold)
    labels = np.unique(np.array([r.cluster for r in rows]), return_inverse=True)[1].reshape(-1)
    score = outlier_scores(x, labels)
    out = []
    for i, r in enumerate(rows):
        extra = dict(r.extra)
        extra[DUPLICATE_COLUMN] = rows[dup[i]].path if dup[i] >= 0 else ""
        extra[OUTLIER_COLUMN] = f"{score[i]:.3f}"
        out.append(replace(r, extra=extra))
    write_labels(run / LABELS, out)
    counts = {"duplicates": int((dup >= 0).sum()), "groups": int(len(np.unique(dup[dup >= 0])))}
    log.info("curation: %d near-duplicate copies in %d groups", counts["duplicates"], counts["groups"])
    return counts
