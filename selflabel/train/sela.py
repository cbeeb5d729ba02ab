"""SeLa: self-labelling via simultaneous clustering and representation learning (Asano, Rupprecht & Vedaldi, ICLR 2020).

Two steps alternate (paper sec. 3):
  1. labels: for each head, over the WHOLE data set, solve
         min_Q <Q, -log P> - (1/lambda) H(Q)   s.t.  Q 1 = 1/N,  Q^T 1 = 1/K
     i.e. Sinkhorn-Knopp on P ** lambda (`sinkhorn(log P, eps=1/lambda)`); label_i = argmax_k Q_ik.
  2. representation: train the network with cross-entropy on those labels, under augmentation.
The labels are re-optimised `label_updates` times, spread over the epochs. Long-tailed data
(`cluster.marginal=estimated`, the default): the column marginal 1/K becomes the cluster sizes estimated
from the data, one EM step per label step (`estimate_sizes`, `selflabel.marginals`); a `cluster.prior`
fixes the main head's sizes instead, `cluster.marginal=uniform` is the paper's equipartition.

Frozen mode (default): the network is a head on cached, centred + L2-normalised features and the
augmentation is feature noise / channel dropout (or cached features of augmented views, `views=`).
Measured choices (benchmarks/quality.py): cosine-classifier heads (cos / 0.1; a linear head fits any
starting partition and keeps it, an MLP memorises it), started as prototype classifiers on the balanced
Sinkhorn clustering, a label step before every epoch, and final labels = the trained head's argmax
(`sela.final_assign=sinkhorn` gives one more balanced label step instead).
Finetune mode (`cluster.finetune`, a backbone and image records): after `sela.epochs` frozen epochs, the
backbone is trained end to end with image augmentations for `sela.finetune_epochs` more epochs.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..cluster import sinkhorn_cluster_prepared
from ..geometry import prepare_features
from ..imbalanced import estimated_cluster_prepared
from ..kmeans import kmeanspp_init, prior_marginal
from ..marginals import estimate_marginal, floor_marginal
from ..result import LabelResult
from ..config import RunConfig, SelaConfig
from ..errors import InputError
from ..ot import sinkhorn
from .augment import feature_view, make_generator, pick_cached_views
from .checkpoint import checkpoint_path, fingerprint, load_checkpoint
from .common import (FeatureSource, epoch_progress, check_distributed, check_features, check_finetune, cpu_threads,
                     data_digest, end_epoch, epoch_batches, head_ks, image_loader, image_views_for, label_result, num_workers,
                     seeded_init, set_lr, sgd_optimizer, update_epochs,
                     wrap_stage)
from ..distributed import all_gather_blocks, context
from .heads import SelaNet, convert_batchnorm
from .losses import multihead_cross_entropy

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the label step (pure maths)
@torch.no_grad()
def optimize_labels(log_probs: Tensor, lamb: float, prior: Tensor | None = None, *, tol: float | None = None,
                    max_iters: int = 2000, distributed: bool = False, init=None):
    """SeLa's label assignment: balanced Q = diag(u) P**lambda diag(v), labels = argmax of each row.

    `log_probs` [N, K] are the network's log-softmax outputs; eps = 1/lambda on them is P ** lambda.
    `prior` [K] replaces the uniform column marginal (cluster sizes). `tol` bounds the L2 error of the
    cluster masses; the default, a tenth of one sample's mass (0.1 / N), balances the hard labels to
    within about one image (the reference code stops far earlier, at a 10% relative change).
    `init`: the previous label step's SinkhornResult (a warm start: fewer Sinkhorn iterations, same fixed point).
    Returns (labels [N], SinkhornResult).
    """
    tol = 0.1 / log_probs.shape[0] if tol is None else tol
    res = sinkhorn(log_probs.double(), b=prior, eps=1.0 / lamb, tol=tol, max_iters=max_iters, distributed=distributed,
                   init=init)
    return res.plan.argmax(dim=1), res


@torch.no_grad()
def estimate_sizes(log_probs: Tensor, sizes: Tensor | None, lamb: float, min_mass: float,
                   distributed: bool = False) -> Tensor:
    """The label step's column marginal estimated from the data (`selflabel.marginals`): one EM step
    of the cluster sizes under the posterior ``P ** lambda * b`` (uniform ``b`` at first), floored at
    ``min_mass / K``; all-reduced under torch.distributed (every rank holds the same sizes)."""
    k = log_probs.shape[1]
    start = torch.full((k,), 1.0 / k, dtype=torch.float64) if sizes is None else sizes
    return floor_marginal(estimate_marginal(log_probs, start, 1.0 / lamb, distributed=distributed), min_mass).cpu()


# ----------------------------------------------------------------------------- model and optimiser
def build_model(in_dim: int, ks: Sequence[int], scfg: SelaConfig, seed: int, backbone=None) -> SelaNet:
    """Trunk + one linear head per K, initialised from `seed` (small function: DDP wraps its result)."""
    return seeded_init(seed, lambda: SelaNet(in_dim, ks, scfg.hidden_dim, scfg.head, backbone, scfg.temperature))


@torch.no_grad()
def init_heads(model: SelaNet, src: FeatureSource, features: np.ndarray, how: str, seed: int,
               temperature: float = 1.0, max_rows: int = 20_000, estimated: bool = False,
               min_mass: float = 0.1, overcluster: int = 6, merge: str = "auto") -> None:
    """Start each linear/cosine head as a prototype classifier (weights = prototypes / temperature):
      * "kmeans++": k-means++ seeds of the prepared features (a subsample of `max_rows`);
      * "sinkhorn": the prototypes of `selflabel.cluster.sinkhorn_cluster` (balanced spherical k-means,
        i.e. SeLa's label step with fixed features), which SeLa then refines; with ``estimated`` the
        clustering with sizes estimated from the data (`selflabel.imbalanced`), as the label steps;
      * "random": the paper's random initialisation (nothing to do).
    A random linear head gives a random hyperplane partition that a linear head fits and keeps."""
    if model.trunk.kind == "mlp" or how == "random":
        return
    prepared = prepare_features(features) if how == "sinkhorn" else None  # once for every head
    for head in model.heads.heads:
        k = head.out_features
        if how == "sinkhorn":
            fit = estimated_cluster_prepared(prepared, k, seed=seed, min_mass=min_mass, overcluster=overcluster,
                                             merge=merge) if estimated \
                else sinkhorn_cluster_prepared(prepared, k, seed=seed)
            protos = torch.from_numpy(fit.prototypes)
        elif how == "kmeans++":
            gen = make_generator(seed, 3, k)
            idx = torch.randperm(src.n, generator=gen)[:max_rows].sort().values
            protos = kmeanspp_init(model.prep(src.rows(idx)).cpu(), k, gen)
        else:
            raise ValueError(f"sela.init must be kmeans++, sinkhorn or random, not {how!r}")
        head.weight.copy_(protos.to(head.weight.device) / temperature)
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()


def build_optimizer(model: SelaNet, scfg: SelaConfig, finetune: bool) -> torch.optim.Optimizer:
    """SGD on the trunk and heads; in the finetune stage the backbone too, with its own, smaller lr."""
    return sgd_optimizer([*model.trunk.parameters(), *model.heads.parameters()], model.backbone if finetune else None,
                         scfg.lr, scfg.finetune_lr, scfg.weight_decay)


# ----------------------------------------------------------------------------- evaluation passes
@torch.no_grad()
def predict_log_probs(model: SelaNet, src: FeatureSource, batch_size: int, *, records=None, views=None,
                      workers: int = 0, rows: tuple[int, int] | None = None) -> list[Tensor]:
    """log-softmax of every head over the whole data set, or rows [start, end) of it (eval mode, no
    augmentation), on the CPU."""
    model.eval()
    outs: list[list[Tensor]] = [[] for _ in model.heads.ks]
    if records is None:
        batches = ((x, False) for x in src.batches(batch_size, *(rows or (0, None))))
    else:
        lo, hi = rows if rows is not None else (0, len(records))
        loader = image_loader(records, views, 0, 0, range(lo, hi), batch_size, workers, plain=True)
        batches = ((x.to(src.device), True) for x in loader)
    for x, from_images in batches:
        for h, logits in enumerate(model(x, from_images=from_images)):
            outs[h].append(F.log_softmax(logits.float(), dim=1).cpu())
    return [torch.cat(o) for o in outs]


# ----------------------------------------------------------------------------- the trainer
def train_sela(features: np.ndarray, k: int, cfg: RunConfig, *, heads: Sequence[int] = (), out_dir: Path | None = None,
               device: str = "cpu", records=None, backbone=None, views: np.ndarray | None = None,
               stop_after_epoch: int | None = None) -> LabelResult:
    """Cluster `features` [N, D] into `k` groups (plus one head per extra K in `heads`) with SeLa.

    features may be a np.memmap. `views` [V, N, D]: optional cached features of augmented images, used
    instead of feature noise. With `out_dir`, a checkpoint is written to out_dir/checkpoints/sela.pt after
    every epoch and a new call with the same arguments resumes from it and gives the same result.
    `stop_after_epoch` (testing hook) raises TrainingInterrupted after that many epochs, like a kill.
    """
    with cpu_threads(cfg.sela.cpu_threads, device, cfg.cluster.finetune), epoch_progress():
        return _train_sela(features, k, cfg, heads=heads, out_dir=out_dir, device=device, records=records,
                           backbone=backbone, views=views, stop_after_epoch=stop_after_epoch)


def _train_sela(features: np.ndarray, k: int, cfg: RunConfig, *, heads: Sequence[int] = (), out_dir: Path | None = None,
               device: str = "cpu", records=None, backbone=None, views: np.ndarray | None = None,
               stop_after_epoch: int | None = None) -> LabelResult:
    t_start = time.perf_counter()
    scfg, seed = cfg.sela, int(cfg.seed)
    ks = head_ks(k, heads)
    n, d = check_features(features, ks)
    finetune = check_finetune(cfg.cluster.finetune, features, records, backbone)
    src = FeatureSource(features, device)
    if views is not None and (views.ndim != 3 or views.shape[1:] != (n, d)):
        raise InputError(f"views must be [V, {n}, {d}] (features of augmented images), got {tuple(views.shape)}")
    cached_views = None if views is None else torch.from_numpy(np.array(views, dtype=np.float32))
    priors = [prior_marginal(cfg.cluster.prior, k)] + [None] * (len(ks) - 1)
    # heads without a fixed prior: sizes estimated from the data at each label step (cluster.marginal)
    estimated = [p is None and cfg.cluster.marginal == "estimated" for p in priors]
    sizes: list[Tensor | None] = [None] * len(ks)  # the current estimate per head (None: uniform)
    ctx = context()  # under torchrun: DDP training, row-distributed label steps, rank 0 writes
    distributed = ctx.enabled
    workers = num_workers(cfg.backbone.num_workers)
    image_views = image_views_for(backbone, cfg.backbone.image_size, 1, 0) if finetune else None

    total_epochs = scfg.epochs + (scfg.finetune_epochs if finetune else 0)
    updates = update_epochs(total_epochs, scfg.label_updates)
    steps_per_epoch = max(1, n // scfg.batch_size)  # drop_last: BatchNorm needs > 1 sample
    batch_size = min(scfg.batch_size, n)
    check_distributed(ctx, batch_size)
    lo, hi = ctx.block(batch_size)  # this rank's slice of every global batch (equal slices)
    row_block = ctx.block(n)  # this rank's rows for the label step

    model = convert_batchnorm(build_model(d, ks, scfg, seed, backbone if finetune else None), distributed,
                              torch.device(device).type == "cuda").to(device)
    model.prep.mean.copy_(src.mean())
    stage_finetune = False
    optimizer = build_optimizer(model, scfg, finetune=False)
    labels = [torch.randperm(n, generator=make_generator(seed, h)) % kk for h, kk in enumerate(ks)]  # replaced at epoch 0
    history: dict[str, list] = {"loss": [], "epoch_time_s": [], "label_updates": []}

    # ---- resume
    fp = fingerprint(method="sela", data=data_digest(features), ks=ks, seed=seed, sela=dataclasses.asdict(scfg),
                     prior=cfg.cluster.prior, marginal=cfg.cluster.marginal, min_mass=cfg.cluster.min_mass, overcluster=cfg.cluster.overcluster, merge=cfg.cluster.merge, finetune=finetune, views=None if views is None else list(views.shape))
    ckpt_file = checkpoint_path(out_dir, "sela") if out_dir is not None else None
    start_epoch = 0
    state = load_checkpoint(ckpt_file, fp) if ckpt_file is not None else None
    if state is None:
        init_heads(model, src, features, scfg.init, seed, scfg.init_temperature, estimated=any(estimated),
                   min_mass=cfg.cluster.min_mass, overcluster=cfg.cluster.overcluster, merge=cfg.cluster.merge)
    else:
        start_epoch = int(state["epoch"])
        model.load_state_dict(state["model"])
        stage_finetune = bool(state["stage_finetune"])
        optimizer = build_optimizer(model, scfg, finetune=stage_finetune)
        optimizer.load_state_dict(state["optimizer"])
        labels = [t.clone() for t in state["labels"]]
        sizes = list(state.get("sizes", sizes))
        history = state["history"]
        log.info("SeLa: resuming from %s after epoch %d/%d", ckpt_file, start_epoch, total_epochs)
    ddp = wrap_stage(model, ctx, device, stage_finetune)  # `model` itself in a single process

    warm: dict[int, Any] = {}  # per head: the last label step's Sinkhorn result
    for epoch in range(start_epoch, total_epochs):
        t0 = time.perf_counter()
        in_finetune = epoch >= scfg.epochs
        if in_finetune and not stage_finetune:  # entering the end-to-end stage: new optimiser with the backbone
            stage_finetune = True
            optimizer = build_optimizer(model, scfg, finetune=True)
            ddp = wrap_stage(model, ctx, device, True)

        # 1. labels: Sinkhorn over the whole data set, per head
        if epoch in updates:
            log_p = predict_log_probs(model, src, 4 * batch_size, records=records if in_finetune else None,
                                      views=image_views, workers=workers, rows=row_block if distributed else None)
            stats = {"epoch": epoch, "sinkhorn_iters": [], "marginal_err": [], "changed": []}
            for h in range(len(ks)):  # each rank solves for its rows (marginals all-reduced), then shares its labels
                if estimated[h]:
                    sizes[h] = estimate_sizes(log_p[h], sizes[h], scfg.lamb, cfg.cluster.min_mass, distributed)
                new, res = optimize_labels(log_p[h], scfg.lamb, sizes[h] if estimated[h] else priors[h], tol=0.1 / n,
                                           distributed=distributed, init=warm.get(h))
                warm[h] = res  # the next label step starts from these potentials
                new = all_gather_blocks(new, ctx)
                stats["sinkhorn_iters"].append(int(res.n_iters))
                stats["marginal_err"].append(float(res.marginal_err))
                stats["changed"].append(float((new != labels[h]).float().mean()))
                labels[h] = new
            history["label_updates"].append(stats)
            log.info("SeLa epoch %d: labels updated (sinkhorn iters %s, changed %s)", epoch, stats["sinkhorn_iters"],
                     [round(c, 3) for c in stats["changed"]])

        # 2. representation: cross-entropy on the labels, under augmentation
        ddp.train()
        stage_start = scfg.epochs if in_finetune else 0
        stage_epochs = (scfg.finetune_epochs if in_finetune else scfg.epochs)
        batches = epoch_batches(n, seed, epoch, steps_per_epoch, batch_size, lo, hi,
                                (records, image_views, workers) if in_finetune else None)
        losses = []
        for step, (idx, images) in enumerate(batches):
            set_lr(optimizer, (epoch - stage_start) * steps_per_epoch + step, stage_epochs * steps_per_epoch)
            if in_finetune:
                logits = ddp(images[0].to(device), from_images=True)  # idx: this rank's slice
            else:
                gen = make_generator(seed, epoch, step, 2)
                raw = src.rows(idx) if cached_views is None else pick_cached_views(cached_views, idx, gen).to(device)
                # noise drawn for the whole global batch, then this rank's slice: sample i sees what it sees in one process
                x = feature_view(model.prep(raw), gen, scfg.feature_noise, scfg.feature_dropout)
                idx = idx[lo:hi]
                logits = ddp(x[lo:hi], prepared=True)  # DDP averages the slices' gradients = the global mean loss's
            loss = multihead_cross_entropy(logits, [lab[idx].to(device) for lab in labels])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())

        end_epoch("SeLa fine-tune" if in_finetune else "SeLa", epoch, total_epochs, losses, t0, history, ctx, ckpt_file, lambda: {
            "fingerprint": fp, "epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "stage_finetune": stage_finetune, "labels": labels, "sizes": sizes, "history": history}, stop_after_epoch)

    # ---- final labels: one more label step, to tolerance, with the trained network
    log_p = predict_log_probs(model, src, 4 * batch_size, records=records if finetune else None,
                              views=image_views, workers=workers)
    final: dict[int, np.ndarray] = {}
    final_stats: dict[str, Any] = {"sinkhorn_iters": [], "marginal_err": [], "converged": []}
    for h, kk in enumerate(ks):
        if scfg.final_assign == "argmax":
            lab = log_p[h].argmax(1)
        else:
            r0, r1 = row_block if distributed else (0, n)
            rows = log_p[h][r0:r1]
            if estimated[h]:
                sizes[h] = estimate_sizes(rows, sizes[h], scfg.lamb, cfg.cluster.min_mass, distributed)
            lab, res = optimize_labels(rows, scfg.lamb, sizes[h] if estimated[h] else priors[h], tol=0.1 / n,
                                       distributed=distributed, init=warm.get(h))
            lab = all_gather_blocks(lab, ctx)
            final_stats["sinkhorn_iters"].append(int(res.n_iters))
            final_stats["marginal_err"].append(float(res.marginal_err))
            final_stats["converged"].append(bool(res.converged))
        final[kk] = lab.numpy().astype(np.int64)

    probs = log_p[0].exp().numpy().astype(np.float32)
    info = {"method": "sela", "mode": "finetune" if finetune else "frozen", "ks": ks, "marginal": cfg.cluster.marginal,
            "estimated_sizes": {kk: [round(float(v), 6) for v in b] for kk, b in zip(ks, sizes) if b is not None}, "epochs": total_epochs,
            "label_update_epochs": updates, "final_assign": scfg.final_assign, "final": final_stats,
            "resumed_from_epoch": start_epoch, "time_s": time.perf_counter() - t_start, **history}
    return label_result(final, k, probs, src, info)
