"""Dense patch features: backbone forward passes over whole images, optional shift-and-stitch, projection.

- Each image is resized as a whole (no crop): short side `image_size` with its aspect ratio kept,
  both sides rounded to the backbone stride (or a square `image_size` with keep_aspect=False, as
  Leopart does). A larger `image_size` gives more patches per image.
- Shift-and-stitch (Long et al., FCN, CVPR 2015): `factor` f runs the network on f*f copies of the
  input shifted by stride/f pixels and interleaves the outputs, so the map has stride/f at f*f the cost.
- Projection (as Leopart's evaluation): standardise each channel, then PCA to `pca_dim`; fitted on
  the patches of the first images in a seeded random order and applied to every batch as it comes, so
  memory holds `pca_dim` numbers per patch instead of the backbone's C.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF2
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..backbones import normalize_pixels, uint8_pixels
from ..data import ImageRecord, load_rgb
from ..devices import default_cache_root, dtype_precision
from ..engine import make_runner, plan_engine
from ..errors import ImageLoadError
from ..progress import progress_bar

log = logging.getLogger(__name__)

MAX_ASPECT = 4.0  # panoramas: the long side is capped at 4x the short side


def dense_input_size(width: int, height: int, image_size: int, stride: int, keep_aspect: bool = True) -> tuple[int, int]:
    """(H, W) fed to the backbone: short side ~image_size, aspect kept, both multiples of the stride."""
    def snap(v: float) -> int:
        return max(stride, int(round(v / stride)) * stride)

    if not keep_aspect:
        s = snap(image_size)
        return s, s
    short, long_ = min(width, height), max(width, height)
    ratio = min(long_ / max(short, 1), MAX_ASPECT)
    a, b = snap(image_size), snap(image_size * ratio)
    return (a, b) if height <= width else (b, a)


class DenseImages(Dataset):
    """Whole images resized for dense features; yields (uint8 [3, H, W] | None, index, (H, W) original,
    error). Normalisation happens per batch in the main process (`normalize_batch`): a worker shipping
    uint8 sends a quarter of the bytes and skips a float conversion that cost it 8 of its 11 ms per
    960x720 CamVid frame."""

    def __init__(self, records: Sequence[ImageRecord], image_size: int, stride: int, mean, std,
                 keep_aspect: bool = True, max_pixels: int = 100_000_000) -> None:
        self.records = list(records)
        self.image_size, self.stride, self.keep_aspect, self.max_pixels = image_size, stride, keep_aspect, max_pixels
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        try:
            img = load_rgb(rec.path, max_pixels=self.max_pixels, display=rec.id)
        except ImageLoadError as exc:
            return None, i, None, exc.reason
        w, h = img.size
        H, W = dense_input_size(w, h, self.image_size, self.stride, self.keep_aspect)
        return resize_pixels(img, H, W), i, (h, w), None

    def normalize_batch(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> the backbone's normalised float input."""
        return normalize_pixels(x, self.mean, self.std)


def resize_pixels(img: Image.Image, height: int, width: int) -> torch.Tensor:
    """PIL RGB -> uint8 [3, height, width], bilinear and antialiased on the uint8 tensor (torchvision's
    vectorised kernel: 0.4 ms for a CamVid frame where PIL took 1.9)."""
    return TF2.resize(uint8_pixels(img), [height, width], antialias=True).contiguous()


def _collate(batch):
    return batch


@torch.no_grad()
def shift_and_stitch(forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor,
                     stride: int, factor: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense map and saliency at stride/factor: forward passes on inputs shifted by stride/factor pixels
    (edge-replicated at the far border), interleaved. factor=1 is a plain forward pass."""
    if factor <= 1:
        return forward(x)
    step = stride // factor
    if step < 1 or stride % factor:
        raise ValueError(f"shift_and_stitch: factor {factor} must divide the stride {stride}")
    dense = sal = None
    for dy in range(factor):
        for dx in range(factor):
            xs = F.pad(x, (0, dx * step, 0, dy * step), mode="replicate")[..., dy * step:, dx * step:]
            d, s = forward(xs)
            if dense is None:
                B, C, h, w = d.shape
                dense = d.new_zeros((B, C, h * factor, w * factor))
                sal = s.new_zeros((B, h * factor, w * factor))
            dense[:, :, dy::factor, dx::factor] = d
            sal[:, dy::factor, dx::factor] = s
    return dense, sal


@dataclass
class Projector:
    """Per-channel standardisation followed by PCA (rows of `components`), fitted on a patch sample."""

    mean: np.ndarray  # [C]
    scale: np.ndarray  # [C]
    components: np.ndarray | None  # [d, C] or None (standardise only)
    explained: float = 1.0

    @classmethod
    def fit(cls, x: np.ndarray, dim: int) -> "Projector":
        """Moments in float64, the covariance as one float32 GEMM of the standardised sample (the float64
        one was most of the dense stage's time on 64 CamVid frames; float32 changes its eigenvectors by
        far less than the sampling of the patches does)."""
        x = np.asarray(x, dtype=np.float32)
        mean = x.mean(0, dtype=np.float64)
        xs = x - mean.astype(np.float32)  # centred first: the variance is a two-pass one
        scale = np.sqrt(np.square(xs).sum(0, dtype=np.float64) / max(1, len(xs))) + 1e-5
        if dim <= 0 or dim >= x.shape[1]:
            return cls(mean.astype(np.float32), scale.astype(np.float32), None, 1.0)
        xs /= scale.astype(np.float32)
        cov = (xs.T @ xs).astype(np.float64) / max(1, len(xs) - 1)
        c = cov.shape[0]
        # only the top `dim` eigenpairs (LAPACK syevr): the full eigh of 1280 x 1280 was most of a short
        # dense run's time (benchmarks/features.py); the total variance is the trace
        evals, evecs = scipy.linalg.eigh(cov, subset_by_index=[c - dim, c - 1])
        order = np.argsort(evals)[::-1]
        explained = float(evals[order].sum() / max(np.trace(cov), 1e-12))
        return cls(mean.astype(np.float32), scale.astype(np.float32), evecs[:, order].T.astype(np.float32), explained)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = (np.asarray(x, dtype=np.float32) - self.mean) / self.scale
        return y if self.components is None else y @ self.components.T

    def project_map(self, fmap: np.ndarray) -> np.ndarray:
        """[C, h, w] feature map -> [h, w, dim]: the standardisation folded into the projection matrix,
        one GEMM on the map as it comes (no transposed copy of the C-channel map)."""
        c, h, w = fmap.shape
        flat = fmap.reshape(c, h * w)
        if self.components is None:
            return ((flat - self.mean[:, None]) / self.scale[:, None]).T.reshape(h, w, c)
        weights = self.components / self.scale  # [d, C]
        y = weights @ flat - (weights @ self.mean)[:, None]
        return y.T.reshape(h, w, -1)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0] if self.components is None else self.components.shape[0])


@dataclass
class DenseFeatures:
    """Projected patch features per readable image, in the order of `records`."""

    records: list[ImageRecord]
    feats: list[np.ndarray]  # float16 [h, w, d]
    saliency: list[np.ndarray]  # float32 [h, w]
    sizes: list[tuple[int, int]]  # original (H, W)
    skipped: list[tuple[str, str]]  # (id, reason)
    projector: Projector
    info: dict[str, Any] = field(default_factory=dict)

    def sample(self, max_patches: int, seed: int = 0) -> np.ndarray:
        """Up to `max_patches` patch vectors drawn uniformly at random (float32 [n, d])."""
        flat = [f.reshape(-1, f.shape[-1]) for f in self.feats]
        counts = np.array([len(f) for f in flat])
        total = int(counts.sum())
        if total <= max_patches:
            return np.concatenate(flat).astype(np.float32)
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(total, size=max_patches, replace=False))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        which = np.searchsorted(starts, pick, side="right") - 1
        return np.stack([flat[i][p - starts[i]] for i, p in zip(which, pick)]).astype(np.float32)


def extract_dense(records: Sequence[ImageRecord], backbone: torch.nn.Module, *, image_size: int, device: torch.device,
                  keep_aspect: bool = True, shift: int = 1, pca_dim: int = 50, batch_size: int = 8,
                  num_workers: int = -1, dtype: torch.dtype | None = None, seed: int = 0, fit_images: int = 64,
                  max_pixels: int = 100_000_000, show_progress: bool = True, engine: str | None = None,
                  cache_root: str | os.PathLike | None = None) -> DenseFeatures:
    """Dense features of every readable image; unreadable ones are listed in `.skipped`.

    `dtype` is the autocast dtype (None: fp32). `engine` (None: $SELFLABEL_ENGINE, else 'auto') runs the
    backbone in OpenVINO / ONNX Runtime on a CPU (one export per input size, cached under `cache_root`),
    torch otherwise or on any engine failure. Images are processed in a seeded random order so the
    projection is fitted on a random subset (`fit_images` images); results come back in record order.
    """
    stride = int(getattr(backbone, "stride", 32))  # inputs snap to it; the map's own stride may be finer
    map_stride = stride // 2 if getattr(backbone, "fuse_stride16", False) else stride
    ds = DenseImages(records, image_size, stride, getattr(backbone, "mean", (0.485, 0.456, 0.406)),
                     getattr(backbone, "std", (0.229, 0.224, 0.225)), keep_aspect, max_pixels)
    order = np.random.default_rng(seed).permutation(len(ds)).tolist()
    workers = min(2, os.cpu_count() or 1) if num_workers < 0 else num_workers
    loader = DataLoader(ds, batch_size=batch_size, sampler=order, num_workers=workers, collate_fn=_collate)
    spec = plan_engine(engine, device, dtype_precision(dtype))
    runner = make_runner(backbone, device, spec, cache_root or default_cache_root())

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = runner(x)
        return out.dense, out.saliency

    def forward_pixels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 batch in (the engine normalises it); shift-and-stitch pads float inputs instead."""
        if shift > 1:
            return shift_and_stitch(forward, ds.normalize_batch(x).to(device), map_stride, shift)
        out = runner.pixels(x.to(device))
        return out.dense, out.saliency

    raw: dict[int, tuple[np.ndarray, np.ndarray, tuple[int, int]]] = {}
    done: dict[int, tuple[np.ndarray, np.ndarray, tuple[int, int]]] = {}
    skipped: dict[int, str] = {}
    projector: Projector | None = None
    in_hw: set[tuple[int, int]] = set()
    n_fit = min(fit_images, len(ds))

    def project(item):
        f, s, hw = item  # f: [C, h, w]
        return projector.project_map(f).astype(np.float16), s, hw

    with progress_bar("dense features", total=len(ds), enabled=show_progress) as advance:
        for batch in loader:
            good = [b for b in batch if b[3] is None]
            for _, i, _, reason in batch:
                if reason is not None:
                    skipped[i] = reason
                    log.warning("dense: skipped %s: %s", ds.records[i].id, reason)
            groups: dict[tuple[int, int], list] = {}
            for b in good:  # images of different sizes are forwarded in separate groups
                groups.setdefault(tuple(b[0].shape[1:]), []).append(b)
            for hw, items in groups.items():
                in_hw.add(hw)
                dense, sal = forward_pixels(torch.stack([b[0] for b in items]))
                dense = dense.float().cpu().numpy()  # [B, C, h, w]: projected per image as it is
                sal = sal.cpu().numpy()
                for j, b in enumerate(items):
                    item = (dense[j], sal[j].astype(np.float32), b[2])
                    if projector is None:
                        raw[b[1]] = item
                    else:
                        done[b[1]] = project(item)
            if projector is None and (len(raw) >= n_fit or len(raw) + len(skipped) >= len(ds)) and raw:
                sample = np.concatenate([f.reshape(f.shape[0], -1).T for f, _, _ in raw.values()])
                projector = Projector.fit(sample, pca_dim)
                log.info("dense: projection fitted on %d patches of %d images (%d -> %d dims, %.0f%% variance)",
                         len(sample), len(raw), sample.shape[1], projector.dim, 100 * projector.explained)
                for i, item in raw.items():
                    done[i] = project(item)
                raw.clear()
            advance(len(batch))
    if projector is None:
        projector = Projector(np.zeros(1, np.float32), np.ones(1, np.float32), None)
    keep = sorted(done)
    return DenseFeatures(
        records=[ds.records[i] for i in keep],
        feats=[done[i][0] for i in keep],
        saliency=[done[i][1] for i in keep],
        sizes=[done[i][2] for i in keep],
        skipped=[(ds.records[i].id, skipped[i]) for i in sorted(skipped)],
        projector=projector,
        info={"stride": map_stride / max(1, shift), "backbone_stride": stride, "shift": shift,
              "fusion": "stride16" if map_stride != stride else "none",
              "input_sizes": sorted(in_hw), "pca_dim": projector.dim, "pca_explained": projector.explained,
              "computed_on": {"device": str(device), "engine": runner.active.engine, "precision": runner.active.precision}},
    )
