"""Augmentations for the trainers, every random draw taken from an explicit `torch.Generator`.

Feature views (frozen mode) perturb an L2-normalised feature vector: Gaussian noise of norm about
`noise` plus coordinate dropout with rate `dropout` (a "small crop" of the feature is a higher dropout
rate: it sees a random subset of the channels). Image views (finetune mode) are SwAV's multi-crop:
random resized crops at two scales, horizontal flip and colour jitter.

Seeding every batch (or image) from (seed, epoch, index) makes a run independent of the number of
data-loader workers and lets a resumed run draw exactly what an uninterrupted one draws.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def make_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (seed, epoch, step, ...)."""
    g = torch.Generator()
    h = 0
    for k in keys:  # a simple, stable mix (Python's hash() of tuples is stable for ints, but be explicit)
        h = (h * 1_000_003 + int(k) + 0x9E3779B9) % (2**63 - 1)
    g.manual_seed(h)
    return g


def feature_view(x: Tensor, gen: torch.Generator, noise: float = 0.05, dropout: float = 0.0) -> Tensor:
    """One augmented view of a batch of unit-norm features [B, D]: drop channels, add noise.

    Noise is N(0, noise^2 / D) per channel, so its norm is about `noise` against the unit-norm features;
    dropped channels are zeroed and the kept ones scaled by 1 / (1 - dropout). In place on fresh buffers.
    """
    b, d = x.shape
    out = torch.randn(b, d, generator=gen).mul_(noise / math.sqrt(d)) if noise > 0 else torch.zeros(b, d)
    out = out.to(x.device)
    if dropout > 0:
        keep = torch.empty(b, d).bernoulli_(1.0 - dropout, generator=gen).div_(1.0 - dropout)
        return out.addcmul_(x, keep.to(x.device))
    return out.add_(x)


def pick_cached_views(views: Tensor, idx: Tensor, gen: torch.Generator) -> Tensor:
    """Per sample, one of the V cached views [V, N, D] of augmented images (features of real crops)."""
    v = torch.randint(views.shape[0], (len(idx),), generator=gen)
    return views[v, idx]


def norm_stats(backbone) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std of the backbone's own Normalize transform if it has one, else ImageNet's."""
    tf = getattr(backbone, "transform", None)
    for t in getattr(tf, "transforms", [tf]):
        if t is not None and hasattr(t, "mean") and hasattr(t, "std"):
            return tuple(float(m) for m in t.mean), tuple(float(s) for s in t.std)
    return IMAGENET_MEAN, IMAGENET_STD


@dataclass
class ImageViews:
    """SwAV multi-crop (Caron et al. 2020, sec. 3.2): `n_large` crops at `size`, `n_small` at `small_size`.

    `n_large=1, n_small=0` is SeLa's single augmented view. `views(img, gen)` returns a list of [3, s, s] tensors.
    """

    size: int = 224
    small_size: int = 96
    n_large: int = 2
    n_small: int = 0
    large_scale: tuple[float, float] = (0.14, 1.0)
    small_scale: tuple[float, float] = (0.05, 0.14)
    jitter: float = 0.4
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    plain_transform: Callable[[Image.Image], Tensor] | None = None  # the backbone's own eval transform

    def _crop(self, img: Image.Image, out: int, scale: tuple[float, float], gen: torch.Generator) -> Tensor:
        import torchvision.transforms.functional as TF  # lazy: frozen mode never pays for torchvision

        w, h = img.size
        area = w * h
        for _ in range(10):  # torchvision's RandomResizedCrop sampling, with our generator
            target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=gen).item())
            log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(1, generator=gen).item()
            aspect = math.exp(log_r)
            cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
                break
        else:  # fall back to the central square
            cw = ch = min(w, h)
            top, left = (h - ch) // 2, (w - cw) // 2
        crop = TF.resized_crop(img, top, left, ch, cw, [out, out], antialias=True)
        if torch.rand(1, generator=gen).item() < 0.5:
            crop = TF.hflip(crop)
        if self.jitter > 0:
            j = lambda: 1.0 + self.jitter * (2 * torch.rand(1, generator=gen).item() - 1)  # noqa: E731
            crop = TF.adjust_brightness(crop, j())
            crop = TF.adjust_contrast(crop, j())
            crop = TF.adjust_saturation(crop, j())
        return TF.normalize(TF.to_tensor(crop), self.mean, self.std)

    def views(self, img: Image.Image, gen: torch.Generator) -> list[Tensor]:
        large = [self._crop(img, self.size, self.large_scale, gen) for _ in range(self.n_large)]
        small = [self._crop(img, self.small_size, self.small_scale, gen) for _ in range(self.n_small)]
        return large + small

    def plain(self, img: Image.Image) -> Tensor:
        """The evaluation view: the backbone's transform (as for the cached features), else resize + centre crop."""
        import torchvision.transforms.functional as TF

        if self.plain_transform is not None:
            return self.plain_transform(img)
        img = TF.center_crop(TF.resize(img, self.size, antialias=True), [self.size, self.size])
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)
