"""Masks that follow image edges: part scores refined to the image before the argmax (pure numpy/torch).

The part scores live on the backbone's patch grid (stride 32: one score every ~26 px of a CamVid
frame), so a bilinear upsampling puts every boundary between patch centres, up to half a patch away
from the real edge. Two refinements move it onto the edge:

- `slic`: SLIC superpixels (Achanta et al., TPAMI 2012, scikit-image) of the image; the upsampled
  scores are averaged inside each superpixel and the superpixel takes the argmax, so a boundary can
  only run along superpixel borders, which follow colour edges.
- `guided`: the guided filter (He, Sun & Tang, ECCV 2010 / TPAMI 2013) of every score map with the
  RGB image as guide: locally the output is a linear function of the image colour, so a score
  transition inside a window snaps to the colour edge there. Computed as the fast guided filter
  (He & Sun, arXiv:1505.00996): coefficients on a `subsample`-times smaller grid, upsampled.

Only the parts that win somewhere before refinement compete after it, so refinement never brings in
a part (or concept) that the plain argmax does not show, and the cost scales with the parts present.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

REFINE_METHODS = ("none", "slic", "guided")
Refine = Literal["none", "slic", "guided"]
_MAX_UPSAMPLE_FLOATS = 1 << 24  # 64 MiB of float32 scores at a time


def _upsample(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of score maps [C, h, w] -> [C, H, W] (align_corners=False, as `upsampled_argmax`)."""
    if tuple(scores.shape[1:]) == tuple(size):
        return scores
    return F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]


def _chunks(c: int, h: int, w: int) -> range:
    return range(0, c, max(1, min(c, _MAX_UPSAMPLE_FLOATS // max(1, 4 * h * w))))


def slic_segments(rgb: np.ndarray, n_segments: int = 800, compactness: float = 10.0) -> np.ndarray:
    """SLIC superpixels of an RGB image (uint8 [H, W, 3]) -> int64 [H, W] ids 0..S-1 (scikit-image, CIELAB)."""
    from skimage.segmentation import slic

    seg = slic(np.asarray(rgb), n_segments=max(1, int(n_segments)), compactness=float(compactness), start_label=0,
               channel_axis=-1, enforce_connectivity=True)
    return np.asarray(seg, dtype=np.int64)


@torch.no_grad()
def superpixel_argmax(scores: torch.Tensor, segments: np.ndarray) -> np.ndarray:
    """argmax over C of the score maps [C, h, w], upsampled to the segments' size and averaged per segment
    -> int64 [H, W]: every pixel of a segment takes the segment's best channel."""
    seg = torch.from_numpy(np.ascontiguousarray(segments, dtype=np.int64))
    H, W = seg.shape
    n_seg = int(seg.max()) + 1
    flat = seg.reshape(-1)
    s = scores.float()
    c = s.shape[0]
    best_val = torch.full((n_seg,), -torch.inf)
    best_idx = torch.zeros(n_seg, dtype=torch.int64)
    step = _chunks(c, H, W).step
    for start in range(0, c, step):
        up = _upsample(s[start:start + step], (H, W)).reshape(-1, H * W)
        sums = torch.zeros(up.shape[0], n_seg).index_add_(1, flat, up)  # mean = sum / count: the count is shared
        val, idx = sums.max(0)
        better = val > best_val
        best_val = torch.where(better, val, best_val)
        best_idx = torch.where(better, idx + start, best_idx)
    return best_idx[flat].reshape(H, W).numpy()


def box_mean(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean of x [..., H, W] over the (2r+1) x (2r+1) window around each pixel, clipped at the borders
    (two cumulative sums: O(1) per pixel whatever r)."""
    if r <= 0:
        return x
    out = x
    for dim in (-2, -1):
        n = out.shape[dim]
        c = torch.cumsum(out, dim=dim)
        c = torch.cat([torch.zeros_like(c.narrow(dim, 0, 1)), c], dim=dim)
        idx = torch.arange(n)
        hi, lo = (idx + r + 1).clamp(max=n), (idx - r).clamp(min=0)
        shape = [1] * out.dim()
        shape[dim] = n
        out = (c.index_select(dim, hi) - c.index_select(dim, lo)) * (1.0 / (hi - lo).to(out.dtype)).reshape(shape)
    return out


@torch.no_grad()
def guided_coefficients(guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Window-averaged guided-filter coefficients (He et al. 2013, colour guide, Eq. 19-21).

    guide [3, H, W] (colours in [0, 1]), src [C, H, W] -> (mean_a [C, 3, H, W], mean_b [C, H, W]);
    the filtered map is `(mean_a * guide).sum(1) + mean_b`."""
    g = guide.float()
    p = src.float()
    mean_i = box_mean(g, radius)  # [3, H, W]
    corr = box_mean(g[:, None] * g[None], radius)  # [3, 3, H, W]
    sigma = corr - mean_i[:, None] * mean_i[None] + eps * torch.eye(3, dtype=g.dtype)[:, :, None, None]
    inv = torch.linalg.inv(sigma.permute(2, 3, 0, 1)).permute(2, 3, 0, 1)  # [3, 3, H, W]
    m = box_mean(torch.cat([p[:, None], g[None] * p[:, None]], 1), radius)  # [C, 4, H, W]: mean p, mean I*p (one pass)
    mean_p = m[:, 0]
    cov_ip = m[:, 1:] - mean_i[None] * mean_p[:, None]  # [C, 3, H, W]
    a = (inv[None] * cov_ip[:, None]).sum(2)  # Sigma^-1 cov(I, p) per pixel (an einsum is 10x slower here)
    b = mean_p - (a * mean_i[None]).sum(1)
    ab = box_mean(torch.cat([a, b[:, None]], 1), radius)
    return ab[:, :3], ab[:, 3]


@torch.no_grad()
def guided_filter(guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """The guided filter of src [C, H, W] with the colour image guide [3, H, W] -> [C, H, W]."""
    mean_a, mean_b = guided_coefficients(guide, src, radius, eps)
    return (mean_a * guide.float()[None]).sum(1) + mean_b


def _bilinear_taps(n_out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices (i0, i1) and weight of i1 of a 1-D bilinear resize n_in -> n_out (align_corners=False)."""
    x = ((torch.arange(n_out, dtype=torch.float32) + 0.5) * n_in / n_out - 0.5).clamp(min=0)
    i0 = x.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    return i0, i1, x - i0


@torch.no_grad()
def guided_argmax(scores: torch.Tensor, rgb: np.ndarray, radius: int = 32, eps: float = 0.001,
                  subsample: int = 8, top: int = 2) -> np.ndarray:
    """argmax over C of the guided-filtered, upsampled score maps [C, h, w] -> int64 [H, W] at the image's
    size (rgb uint8 [H, W, 3]).

    The fast guided filter: coefficients on a grid `subsample` times smaller, upsampled bilinearly and
    applied to the full-size image. At full size only the `top` best channels of the pixel's coarse
    cell compete (their coefficients gathered, not every channel upsampled), so the cost does not grow
    with the number of parts."""
    H, W = rgb.shape[:2]
    guide = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    s = max(1, int(subsample))
    hs, ws = max(1, round(H / s)), max(1, round(W / s))
    guide_s = F.interpolate(guide[None], size=(hs, ws), mode="bilinear", align_corners=False, antialias=True)[0] \
        if (hs, ws) != (H, W) else guide
    c = scores.shape[0]
    p = _upsample(scores.float(), (hs, ws))
    mean_a, mean_b = guided_coefficients(guide_s, p, max(1, round(radius / s)), eps)
    coef = torch.cat([mean_a, mean_b[:, None]], 1).reshape(c, 4, hs * ws)  # [C, 4, cells]
    q_coarse = (mean_a * guide_s[None]).sum(1) + mean_b  # [C, hs, ws]
    t = min(max(1, int(top)), c)
    cand = q_coarse.topk(t, dim=0).indices  # [t, hs, ws]
    y0, y1, wy = _bilinear_taps(H, hs)
    x0, x1, wx = _bilinear_taps(W, ws)
    yn = ((torch.arange(H) + 0.5) * hs / H).long().clamp(max=hs - 1)  # the pixel's coarse cell
    xn = ((torch.arange(W) + 0.5) * ws / W).long().clamp(max=ws - 1)
    cells = cand[:, yn[:, None], xn[None, :]]  # [t, H, W] candidate channels per pixel
    wy, wx = wy[:, None], wx[None, :]
    taps = [((y0[:, None] * ws + x0[None, :]), (1 - wy) * (1 - wx)), ((y0[:, None] * ws + x1[None, :]), (1 - wy) * wx),
            ((y1[:, None] * ws + x0[None, :]), wy * (1 - wx)), ((y1[:, None] * ws + x1[None, :]), wy * wx)]
    flat = coef.permute(0, 2, 1).reshape(c * hs * ws, 4)  # row = channel * cells + cell
    base = cells * (hs * ws)
    co = torch.zeros((t, H, W, 4))  # the candidates' bilinearly upsampled (a_r, a_g, a_b, b)
    for idx, w in taps:
        co += w[None, :, :, None] * flat.index_select(0, (base + idx[None]).reshape(-1)).reshape(t, H, W, 4)
    q = (co[..., :3] * guide.permute(1, 2, 0)[None]).sum(-1) + co[..., 3]
    return cells.gather(0, q.argmax(0, keepdim=True))[0].numpy()


@torch.no_grad()
def refined_argmax(scores: torch.Tensor, rgb: np.ndarray, method: str, *, plain: np.ndarray | None = None,
                   slic_segments_n: int = 800, slic_compactness: float = 10.0, guided_radius: int = 32,
                   guided_eps: float = 0.001, guided_subsample: int = 8, guided_top: int = 2) -> np.ndarray:
    """Label map (channel index, int64 [H, W] at the image's size) of score maps [C, h, w] refined to the
    edges of `rgb` (uint8 [H, W, 3]) by `method` (none | slic | guided).

    Only the channels that win somewhere in `plain` (the unrefined argmax at [H, W], computed when not
    given) compete, so the refined map shows no channel the plain one lacks."""
    if method not in REFINE_METHODS:
        raise ValueError(f"refine: '{method}' is not one of {', '.join(REFINE_METHODS)}")
    rgb = np.asarray(rgb)
    H, W = rgb.shape[:2]
    if plain is None:
        from .masks import upsampled_argmax

        plain = upsampled_argmax(scores, (H, W))
    if method == "none":
        return plain
    present = np.unique(plain)
    if len(present) < 2:
        return plain
    sub = scores[torch.from_numpy(present)]
    if method == "slic":
        local = superpixel_argmax(sub, slic_segments(rgb, slic_segments_n, slic_compactness))
    else:
        local = guided_argmax(sub, rgb, guided_radius, guided_eps, guided_subsample, guided_top)
    return present[local]
