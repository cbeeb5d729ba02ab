"""Centred, L2-normalised feature rows: the geometry every curation signal is measured in."""
from __future__ import annotations

import numpy as np

_ROWS = 65536


def centred_unit(features: np.ndarray) -> np.ndarray:
    """float32 copy of `features` [N, D] (array or memmap) less the mean row, each row scaled to unit
    length; built in chunks so the copy is the only N x D array held."""
    n = features.shape[0]
    mean = np.zeros(features.shape[1], dtype=np.float64)
    for s in range(0, n, _ROWS):
        mean += np.asarray(features[s:s + _ROWS], dtype=np.float64).sum(0)
    mean = (mean / max(n, 1)).astype(np.float32)
    out = np.empty(features.shape, dtype=np.float32)
    for s in range(0, n, _ROWS):
        part = np.asarray(features[s:s + _ROWS], dtype=np.float32) - mean
        out[s:s + _ROWS] = part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)
    return out
