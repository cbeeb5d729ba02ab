"""The label result every clustering method returns (bottom layer: no imports from the package)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class LabelResult:
    """Per-image labels from any method (sinkhorn, sela, swav, kmeans).

    `prototypes` are unit rows in the prepared (centred, L2-normalised) feature space of
    `selflabel.geometry`, the same space for every method once `selflabel.methods` has built the run's
    `Geometry` (kept in `geometry`).
    """

    labels: np.ndarray  # int64 [N]
    confidence: np.ndarray  # float32 [N] in [0, 1]
    prototypes: np.ndarray  # float32 [K, D], L2-normalised
    head_labels: dict[int, np.ndarray] = field(default_factory=dict)  # K -> int64 [N]
    probs: np.ndarray | None = None  # float32 [N, K] or None
    info: dict[str, Any] = field(default_factory=dict)
    geometry: Any = None  # selflabel.geometry.Geometry, set by selflabel.methods.cluster_features
