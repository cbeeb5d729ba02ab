"""Per-image outlier score: how atypical an image is for the cluster it was given.

Score = cosine distance of the (centred, L2-normalised) feature to its cluster's mean direction,
standardised within the cluster by the median and the median absolute deviation, so one number
means the same in a tight cluster and a loose one. High = least typical: junk, screenshots and
out-of-domain images surface first in the app's "least typical first" order. The distance to the
cluster centre rather than to the k-th neighbour, because out-of-domain images that come in a batch
(a hundred street frames in a photo collection) are each other's neighbours and would look typical.
"""
from __future__ import annotations

import numpy as np

OUTLIER_COLUMN = "outlier"  # labels.csv


def cluster_directions(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Unit mean direction of each cluster [max label + 1, D] of unit rows `x`."""
    k = int(labels.max()) + 1
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, x)
    return (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def outlier_scores(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """float32 [N]: robust z-score within its cluster of each unit row's cosine distance to the cluster centre."""
    labels = np.asarray(labels, dtype=np.int64)
    centres = cluster_directions(x, labels)
    dist = 1.0 - np.einsum("nd,nd->n", x, centres[labels])
    out = np.zeros(len(x), dtype=np.float32)
    for c in np.unique(labels):
        m = labels == c
        med = np.median(dist[m])
        mad = np.median(np.abs(dist[m] - med)) * 1.4826
        out[m] = (dist[m] - med) / max(mad, 1e-6)
    return out
