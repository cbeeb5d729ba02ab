"""SwAV: swapping assignments between views (Caron et al., NeurIPS 2020), after facebookresearch/swav main_swav.py.

Per batch: embed every view, score it against unit-norm prototypes, compute soft codes for the "large"
views with a few Sinkhorn iterations (eps 0.05, 3 iterations: balanced within the batch, plus the queue),
and predict each view's code from every other view (swapped prediction). Multi-crop: 2 large + several
small views. A feature queue of past embeddings enlarges small batches from `queue_start_epoch` on, and
the prototypes receive no gradient during the first `freeze_prototypes_iters` iterations.

Frozen mode: views are noisy / channel-dropped copies of cached features ("small" views drop more
channels and get more noise). Finetune mode: after the frozen epochs, `swav.finetune_epochs` epochs of
real image multi-crop through the backbone.

Final labels (documented choice): `final_assign="argmax"` (default) gives each image its nearest
prototype (argmax of the codes' scores), so cluster sizes follow the data; `"sinkhorn"` gives the
assignment of all images with a full Sinkhorn run to tolerance, its column marginal the cluster sizes
estimated from the scores (`cluster.marginal=estimated`, the EM fixed point of
`selflabel.marginals`), equal sizes (`uniform`) or the main head's `cluster.prior`. The codes of the
swapped prediction stay equipartitioned per batch (SwAV's guard against collapse: sizes estimated on
a batch of 256 and a queue would be noise, and the equal split is what keeps prototypes apart).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..kmeans import prior_marginal
from ..marginals import fixed_point_marginal
from ..result import LabelResult
from ..config import RunConfig, SwavConfig
from ..ot import sinkhorn, sinkhorn_codes
from .augment import feature_view, make_generator
from .checkpoint import checkpoint_path, fingerprint, load_checkpoint
from .common import (FeatureSource, epoch_progress, check_distributed, check_features, check_finetune, cpu_threads,
                     data_digest, end_epoch, epoch_batches, head_ks, image_loader, image_views_for, label_result, num_workers,
                     seeded_init, set_lr, sgd_optimizer, wrap_stage)
from ..distributed import DistContext, all_gather_blocks, all_gather_objects, context
from .heads import SwavNet, convert_batchnorm, global_features
from .losses import swav_loss
from .queue import FeatureQueue

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- model, optimiser, queue
def build_model(in_dim: int, ks: Sequence[int], sw: SwavConfig, seed: int, backbone=None) -> SwavNet:
    """Projection head + one prototype layer per K, initialised from `seed` (DDP wraps the result)."""
    return seeded_init(seed, lambda: SwavNet(in_dim, ks, sw.hidden_dim, sw.proj_dim, backbone))


def build_optimizer(model: SwavNet, sw: SwavConfig, finetune: bool) -> torch.optim.Optimizer:
    """SGD on the projection and prototypes; in the finetune stage the backbone too, with its own, smaller lr."""
    return sgd_optimizer([*model.projection.parameters(), *model.prototypes.parameters()],
                         model.backbone if finetune else None, sw.lr, sw.finetune_lr, sw.weight_decay)


def queue_length(sw: SwavConfig, ks: Sequence[int], batch_size: int, n: int) -> int:
    """The queue length: as configured, or (0 = automatic) enough past embeddings that batch + queue hold
    at least 8 samples per prototype when the batch alone holds fewer than 4; a multiple of the batch size."""
    length = sw.queue_length
    if length == 0:
        if batch_size >= 4 * max(ks):
            return 0
        length = 8 * max(ks) - batch_size
        length = -(-length // batch_size) * batch_size  # rounded up to whole batches
    length = min(length, max(0, n - batch_size))
    return (length // batch_size) * batch_size  # as main_swav.py: a whole number of batches


def queue_state_global(queue: FeatureQueue, ctx: DistContext, batch_size: int) -> dict:
    """The queue as one process would hold it. Under DDP each rank queues its own slices (as main_swav.py),
    so rank r holds columns [r*b, (r+1)*b) of every queued global batch; interleaving them back gives a
    checkpoint that any number of processes can resume from."""
    state = queue.state_dict()
    if not ctx.enabled:
        return state
    parts = all_gather_objects(state["z"], ctx)
    v, length, p = parts[0].shape
    blocks = [z.view(v, length * ctx.world_size // batch_size, -1, p) for z in parts]
    return {"z": torch.cat(blocks, dim=2).reshape(v, -1, p), "filled": state["filled"] * ctx.world_size}


def queue_state_local(state: dict, ctx: DistContext, batch_size: int) -> dict:
    """This rank's part (its slice of every queued global batch) of a `queue_state_global` state."""
    if not ctx.enabled:
        return state
    z = state["z"]
    v, length, p = z.shape
    lo, hi = ctx.block(batch_size)
    return {"z": z.view(v, length // batch_size, batch_size, p)[:, :, lo:hi].reshape(v, -1, p),
            "filled": int(state["filled"]) // ctx.world_size}


# ----------------------------------------------------------------------------- one SwAV step
def swav_step(model: SwavNet, views: list[Tensor], queue: FeatureQueue | None, sw: SwavConfig, n_assign: int,
              distributed: bool, from_images: bool = False) -> Tensor:
    """Loss of one batch given its prepared views (each [B, D] features), or with `from_images` its image
    crops (one tensor per resolution, the views of that resolution stacked: [V_r * B, 3, H_r, W_r]).

    `model` may be the DDP wrapper: the forward pass (backbone included) goes through it so gradients are
    averaged over ranks; with `distributed` each rank holds its slice of the batch and the Sinkhorn
    marginals are all-reduced.
    """
    net = getattr(model, "module", model)
    if from_images:
        bs = views[0].shape[0] // n_assign  # the first group holds the n_assign large views
        z, all_scores = model(views, from_images=True)  # z [V*B, P], unit norm
    else:
        bs = views[0].shape[0]
        z, all_scores = model(torch.cat(views), prepared=True)
    loss = 0.0
    for layer, layer_scores in zip(net.prototypes.layers, all_scores):  # one swapped-prediction problem per head
        scores = layer_scores.split(bs)
        codes = {}
        with torch.no_grad():
            for i in range(n_assign):
                out = scores[i].detach()
                if queue is not None:
                    out = queue.extend_scores(i, out, layer.weight)
                codes[i] = sinkhorn_codes(out, eps=sw.eps, n_iters=sw.sinkhorn_iters, distributed=distributed)[-bs:]
        loss = loss + swav_loss(scores, codes, sw.temperature)
    if queue is not None:
        for i in range(n_assign):
            queue.push(i, z[i * bs:(i + 1) * bs], last_view=i == n_assign - 1)
    return loss / len(net.prototypes.layers)


@torch.no_grad()
def embed_all(model: SwavNet, src: FeatureSource, batch_size: int, *, records=None, views=None, workers: int = 0) -> Tensor:
    """Unit-norm embeddings [N, P] of every image (eval mode, no augmentation), on the CPU."""
    model.eval()
    out = []
    if records is None:
        for x in src.batches(batch_size):
            out.append(model.project(model.prep(x)).cpu())
    else:
        for x in image_loader(records, views, 0, 0, range(len(records)), batch_size, workers, plain=True):
            out.append(model.project(model.prep(global_features(model.backbone, x.to(src.device)))).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------- the trainer
def train_swav(features: np.ndarray, k: int, cfg: RunConfig, *, heads: Sequence[int] = (), out_dir: Path | None = None,
               device: str = "cpu", records=None, backbone=None, stop_after_epoch: int | None = None) -> LabelResult:
    """Cluster `features` [N, D] (may be a np.memmap) into `k` groups, plus one head per extra K, with SwAV.

    Same contract as `train_sela`: checkpoints in out_dir/checkpoints/swav.pt after every epoch, resume
    to the same result, `stop_after_epoch` testing hook.
    """
    with cpu_threads(cfg.swav.cpu_threads, device, cfg.cluster.finetune), epoch_progress():
        return _train_swav(features, k, cfg, heads=heads, out_dir=out_dir, device=device, records=records,
                           backbone=backbone, stop_after_epoch=stop_after_epoch)


def _train_swav(features: np.ndarray, k: int, cfg: RunConfig, *, heads: Sequence[int] = (), out_dir: Path | None = None,
               device: str = "cpu", records=None, backbone=None, stop_after_epoch: int | None = None) -> LabelResult:
    t_start = time.perf_counter()
    sw, seed = cfg.swav, int(cfg.seed)
    ks = head_ks(k, heads)
    n, d = check_features(features, ks)
    finetune = check_finetune(cfg.cluster.finetune, features, records, backbone)
    src = FeatureSource(features, device)
    ctx = context()  # under torchrun: DDP training, distributed Sinkhorn codes, rank 0 writes
    distributed = ctx.enabled
    workers = num_workers(cfg.backbone.num_workers)
    prior = prior_marginal(cfg.cluster.prior, k) if sw.final_assign == "sinkhorn" else None  # checked before training
    n_large, n_small = int(sw.nmb_crops[0]), int(sw.nmb_crops[1]) if len(sw.nmb_crops) > 1 else 0
    if n_large < 2:
        raise ValueError("SwAV needs at least 2 large views (swav.nmb_crops[0] >= 2)")
    image_views = image_views_for(backbone, cfg.backbone.image_size, n_large, n_small) if finetune else None

    batch_size = min(sw.batch_size, n)
    steps_per_epoch = max(1, n // batch_size)
    total_epochs = sw.epochs + (sw.finetune_epochs if finetune else 0)
    check_distributed(ctx, batch_size)
    lo, hi = ctx.block(batch_size)  # this rank's slice of every global batch (equal slices)
    q_len = queue_length(sw, ks, batch_size, n)  # global; each rank queues its own slices (q_len / world rows)
    # main_swav.py freezes the prototypes for ~300 of many thousand iterations; on a short schedule
    # (small data) a fixed count could cover the whole run, so it is capped at a tenth of the iterations
    freeze_iters = min(sw.freeze_prototypes_iters, (total_epochs * steps_per_epoch) // 10)

    model = convert_batchnorm(build_model(d, ks, sw, seed, backbone if finetune else None), distributed,
                              torch.device(device).type == "cuda").to(device)
    model.prep.mean.copy_(src.mean())
    stage_finetune = False
    optimizer = build_optimizer(model, sw, finetune=False)
    queue: FeatureQueue | None = None
    history: dict[str, list] = {"loss": [], "epoch_time_s": []}

    # ---- resume
    fp = fingerprint(method="swav", data=data_digest(features), ks=ks, seed=seed, swav=dataclasses.asdict(sw),
                     finetune=finetune, batch_size=batch_size)
    ckpt_file = checkpoint_path(out_dir, "swav") if out_dir is not None else None
    start_epoch = 0
    state = load_checkpoint(ckpt_file, fp) if ckpt_file is not None else None
    if state is not None:
        start_epoch = int(state["epoch"])
        model.load_state_dict(state["model"])
        stage_finetune = bool(state["stage_finetune"])
        optimizer = build_optimizer(model, sw, finetune=stage_finetune)
        optimizer.load_state_dict(state["optimizer"])
        if state["queue"] is not None:
            queue = FeatureQueue(n_large, q_len // ctx.world_size, sw.proj_dim, device)
            queue.load_state_dict(queue_state_local(state["queue"], ctx, batch_size))
        history = state["history"]
        log.info("SwAV: resuming from %s after epoch %d/%d", ckpt_file, start_epoch, total_epochs)
    ddp = wrap_stage(model, ctx, device, stage_finetune)  # `model` itself in a single process

    for epoch in range(start_epoch, total_epochs):
        t0 = time.perf_counter()
        in_finetune = epoch >= sw.epochs
        if in_finetune and not stage_finetune:
            stage_finetune = True
            optimizer = build_optimizer(model, sw, finetune=True)
            ddp = wrap_stage(model, ctx, device, True)
        if q_len > 0 and epoch >= sw.queue_start_epoch and queue is None:  # as main_swav.py: start the queue
            queue = FeatureQueue(n_large, q_len // ctx.world_size, sw.proj_dim, device)

        ddp.train()
        stage_start, stage_epochs = (sw.epochs, sw.finetune_epochs) if in_finetune else (0, sw.epochs)
        batches = epoch_batches(n, seed, epoch, steps_per_epoch, batch_size, lo, hi,
                                (records, image_views, workers) if in_finetune else None)
        losses = []
        for step, (idx, images) in enumerate(batches):
            it = epoch * steps_per_epoch + step  # global iteration, for the prototype freeze
            set_lr(optimizer, (epoch - stage_start) * steps_per_epoch + step, stage_epochs * steps_per_epoch)
            model.prototypes.normalize_()  # prototypes on the unit sphere before every step
            if in_finetune:  # real multi-crop: one backbone pass per resolution (as main_swav.py), inside the DDP forward
                crops = [torch.cat(images[:n_large]).to(device)] + ([torch.cat(images[n_large:]).to(device)] if n_small else [])
                loss = swav_step(ddp, crops, queue, sw, n_large, distributed, from_images=True)
            else:
                x = model.prep(src.rows(idx))
                gen = make_generator(seed, epoch, step, 2)
                views = [feature_view(x, gen, sw.feature_noise, sw.feature_dropout) for _ in range(n_large)]
                views += [feature_view(x, gen, sw.small_noise, sw.small_dropout) for _ in range(n_small)]
                views = [v[lo:hi] for v in views]  # noise drawn for the global batch, then this rank's slice
                loss = swav_step(ddp, views, queue, sw, n_large, distributed)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if it < freeze_iters:  # main_swav.py: no prototype update for the first iterations
                for p in model.prototypes.parameters():
                    p.grad = None
            optimizer.step()
            losses.append(loss.item())

        end_epoch("SwAV fine-tune" if in_finetune else "SwAV", epoch, total_epochs, losses, t0, history, ctx, ckpt_file, lambda: {
            "fingerprint": fp, "epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "stage_finetune": stage_finetune, "history": history,
            "queue": None if queue is None else queue_state_global(queue, ctx, batch_size)}, stop_after_epoch)

    # ---- final labels from the clean embeddings and the (normalised) prototypes
    model.prototypes.normalize_()
    z = embed_all(model, src, 4 * batch_size, records=records if finetune else None, views=image_views, workers=workers)
    final: dict[int, np.ndarray] = {}
    final_stats: dict[str, Any] = {"sinkhorn_iters": [], "marginal_err": []}
    probs = None
    for h, (kk, layer) in enumerate(zip(ks, model.prototypes.layers)):
        scores = z @ layer.weight.detach().cpu().t()
        if h == 0:
            probs = torch.softmax(scores / sw.temperature, dim=1).numpy().astype(np.float32)
        if sw.final_assign == "sinkhorn":
            r0, r1 = ctx.block(n)  # each rank its rows, marginals all-reduced, labels shared
            b = prior if h == 0 and prior is not None else None
            if b is None and cfg.cluster.marginal == "estimated":
                b = fixed_point_marginal(scores[r0:r1], sw.eps, cfg.cluster.min_mass, distributed=distributed)
                final_stats.setdefault("estimated_sizes", {})[kk] = [round(float(v), 6) for v in b]
            res = sinkhorn(scores[r0:r1].double(), b=b,
                           eps=sw.eps, tol=1e-6, max_iters=1000, distributed=distributed)
            lab = all_gather_blocks(res.plan.argmax(1), ctx)
            final_stats["sinkhorn_iters"].append(int(res.n_iters))
            final_stats["marginal_err"].append(float(res.marginal_err))
        else:
            lab = scores.argmax(1)
        final[kk] = lab.numpy().astype(np.int64)

    info = {"method": "swav", "mode": "finetune" if finetune else "frozen", "ks": ks, "epochs": total_epochs,
            "queue_length": q_len, "freeze_prototypes_iters": freeze_iters, "final_assign": sw.final_assign, "final": final_stats,
            "resumed_from_epoch": start_epoch, "time_s": time.perf_counter() - t_start, **history}
    return label_result(final, k, probs, src, info)
