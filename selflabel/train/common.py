"""Plumbing shared by the SeLa and SwAV trainers: inputs, batches, schedules, outputs.

Nothing here knows about a particular algorithm; the loops in `sela.py` and `swav.py` read top to bottom.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..cluster import LabelResult
from ..distributed import barrier, mean_over_ranks
from ..errors import InputError, SelflabelError
from ..progress import progress_bar
from .augment import ImageViews, make_generator, norm_stats
from .checkpoint import save_checkpoint

log = logging.getLogger(__name__)


class TrainingInterrupted(SelflabelError):
    """Raised by the `stop_after_epoch` testing hook: the run stops as if killed after that epoch."""


@contextlib.contextmanager
def cpu_threads(n: int, device: str | torch.device, finetune: bool):
    """Run a frozen-mode CPU training with `n` torch threads (0: leave torch's setting), then restore it.

    The frozen-mode steps are small (a 256 x D batch through one layer): threads gain little on an idle
    machine and lose a lot on a shared one (10,000 x 1280 features, K=10 on 2 busy cores: 15 s with 1
    thread, 158 s with 2). Finetune mode (convolutions) keeps torch's own setting.
    """
    if n <= 0 or finetune or torch.device(device).type != "cpu":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def head_ks(k: int, heads: Sequence[int]) -> list[int]:
    """The chosen K first, then the other heads' Ks (unique, in the given order)."""
    ks = [int(k)]
    for h in heads:
        if int(h) not in ks:
            ks.append(int(h))
    if any(x < 2 for x in ks):
        raise InputError(f"every head needs at least 2 clusters, got {ks}")
    return ks


def check_features(features: np.ndarray, ks: Sequence[int]) -> tuple[int, int]:
    if features.ndim != 2:
        raise InputError(f"features must be [N, D], got shape {tuple(features.shape)}")
    n, d = features.shape
    if n < max(ks):
        raise InputError(f"{n} images cannot fill {max(ks)} clusters; lower k or the heads")
    return n, d


def data_digest(features: np.ndarray) -> str:
    """A cheap digest of the features (64 spread rows): a resume must see the same data."""
    n = features.shape[0]
    rows = np.asarray(features[np.linspace(0, n - 1, min(n, 64)).astype(np.int64)], dtype=np.float32)
    return f"{n}x{features.shape[1]}:{float(rows.sum()):.6e}:{float(np.abs(rows).sum()):.6e}"


def check_distributed(ctx, batch_size: int) -> None:
    """DDP keeps single-process semantics only when every rank gets an equal slice of each global batch."""
    if not ctx.enabled:
        return
    if batch_size % ctx.world_size:
        raise InputError(f"the batch size ({batch_size}) must be divisible by the number of processes "
                         f"({ctx.world_size}) so every rank trains on an equal slice; change the batch size or --nproc_per_node")


def wrap_ddp(model: torch.nn.Module, ctx, device: str | torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model` under torchrun (gradients averaged over ranks); the model itself otherwise."""
    if not ctx.enabled:
        return model
    dev = torch.device(device)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def wrap_stage(model: torch.nn.Module, ctx, device: str | torch.device, train_backbone: bool) -> torch.nn.Module:
    """The (DDP-wrapped) model for one training stage. The backbone's parameters take gradients only in
    the end-to-end stage; DDP expects a gradient for every parameter it was built with, so each stage
    gets its own wrapper (building one broadcasts rank 0's state, which all ranks already share)."""
    if getattr(model, "backbone", None) is not None:
        model.backbone.requires_grad_(train_backbone)
    return wrap_ddp(model, ctx, device)


def rank_order(perm: Tensor, steps: int, batch_size: int, lo: int, hi: int) -> list[int]:
    """This rank's samples [lo, hi) of each global batch of `perm`, batch after batch (for a DataLoader
    whose batch size is hi - lo): every rank an equal slice, so DDP's averaged gradient is the global one."""
    return torch.cat([perm[s * batch_size + lo:s * batch_size + hi] for s in range(steps)]).tolist()


def epoch_batches(n: int, seed: int, epoch: int, steps: int, batch_size: int, lo: int, hi: int,
                  images: tuple | None = None):
    """The epoch's batches in the order of a permutation drawn from (seed, epoch), as (indices, images):
    over cached features the global batch's indices and None; with `images` = (records, views, workers)
    this rank's slice [lo, hi) of every global batch (see `rank_order`) and its loaded views."""
    perm = torch.randperm(n, generator=make_generator(seed, epoch, 1))
    if images is None:
        return ((perm[s * batch_size:(s + 1) * batch_size], None) for s in range(steps))
    records, views, workers = images
    order = rank_order(perm, steps, batch_size, lo, hi)
    loader = image_loader(records, views, seed, epoch, order, hi - lo, workers, drop_last=True)
    return ((torch.as_tensor(order[s * (hi - lo):(s + 1) * (hi - lo)]), x) for s, x in enumerate(loader))


def set_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int) -> None:
    """The cosine schedule at `step`, each parameter group from its own `base_lr`."""
    for group in optimizer.param_groups:
        group["lr"] = cosine_lr(group["base_lr"], step, total_steps)


def seeded_init(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module with parameters drawn from `seed`, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def update_epochs(total_epochs: int, n_updates: int) -> list[int]:
    """Epochs (0-based) before which the labels are re-optimised: `n_updates` spread evenly, the first at 0."""
    n_updates = max(1, min(n_updates, total_epochs)) if total_epochs > 0 else 0
    return sorted({int(math.floor(i * total_epochs / n_updates)) for i in range(n_updates)})


def cosine_lr(base_lr: float, step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.01) -> float:
    """Linear warm-up then cosine decay to `min_ratio * base_lr` (nanoGPT's get_lr)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


class FeatureSource:
    """Rows of an [N, D] array (possibly a np.memmap) as float32 tensors on `device`.

    Arrays up to `max_ram_bytes` are copied into memory once; larger ones are read batch by batch.
    """

    def __init__(self, features: np.ndarray, device: str | torch.device, max_ram_bytes: int = 4 << 30) -> None:
        self.n, self.d = features.shape
        self.device = torch.device(device)
        self.array = features
        self.tensor: Tensor | None = None
        if self.n * self.d * 4 <= max_ram_bytes:
            self.tensor = torch.from_numpy(np.array(features, dtype=np.float32)).to(self.device)  # a copy: memmaps are read-only

    def rows(self, idx: Tensor) -> Tensor:
        if self.tensor is not None:
            return self.tensor[idx.to(self.device)]
        idx_np = idx.cpu().numpy()
        order = np.argsort(idx_np, kind="stable")  # sorted reads are sequential on disk
        out = np.empty((len(idx_np), self.d), dtype=np.float32)
        out[order] = self.array[idx_np[order]]
        return torch.from_numpy(out).to(self.device)

    def mean(self, batch_size: int = 65536) -> Tensor:
        """The mean feature [D] (float64 accumulation), for `InputNorm`."""
        total = torch.zeros(self.d, dtype=torch.float64)
        for x in self.batches(batch_size):
            total += x.double().sum(0).cpu()
        return (total / max(1, self.n)).float()

    def batches(self, batch_size: int, lo: int = 0, hi: int | None = None):
        """Sequential batches of rows [lo, hi) (default all; for evaluation passes)."""
        hi = self.n if hi is None else hi
        for s in range(lo, hi, batch_size):
            yield self.rows(torch.arange(s, min(s + batch_size, hi)))


def load_image(record: Any) -> Image.Image:
    """An RGB image from a PIL image, a path, or an `ImageRecord` (anything with `.path`)."""
    if isinstance(record, Image.Image):
        return record.convert("RGB")
    path = getattr(record, "path", record)
    from ..data import load_rgb  # the project's safe decoder (EXIF transpose, RGB, first frame)

    return load_rgb(path)


class ImageViewsDataset(Dataset):
    """Augmented views of image i, drawn from a generator seeded with (seed, epoch, i); or the plain view."""

    def __init__(self, records: Sequence[Any], views: ImageViews, seed: int, epoch: int, plain: bool = False) -> None:
        self.records, self.views, self.seed, self.epoch, self.plain = records, views, seed, epoch, plain

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        img = load_image(self.records[i])
        if self.plain:
            return self.views.plain(img)
        return self.views.views(img, make_generator(self.seed, self.epoch, i, 7))


def num_workers(requested: int) -> int:
    """`backbone.num_workers` for the trainers' image loaders (-1: the CPU rule of feature extraction)."""
    from ..features import default_num_workers

    return default_num_workers(torch.device("cpu")) if requested < 0 else requested


def image_loader(records, views: ImageViews, seed: int, epoch: int, order: Sequence[int], batch_size: int,
                 workers: int, plain: bool = False, drop_last: bool = False) -> DataLoader:
    """Batches of images in the given order; each item's randomness depends only on (seed, epoch, index)."""
    ds = ImageViewsDataset(records, views, seed, epoch, plain)
    return DataLoader(ds, batch_size=batch_size, sampler=list(order), num_workers=workers, drop_last=drop_last)


def image_views_for(backbone, image_size: int | None, n_large: int, n_small: int) -> ImageViews:
    size = int(image_size or getattr(backbone, "image_size", None) or 224)
    mean, std = norm_stats(backbone)
    plain = backbone.make_transform(size) if hasattr(backbone, "make_transform") else getattr(backbone, "transform", None)
    return ImageViews(size=size, small_size=max(8, int(round(size * 96 / 224))), n_large=n_large, n_small=n_small,
                      mean=mean, std=std, plain_transform=plain)


def check_finetune(finetune: bool, features: np.ndarray, records, backbone) -> bool:
    """Whether this run fine-tunes end to end; asking for it without a backbone and images is an input error."""
    if not finetune:
        return False
    if backbone is None or records is None:
        raise InputError("finetune mode needs the backbone and the image records (cluster.finetune=true)")
    if len(records) != features.shape[0]:
        raise InputError(f"{len(records)} image records but {features.shape[0]} feature rows")
    return True


def cluster_prototypes(features: FeatureSource, labels: np.ndarray, k: int, batch_size: int = 4096) -> np.ndarray:
    """Per cluster, the L2-normalised mean of the L2-normalised features ([K, D]; zeros for an empty cluster)."""
    sums = torch.zeros(k, features.d, dtype=torch.float64)
    lab = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    for s, x in zip(range(0, features.n, batch_size), features.batches(batch_size)):
        sums.index_add_(0, lab[s : s + len(x)], F.normalize(x.double().cpu(), dim=1))
    return F.normalize(sums, dim=1).float().numpy()


def sgd_optimizer(head_params: Sequence[torch.nn.Parameter], backbone: torch.nn.Module | None, lr: float,
                  backbone_lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 (as both papers); with a `backbone` (finetune stage) it gets its own, smaller lr.
    Each group keeps its `base_lr` for the cosine schedule."""
    groups = [{"params": list(head_params), "lr": lr, "base_lr": lr}]
    if backbone is not None:
        groups.append({"params": list(backbone.parameters()), "lr": backbone_lr, "base_lr": backbone_lr})
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)


class _EpochBar:
    """The per-epoch bar of one trainer call, opened by its first `end_epoch` (which knows the total)."""

    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()
        self.advance: Callable[..., None] | None = None


_epoch_bar: contextvars.ContextVar[_EpochBar | None] = contextvars.ContextVar("epoch_bar", default=None)


@contextlib.contextmanager
def epoch_progress() -> Iterator[None]:
    """Scope of a trainer's progress bar: one step per epoch with its loss and label changes, drawn by
    `end_epoch` on rank 0 (silenced by `selflabel.progress.progress_enabled(False)`, i.e. `-q`)."""
    bar = _EpochBar()
    token = _epoch_bar.set(bar)
    try:
        with bar.stack:
            yield
    finally:
        _epoch_bar.reset(token)


def _epoch_info(epoch: int, history: dict[str, list]) -> str:
    """'loss 1.234' plus, after a label update this epoch, the share of labels it changed (first head)."""
    info = f"loss {history['loss'][-1]:.4f}"
    updates = history.get("label_updates") or []
    if updates and updates[-1].get("epoch") == epoch and updates[-1].get("changed"):
        info += f"  labels changed {100 * updates[-1]['changed'][0]:.1f}%"
    return info


def _advance_epoch_bar(method: str, epoch: int, total_epochs: int, history: dict[str, list]) -> None:
    bar = _epoch_bar.get()
    if bar is None:
        return
    if bar.advance is None:  # first epoch of this call: a resumed run starts at its checkpoint
        bar.advance = bar.stack.enter_context(progress_bar(method, total=total_epochs))
        bar.advance(epoch)
    bar.advance(1, description=method, info=_epoch_info(epoch, history))


def end_epoch(method: str, epoch: int, total_epochs: int, losses: Sequence[float], t0: float, history: dict[str, list],
              ctx, ckpt_file: Path | None, state: Callable[[], dict | None], stop_after_epoch: int | None) -> None:
    """After an epoch: record its loss (mean over ranks) and time, log them, checkpoint, honour the test hook.

    `state()` builds the checkpoint dict; every rank calls it (it may hold a collective, e.g. gathering
    the SwAV queue) and only rank 0 writes, then all ranks wait, so they resume from the same file.
    """
    history["loss"].append(mean_over_ranks(float(np.mean(losses)), ctx) if len(losses) else float("nan"))
    history["epoch_time_s"].append(time.perf_counter() - t0)
    log.info("%s epoch %d/%d: loss %.4f (%.1fs)", method, epoch + 1, total_epochs, history["loss"][-1],
             history["epoch_time_s"][-1])
    if ctx.is_main:
        _advance_epoch_bar(method, epoch, total_epochs, history)
    if ckpt_file is not None:
        st = state()
        if ctx.is_main:
            save_checkpoint(ckpt_file, st)
        barrier(ctx)
    if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
        raise TrainingInterrupted(f"stopped after epoch {epoch + 1} (testing hook)")


def label_result(final: dict[int, np.ndarray], k: int, probs: np.ndarray, src: FeatureSource,
                 info: dict[str, Any]) -> LabelResult:
    """A trainer's output: the chosen head's labels and confidences, the other heads, cluster prototypes."""
    chosen = final[k]
    return LabelResult(labels=chosen, confidence=probs[np.arange(len(chosen)), chosen].astype(np.float32),
                       prototypes=cluster_prototypes(src, chosen, k),
                       head_labels={kk: v for kk, v in final.items() if kk != k}, probs=probs, info=info)

