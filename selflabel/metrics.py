"""Clustering and segmentation metrics (pure functions on integer arrays).

NMI and ARI come from scikit-learn; Hungarian matching from scipy's linear_sum_assignment.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def _encode(y: np.ndarray | list) -> np.ndarray:
    """Map arbitrary labels (strings, ints) to 0..C-1."""
    _, inv = np.unique(np.asarray(y), return_inverse=True)
    return inv.reshape(-1)


def contingency(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Counts [n_pred, n_true] of (pred, true) pairs, both encoded to 0..C-1."""
    t, p = _encode(y_true), _encode(y_pred)
    m = np.zeros((p.max() + 1, t.max() + 1), dtype=np.int64)
    np.add.at(m, (p, t), 1)
    return m


def nmi(y_true, y_pred) -> float:
    return float(normalized_mutual_info_score(_encode(y_true), _encode(y_pred)))


def ari(y_true, y_pred) -> float:
    return float(adjusted_rand_score(_encode(y_true), _encode(y_pred)))


def hungarian_accuracy(y_true, y_pred) -> float:
    """Accuracy under the best one-to-one map of clusters to classes (unmatched clusters count as wrong)."""
    y_true = np.asarray(y_true)
    if len(y_true) == 0:
        raise ValueError("hungarian_accuracy: empty input")
    m = contingency(y_true, y_pred)
    rows, cols = linear_sum_assignment(m, maximize=True)
    return float(m[rows, cols].sum() / len(y_true))


def cluster_metrics(y_true, y_pred) -> dict[str, float]:
    """NMI, ARI and Hungarian accuracy in one dict."""
    return {"nmi": nmi(y_true, y_pred), "ari": ari(y_true, y_pred), "accuracy": hungarian_accuracy(y_true, y_pred)}


def confusion(gt: np.ndarray, pred: np.ndarray, n_classes: int, n_clusters: int, void: int | None = None) -> np.ndarray:
    """Pixel confusion [n_clusters, n_classes] over valid pixels (gt != void, 0 <= gt < n_classes)."""
    gt = np.asarray(gt).reshape(-1).astype(np.int64)
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    if gt.shape != pred.shape:
        raise ValueError(f"confusion: gt has {gt.size} pixels but prediction {pred.size}")
    valid = (gt >= 0) & (gt < n_classes) & (pred >= 0) & (pred < n_clusters)
    if void is not None:
        valid &= gt != void
    idx = pred[valid] * n_classes + gt[valid]
    return np.bincount(idx, minlength=n_clusters * n_classes).reshape(n_clusters, n_classes)


def _iou_from_assignment(conf: np.ndarray, cluster_to_class: np.ndarray) -> np.ndarray:
    """Per-class IoU after mapping each cluster to a class (-1 = unmapped, counts as false positive of nothing)."""
    n_classes = conf.shape[1]
    merged = np.zeros((n_classes, n_classes), dtype=np.int64)  # [pred class, true class]
    for c, k in enumerate(cluster_to_class):
        if k >= 0:
            merged[k] += conf[c]
    tp = np.diag(merged).astype(np.float64)
    gt_total = conf.sum(0).astype(np.float64)  # every valid gt pixel, also those of unmapped clusters
    pred_total = merged.sum(1).astype(np.float64)
    denom = gt_total + pred_total - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / denom, np.nan)
    return iou


def miou_hungarian(conf: np.ndarray) -> tuple[float, np.ndarray]:
    """mIoU with a one-to-one Hungarian match of clusters to classes (maximising matched pixels).

    Returns (mIoU over classes present in gt, per-class IoU)."""
    rows, cols = linear_sum_assignment(conf, maximize=True)
    mapping = np.full(conf.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    iou = _iou_from_assignment(conf, mapping)
    present = conf.sum(0) > 0
    return float(np.nanmean(iou[present])) if present.any() else float("nan"), iou


def miou_overcluster(conf: np.ndarray) -> tuple[float, np.ndarray]:
    """Many-to-one mIoU (Leopart's overclustering score): each cluster goes to its majority class."""
    mapping = conf.argmax(1)
    mapping[conf.sum(1) == 0] = -1
    iou = _iou_from_assignment(conf, mapping)
    present = conf.sum(0) > 0
    return float(np.nanmean(iou[present])) if present.any() else float("nan"), iou


def boundary_fscore(gt: np.ndarray, pred: np.ndarray, tolerance: float, void: int | None = None
                    ) -> tuple[float, float, float]:
    """Boundary F-measure of a predicted label map against ground truth (BSDS, Martin et al. 2004; DAVIS's F).

    A boundary pixel is one whose right or lower neighbour has another label (one pixel wide). A predicted
    boundary pixel is correct when a ground-truth boundary lies within `tolerance` pixels (Euclidean), and
    vice versa for recall. Pixel pairs touching `void` in gt are ignored in both, so the unlabelled border
    around a void region counts neither way. Returns (F, precision, recall); two maps without any boundary
    score 1, one without against one with scores 0."""
    from scipy.ndimage import distance_transform_edt

    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape or gt.ndim != 2:
        raise ValueError(f"boundary_fscore: maps must be 2-D of one shape (got {gt.shape} and {pred.shape})")
    ok = np.ones(gt.shape, dtype=bool) if void is None else gt != void

    def edges(m: np.ndarray) -> np.ndarray:
        b = np.zeros(m.shape, dtype=bool)
        b[:, :-1] |= (m[:, :-1] != m[:, 1:]) & ok[:, :-1] & ok[:, 1:]
        b[:-1] |= (m[:-1] != m[1:]) & ok[:-1] & ok[1:]
        return b

    bg, bp = edges(gt), edges(pred)
    if not bg.any() and not bp.any():
        return 1.0, 1.0, 1.0
    if not bg.any() or not bp.any():
        return 0.0, float(not bp.any()), float(not bg.any())
    precision = float((distance_transform_edt(~bg)[bp] <= tolerance).mean())
    recall = float((distance_transform_edt(~bp)[bg] <= tolerance).mean())
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return float(f), precision, recall
