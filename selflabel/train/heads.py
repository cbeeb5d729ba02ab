"""Network pieces shared by the SeLa and SwAV trainers (lightly-style: heads apart from loss and queue).

A model is `backbone (optional) -> trunk -> heads`:
  * frozen mode: the input is a cached feature vector and there is no backbone;
  * finetune mode: the input is an image batch and `backbone` gives the feature vector first.
The trunk always L2-normalises its input first, so cached features and the backbone's live output
are treated the same way.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def global_features(backbone: nn.Module, images: Tensor) -> Tensor:
    """The [B, D] image-level feature of a backbone output (a `BackboneOutput` or a plain tensor)."""
    out = backbone(images)
    feat = getattr(out, "global_feat", out)
    if feat.ndim > 2:  # a raw feature map: global average pool
        feat = feat.flatten(2).mean(-1)
    return feat


class InputNorm(nn.Module):
    """Centre by the data set's mean feature, then L2-normalise (cosine geometry).

    Post-ReLU CNN features share a large mean direction; removing it makes cosines discriminative
    (the same preparation as `selflabel.geometry.prepare_features`). `mean` is a buffer, set once from
    the cached features and saved with the model, so the finetune stage prepares features the same way.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x.float() - self.mean, dim=1)


class Trunk(nn.Module):
    """L2-normalise, then (head="mlp") one hidden layer Linear-BN-ReLU; "linear"/"cosine" heads sit on the input."""

    def __init__(self, in_dim: int, hidden_dim: int = 512, kind: str = "mlp") -> None:
        super().__init__()
        if kind not in ("linear", "cosine", "mlp"):
            raise ValueError(f"head kind must be 'linear', 'cosine' or 'mlp', not {kind!r}")
        self.kind = kind
        self.out_dim = hidden_dim if kind == "mlp" else in_dim
        self.mlp = (
            nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True))
            if kind == "mlp"
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(F.normalize(x, dim=1))


class CosineHead(nn.Module):
    """Cosine classifier: logits = cos(z, w_k) / temperature. Its confidence is bounded, so P ** lambda stays
    well conditioned, and it matches the cosine geometry of normalised features (a learnt prototype classifier)."""

    def __init__(self, in_dim: int, k: int, temperature: float = 0.1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, in_dim) / in_dim**0.5)
        self.temperature = temperature
        self.out_features = k

    def forward(self, z: Tensor) -> Tensor:
        return F.normalize(z, dim=1) @ F.normalize(self.weight, dim=1).t() / self.temperature


class MultiHead(nn.Module):
    """One classifier per granularity K (SeLa's multiple heads, Asano et al. 2020, sec. 3.3):
    linear layers, or cosine classifiers with `cosine_temperature` set."""

    def __init__(self, in_dim: int, ks: Sequence[int], cosine_temperature: float | None = None) -> None:
        super().__init__()
        self.ks = [int(k) for k in ks]
        self.heads = nn.ModuleList(
            nn.Linear(in_dim, k) if cosine_temperature is None else CosineHead(in_dim, k, cosine_temperature)
            for k in self.ks
        )

    def forward(self, z: Tensor) -> list[Tensor]:
        return [h(z) for h in self.heads]


class SelaNet(nn.Module):
    """[backbone ->] input norm -> trunk -> one logit tensor per head.

    `classify` takes prepared (normalised, possibly augmented) features; `forward` does the whole chain.
    """

    def __init__(self, in_dim: int, ks: Sequence[int], hidden_dim: int = 512, kind: str = "mlp",
                 backbone: nn.Module | None = None, temperature: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        self.prep = InputNorm(in_dim)
        self.trunk = Trunk(in_dim, hidden_dim, kind)
        self.heads = MultiHead(self.trunk.out_dim, ks, temperature if kind == "cosine" else None)

    def classify(self, x: Tensor) -> list[Tensor]:
        return self.heads(self.trunk(x))

    def forward(self, x: Tensor, *, from_images: bool = False, prepared: bool = False) -> list[Tensor]:
        """`prepared=True`: x is already prepared (`classify`); going through forward lets DDP sync gradients."""
        if prepared:
            return self.classify(x)
        if from_images:
            x = global_features(self.backbone, x)
        return self.classify(self.prep(x))


class ProjectionHead(nn.Module):
    """SwAV's projection: L2-normalise, Linear-BN-ReLU-Linear to proj_dim, L2-normalise again."""

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.mlp(F.normalize(x, dim=1)), dim=1)


class Prototypes(nn.Module):
    """Bias-free linear layers whose rows are the prototypes, one layer per K (SwAV's multi-prototypes).

    `normalize_()` projects each prototype back onto the unit sphere; SwAV calls it before every step so
    the scores z @ c are cosine similarities in [-1, 1].
    """

    def __init__(self, dim: int, ks: Sequence[int]) -> None:
        super().__init__()
        self.ks = [int(k) for k in ks]
        self.layers = nn.ModuleList(nn.Linear(dim, k, bias=False) for k in self.ks)

    @torch.no_grad()
    def normalize_(self) -> None:
        for layer in self.layers:
            layer.weight.copy_(F.normalize(layer.weight, dim=1))

    def forward(self, z: Tensor) -> list[Tensor]:
        return [layer(z) for layer in self.layers]


class SwavNet(nn.Module):
    """[backbone ->] input norm -> projection -> prototype scores per head.

    `project` takes prepared (normalised, possibly augmented) features and gives unit-norm embeddings.
    """

    def __init__(self, in_dim: int, ks: Sequence[int], hidden_dim: int = 512, proj_dim: int = 128,
                 backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.prep = InputNorm(in_dim)
        self.projection = ProjectionHead(in_dim, hidden_dim, proj_dim)
        self.prototypes = Prototypes(proj_dim, ks)

    def project(self, x: Tensor) -> Tensor:
        return self.projection(x)

    def forward(self, x: Tensor | Sequence[Tensor], *, from_images: bool = False,
                prepared: bool = False) -> tuple[Tensor, list[Tensor]]:
        """`prepared=True`: x is already prepared (views); going through forward lets DDP sync gradients.
        `from_images=True`: x is a batch of images or a list of them, one per crop resolution (multi-crop),
        each through the backbone in one pass; the outputs are concatenated in that order."""
        if not prepared:
            if from_images:
                groups = [x] if isinstance(x, Tensor) else list(x)
                x = torch.cat([global_features(self.backbone, g) for g in groups])
            x = self.prep(x)
        z = self.project(x)
        return z, self.prototypes(z)


class _GlobalBatchNorm:
    """Batch norm whose training statistics are those of the GLOBAL batch (all ranks' slices).

    `nn.SyncBatchNorm` refuses CPU modules ("SyncBatchNorm layers only work with GPU modules", torch 2.14),
    so on CPU/gloo the per-rank sums (count, sum, sum of squares per channel) are all-reduced with the
    autograd-aware `torch.distributed.nn.functional.all_reduce`: forward and gradients equal plain batch
    norm on the whole batch in one process (up to summation order). Same parameters, buffers and
    state_dict as the torch class it extends.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not torch.distributed.is_initialized():
            return super().forward(x)
        import warnings

        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        dims = [0, *range(2, x.ndim)]  # every axis but the channels
        n_local = torch.full((1,), float(x.numel() // c), dtype=x.dtype, device=x.device)
        with warnings.catch_warnings():  # "deprecated" in 2.14, but its replacement is private API
            warnings.simplefilter("ignore", FutureWarning)
            stats = all_reduce(torch.cat([n_local, x.sum(dims), (x * x).sum(dims)]))
        n = stats[0]
        mean = stats[1 : 1 + c] / n
        var = (stats[1 + c :] / n - mean * mean).clamp_min(0)  # biased, as batch norm normalises
        with torch.no_grad():
            m = self.momentum if self.momentum is not None else 0.1
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
            self.num_batches_tracked.add_(1)
        shape = (1, c) + (1,) * (x.ndim - 2)
        out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out


class GlobalBatchNorm1d(_GlobalBatchNorm, nn.BatchNorm1d):
    """BatchNorm1d with global-batch statistics under torch.distributed (see `_GlobalBatchNorm`)."""


class GlobalBatchNorm2d(_GlobalBatchNorm, nn.BatchNorm2d):
    """BatchNorm2d with global-batch statistics under torch.distributed: a fine-tuned CNN backbone on CPU."""


def convert_batchnorm(module: nn.Module, distributed: bool, cuda: bool) -> nn.Module:
    """Under DDP, batch statistics over the global batch: nn.SyncBatchNorm on GPUs, GlobalBatchNorm1d/2d on CPU.

    Only plain BatchNorm1d/2d are converted on CPU; a subclass (e.g. timm's BatchNormAct2d) keeps per-rank
    statistics, which trains as well but is not bit-comparable with a single process."""
    if not distributed:
        return module
    if cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        glob = {nn.BatchNorm1d: GlobalBatchNorm1d, nn.BatchNorm2d: GlobalBatchNorm2d}.get(type(child))
        if glob is not None:
            new = glob(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_batchnorm(child, distributed, cuda)
    return module
