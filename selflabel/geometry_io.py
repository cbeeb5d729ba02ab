"""A run's stored geometry: geometry.json (method, temperature, normalisation, cluster ids),
feature_mean.npy (the centring mean [D]) and prototypes.npy ([K, D], unit rows in the centred,
normalised space). The same three files for every method."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .atomic import atomic_save_npy, atomic_write_json
from .errors import InputError
from .geometry import Geometry
from .runfiles import PROTOTYPES

GEOMETRY = "geometry.json"
FEATURE_MEAN = "feature_mean.npy"
GEOMETRY_VERSION = 1


def save_geometry(run_dir: str | Path, geometry: Geometry) -> None:
    """Write the three geometry files of a run folder (atomically, prototypes and mean first)."""
    run_dir = Path(run_dir)
    atomic_save_npy(run_dir / PROTOTYPES, geometry.prototypes)
    atomic_save_npy(run_dir / FEATURE_MEAN, geometry.mean)
    atomic_write_json(run_dir / GEOMETRY, {
        "version": GEOMETRY_VERSION, "method": geometry.method, "temperature": geometry.temperature,
        "normalisation": geometry.normalisation, "dim": geometry.dim, "k": geometry.k,
        "cluster_ids": [int(c) for c in geometry.cluster_ids], "mean": FEATURE_MEAN, "prototypes": PROTOTYPES})


def load_geometry(run_dir: str | Path) -> Geometry:
    """The geometry a run stored; a clear error for a run folder without one."""
    run_dir = Path(run_dir)
    path = run_dir / GEOMETRY
    if not path.is_file():
        raise InputError(f"{path}: missing; this run stores no geometry (made before selflabel 0.2?): label the folder again")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        mean = np.load(run_dir / meta["mean"], allow_pickle=False)
        protos = np.load(run_dir / meta["prototypes"], allow_pickle=False)
        return Geometry(mean, protos, float(meta["temperature"]), str(meta["method"]),
                        np.asarray(meta["cluster_ids"], dtype=np.int64), str(meta["normalisation"]))
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path}: unreadable geometry ({exc})") from None
