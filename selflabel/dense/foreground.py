"""Cluster-based foreground extraction (CBFE, Ziegler & Asano, Leopart, CVPR 2022, Sec. 3.3).

1. A noisy foreground per image from the backbone's saliency map: for a ViT the CLS attention of the
   last block averaged over heads (as Leopart, after DINO); for a CNN the channel L2-norm of the last
   feature map, a proxy (strongly activated regions tend to be objects; it is not attention). The map
   is blurred, the most salient patches holding `mass` of the total saliency are kept (DINO's
   `visualize_attention` rule, Leopart keeps 65%), and specks of <= 2 patches are dropped.
2. Each part cluster's foreground precision: the fraction of its pixels inside the noisy foreground,
   averaged over the images it appears in (Leopart's `get_cluster_precs`).
3. Clusters whose precision is at least a threshold are foreground ("things"); the rest are
   background ("stuff"). The clusters fix the noisy per-image masks: a cluster is foreground
   everywhere or nowhere.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .masks import EIGHT_CONNECTED


def noisy_foreground(saliency: np.ndarray, mass: float = 0.65, blur_sigma: float = 0.6, min_patches: int = 3) -> np.ndarray:
    """Binary foreground [h, w] keeping the most salient patches that hold `mass` of the saliency.

    The per-image minimum is subtracted first: attention is already near zero on the background,
    while the CNN norm proxy has a large floor that would otherwise make every patch count.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"noisy_foreground: mass must be in (0, 1], got {mass}")
    s = np.asarray(saliency, dtype=np.float64)
    s = np.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)
    if blur_sigma > 0:
        s = ndimage.gaussian_filter(s, sigma=blur_sigma, mode="nearest", truncate=3.0)
    s = s - s.min()
    total = s.sum()
    if total <= 0:
        return np.zeros(s.shape, dtype=bool)
    order = np.argsort(s, axis=None)[::-1]
    cum = np.cumsum(s.ravel()[order]) / total
    n_keep = int(np.searchsorted(cum, mass, side="left")) + 1
    fg = np.zeros(s.size, dtype=bool)
    fg[order[:n_keep]] = True
    fg = fg.reshape(s.shape)
    if min_patches > 1:
        comps, n = ndimage.label(fg, structure=EIGHT_CONNECTED)
        sizes = np.bincount(comps.ravel(), minlength=n + 1)
        keep = sizes >= min_patches
        keep[0] = False
        if keep.any():  # never drop everything: a single salient speck is still the best guess
            fg = keep[comps]
    return fg


def cluster_fg_precision(part_maps: list[np.ndarray], fg_masks: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster: mean over the images it appears in of (its pixels in the foreground / its pixels).

    `part_maps[i]` (int [H, W], values in 0..k-1) and `fg_masks[i]` (bool, same shape).
    Returns (precision float64 [k], number of images each cluster appears in int64 [k]);
    clusters that never appear get precision 0.
    """
    prec_sum = np.zeros(k, dtype=np.float64)
    n_img = np.zeros(k, dtype=np.int64)
    for parts, fg in zip(part_maps, fg_masks):
        if parts.shape != fg.shape:
            raise ValueError(f"cluster_fg_precision: part map {parts.shape} and mask {fg.shape} differ")
        p = parts.ravel()
        total = np.bincount(p, minlength=k)
        inside = np.bincount(p[fg.ravel()], minlength=k)
        present = total > 0
        prec_sum[present] += inside[present] / total[present]
        n_img += present
    prec = np.divide(prec_sum, n_img, out=np.zeros(k), where=n_img > 0)
    return prec, n_img


def select_foreground(precision: np.ndarray, threshold: float) -> np.ndarray:
    """bool [k]: the clusters whose foreground precision reaches `threshold`."""
    return np.asarray(precision) >= threshold


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's cut (IEEE SMC 1979) of 1-D values: the midpoint between two consecutive sorted values that
    maximises the between-class variance w0 * w1 * (m0 - m1)^2; label-free, deterministic (first best on ties).

    CBFE's precisions are bimodal (parts almost never or almost always salient), so the cut falls in the
    valley between the modes instead of at a fixed 0.5."""
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if x.size < 2 or x[0] == x[-1]:
        return float(x[0]) if x.size else 0.5
    n = x.size
    cum = np.cumsum(x)
    i = np.arange(1, n)  # class 0 = x[:i], class 1 = x[i:]
    m0, m1 = cum[i - 1] / i, (cum[-1] - cum[i - 1]) / (n - i)
    between = (i / n) * (1 - i / n) * (m0 - m1) ** 2
    between[x[i] == x[i - 1]] = -1.0  # a cut must fall between two different values
    j = int(np.argmax(between)) + 1
    return float((x[j - 1] + x[j]) / 2)
