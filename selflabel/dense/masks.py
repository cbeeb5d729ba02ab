"""Label maps: upsampled part assignment, small-region clean-up, colours and overlays (pure numpy/torch)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_MAX_UPSAMPLE_FLOATS = 1 << 24  # 64 MiB of float32 scores at a time


@torch.no_grad()
def upsampled_argmax(scores: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """argmax over K of bilinearly upsampled score maps [K, h, w] -> int64 [H, W] (size = (H, W)).

    Upsampling the scores (not the labels) before the argmax gives boundaries between patch centres,
    as Leopart does for its masks. Done in chunks of clusters with a running max, so memory stays
    bounded for large images.
    """
    k = scores.shape[0]
    H, W = size
    s = scores.float()[None]
    step = max(1, min(k, _MAX_UPSAMPLE_FLOATS // max(1, H * W)))
    best_val = torch.full((H, W), -torch.inf)
    best_idx = torch.zeros((H, W), dtype=torch.int64)
    for start in range(0, k, step):
        up = F.interpolate(s[:, start:start + step], size=(H, W), mode="bilinear", align_corners=False)[0]
        val, idx = up.max(0)
        better = val > best_val
        best_val = torch.where(better, val, best_val)
        best_idx = torch.where(better, idx + start, best_idx)
    return best_idx.numpy()


def resize_labels(label_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer map to size (H, W), pixel centres aligned."""
    H, W = size
    h, w = label_map.shape
    if (h, w) == (H, W):
        return label_map
    ys = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
    return label_map[ys[:, None], xs[None, :]]


def small_region_mask(label_map: np.ndarray, min_area: int) -> np.ndarray:
    """True where a pixel lies in an 8-connected single-label component of fewer than min_area pixels
    (label 0, unassigned, always counts as small)."""
    small = label_map == 0
    if min_area <= 1:
        return small
    for lab in np.unique(label_map):
        if lab == 0:
            continue
        comps, n = ndimage.label(label_map == lab, structure=EIGHT_CONNECTED)
        if n == 0:
            continue
        sizes = np.bincount(comps.ravel(), minlength=n + 1)
        tiny = sizes < min_area
        tiny[0] = False
        small |= tiny[comps]
    return small


def fill_small_regions(label_map: np.ndarray, min_area: int, max_rounds: int = 3) -> np.ndarray:
    """Give every pixel of a component smaller than `min_area` the label of the nearest pixel of a
    large component (Euclidean distance transform), so that every non-zero pixel of the result lies in
    a component of at least `min_area` pixels. Pixels that cannot be fixed become 0 (unassigned).
    """
    out = np.asarray(label_map).copy()
    for _ in range(max_rounds):
        small = small_region_mask(out, min_area)
        if not small.any():
            return out
        if small.all():
            return np.zeros_like(out)
        _, (iy, ix) = ndimage.distance_transform_edt(small, return_indices=True)
        out = out[iy, ix]
    out[small_region_mask(out, min_area)] = 0
    return out


def palette(n: int, seed: int = 0) -> np.ndarray:
    """n distinct RGB colours (uint8 [n, 3]); index 0 is black (unassigned)."""
    rng = np.random.default_rng(seed)
    golden = 0.618033988749895
    hues = (np.arange(n) * golden + rng.random()) % 1.0
    sat = 0.55 + 0.35 * ((np.arange(n) * 7) % 3) / 2
    val = 0.95 - 0.25 * ((np.arange(n) * 5) % 2)
    i = np.floor(hues * 6).astype(int) % 6
    f = hues * 6 - np.floor(hues * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    rgb = np.select([i[:, None] == j for j in range(6)],
                    [np.stack(c, 1) for c in ((val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q))])
    out = (rgb * 255).round().astype(np.uint8)
    if n:
        out[0] = 0
    return out


def overlay(image: np.ndarray, label_map: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend concept colours over an RGB image (uint8 [H, W, 3]) and draw concept borders in white."""
    img = np.asarray(image, dtype=np.float32)
    col = colours[np.clip(label_map, 0, len(colours) - 1)].astype(np.float32)
    assigned = (label_map > 0)[..., None]
    out = np.where(assigned, (1 - alpha) * img + alpha * col, img)
    edge = np.zeros(label_map.shape, dtype=bool)
    edge[:-1] |= label_map[:-1] != label_map[1:]
    edge[:, :-1] |= label_map[:, :-1] != label_map[:, 1:]
    out[edge] = 255
    return out.round().clip(0, 255).astype(np.uint8)
