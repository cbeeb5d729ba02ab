"""Per-image outlier score: how atypical an image is for the cluster it was given.

Score = cosine distance of the (centred, L2-normalised) feature to its cluster's typical direction
(the mean of the half of the cluster closest to its plain mean, so a batch of strays inside a
cluster does not pull the centre towards itself), standardised within the cluster by the median and the median absolute deviation, so one number
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


TYPICAL_SHARE = 0.5  # the share of a cluster its typical direction is the mean of


def typical_directions(x: np.ndarray, labels: np.ndarray, share: float = TYPICAL_SHARE) -> np.ndarray:
    """Unit mean direction of the `share` of each cluster closest to the cluster's plain mean direction.
    (With 100 street frames among imagenette-val, 78 in one cluster, the trimmed centre lifted the
    ROC AUC of the outlier score from 0.88 to 0.95.)"""
    dist = 1.0 - np.einsum("nd,nd->n", x, cluster_directions(x, labels)[labels])
    keep = np.zeros(len(x), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        keep[rows[dist[rows] <= np.quantile(dist[rows], share)]] = True
    centres = cluster_directions(x[keep], labels[keep])
    return np.concatenate([centres, np.zeros((int(labels.max()) + 1 - len(centres), x.shape[1]), np.float32)])


def outlier_scores(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """float32 [N]: robust z-score within its cluster of each unit row's cosine distance to the cluster's
    typical direction."""
    labels = np.asarray(labels, dtype=np.int64)
    centres = typical_directions(x, labels)
    dist = 1.0 - np.einsum("nd,nd->n", x, centres[labels])
    out = np.zeros(len(x), dtype=np.float32)
    for c in np.unique(labels):
        m = labels == c
        med = np.median(dist[m])
        mad = np.median(np.abs(dist[m] - med)) * 1.4826
        out[m] = (dist[m] - med) / max(mad, 1e-6)
    return out
