"""Cluster heads trained on mined nearest neighbours of cached features (SCAN / TEMI), no backbone forward.

1. mining: the `neighbors.neighbors` (default 20) nearest neighbours of every image by cosine on the
   prepared (centred, L2-normalised) features, exact up to 50,000 images and the faiss index beyond
   when installed (`selflabel.neighbors.knn`, method "auto");
2. start (`init=clustering`, the default): every head begins as the prototype classifier of the run's own
   transport clustering (`selflabel.default_clustering`: sizes estimated from the data, or the user's prior),
   and SCAN's entropy term becomes KL(mean prediction || that clustering's sizes), which keeps a long tail
   long; `init=random` is SCAN's random start with the entropy term;
3. heads: `n_heads` linear heads per K, trained together on (image, random mined neighbour) pairs with
   SCAN's neighbour consistency + size term (Van Gansbeke et al., ECCV 2020) or TEMI's weighted PMI with
   an EMA teacher (Adaloglou et al., BMVC 2023);
4. choice without labels: each head's loss over every mined pair; the lowest is kept;
5. optional self-labelling (SCAN step 3): the chosen head trains on its own confident predictions,
   labelled by a Sinkhorn label step (the start clustering's sizes, the head's estimated marginal, or balanced);
6. final labels: the chosen head's argmax, or one more Sinkhorn label step (`final_assign=sinkhorn`).

Deterministic for a seed (every draw from `make_generator(seed, epoch, step)`), resumable (a checkpoint
after every epoch), and under torchrun each rank trains on its slice of every global batch with the batch
means all-reduced, so the result is the single-process one.
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
from torch import Tensor, nn

from ..atomic import atomic_write_json
from ..geometry import prepare_features
from ..result import LabelResult
from ..config import NeighborsConfig, RunConfig
from ..default_clustering import transport_clustering
from ..distributed import DistContext, all_gather_blocks, context
from ..errors import InputError
from ..imbalanced import canonical_order
from ..marginals import floor_marginal
from ..neighbors import knn, knn_exact
from ..ot import sinkhorn
from .augment import make_generator
from .checkpoint import checkpoint_path, fingerprint, load_checkpoint
from .common import check_features, cpu_threads, data_digest, end_epoch, head_ks, wrap_ddp
from .neighbor_losses import local_mean, scan_loss, size_penalty, teacher_marginal, temi_loss

log = logging.getLogger(__name__)

OBJECTIVES = ("scan", "temi")
MARGINALS = ("uniform", "estimated")
INITS = ("clustering", "random")
INIT_JITTER = 0.1  # init=clustering: heads after the first start from the prototypes plus this much relative noise
FINAL_ASSIGN = ("argmax", "sinkhorn")
MIN_STEPS = 20
DEFAULT_NEIGHBORS = 20  # neighbors.neighbors=null: this many, or a cluster's worth (N / K - 1) when fewer


def neighbor_count(ncfg: NeighborsConfig, n: int, k: int) -> int:
    """The neighbours mined per image: the setting, or by default 20, fewer in a small folder: N // K - 1,
    an average cluster's other members (with 10 images a class, 20 neighbours are half strangers;
    the shipped 100-photo sample, seeds 0-2: 0.913 accuracy at 9 against 0.893 at 20)."""
    if ncfg.neighbors is not None:
        return ncfg.neighbors
    return max(1, min(DEFAULT_NEIGHBORS, n // max(k, 1) - 1, n - 1))


def epoch_order(n: int, length: int, seed: int, epoch: int) -> Tensor:
    """`length` row indices for one epoch: permutations of the n rows drawn from (seed, epoch, r), end to end."""
    reps = -(-length // n)
    keys = [(seed, epoch, 1)] + [(seed, epoch, 1, r) for r in range(1, reps)]
    return torch.cat([torch.randperm(n, generator=make_generator(*key)) for key in keys])[:length]


# ----------------------------------------------------------------------------- settings
def check_settings(ncfg: NeighborsConfig, n: int, ks: Sequence[int]) -> None:
    """One clear error for each setting that cannot work, before any long work starts."""
    def bad(key: str, value: Any, allowed: str) -> InputError:
        return InputError(f"neighbors.{key}={value!r} is not valid: {allowed}")

    if ncfg.objective not in OBJECTIVES:
        raise bad("objective", ncfg.objective, f"choose {' or '.join(OBJECTIVES)}")
    if ncfg.init not in INITS:
        raise bad("init", ncfg.init, f"choose {' or '.join(INITS)}")
    if ncfg.marginal not in MARGINALS:
        raise bad("marginal", ncfg.marginal, f"choose {' or '.join(MARGINALS)}")
    if ncfg.final_assign not in FINAL_ASSIGN:
        raise bad("final_assign", ncfg.final_assign, f"choose {' or '.join(FINAL_ASSIGN)}")
    if ncfg.neighbors is not None and not 1 <= ncfg.neighbors < n:
        raise bad("neighbors", ncfg.neighbors, f"needs 1 <= neighbors < the number of images ({n}), or null")
    if ncfg.n_heads < 1:
        raise bad("n_heads", ncfg.n_heads, "at least one head is needed")
    if ncfg.epochs < 1 or ncfg.self_label_epochs < 0:
        raise bad("epochs", (ncfg.epochs, ncfg.self_label_epochs), "epochs >= 1 and self_label_epochs >= 0")
    if ncfg.batch_size < 2:
        raise bad("batch_size", ncfg.batch_size, "at least 2 (the entropy term needs a batch)")
    if not 0.0 < ncfg.confidence < 1.0:
        raise bad("confidence", ncfg.confidence, "a probability strictly between 0 and 1")


# ----------------------------------------------------------------------------- model
class HeadBank(nn.Module):
    """`n_heads` linear heads for one K, as one [H, K, D] weight: logits [H, B, K] in one product."""

    def __init__(self, dim: int, k: int, n_heads: int) -> None:
        super().__init__()
        self.k = k
        self.weight = nn.Parameter(torch.randn(n_heads, k, dim) * 0.01)
        self.bias = nn.Parameter(torch.zeros(n_heads, k))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bd,hkd->hbk", x, self.weight) + self.bias[:, None]


class NeighborHeads(nn.Module):
    """One HeadBank per K (the chosen K first); input: prepared features [B, D]."""

    def __init__(self, dim: int, ks: Sequence[int], n_heads: int) -> None:
        super().__init__()
        self.banks = nn.ModuleList(HeadBank(dim, k, n_heads) for k in ks)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [bank(x) for bank in self.banks]


def build_heads(dim: int, ks: Sequence[int], n_heads: int, seed: int) -> NeighborHeads:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return NeighborHeads(dim, ks, n_heads)


@torch.no_grad()
def init_from_clustering(model: NeighborHeads, x: Tensor, ks: Sequence[int], cfg: RunConfig, seed: int,
                         ctx: DistContext) -> list[Tensor]:
    """Start each K's heads as the prototype classifier of the run's own transport clustering
    (`selflabel.default_clustering`: estimated sizes by default, the user's prior for the main K):
    weights = prototypes / cluster.temperature, bias = log of the cluster proportions, so training starts
    from that partition instead of a random one; heads after the first get INIT_JITTER relative noise.
    Returns each K's cluster proportions (floored at cluster.min_mass / K), the heads' size targets."""
    sizes = []
    for i, (bank, kk) in enumerate(zip(model.banks, ks)):
        fit = transport_clustering(x, kk, cfg.cluster, seed, cfg.cluster.prior if i == 0 else None, ctx)
        counts = torch.bincount(torch.as_tensor(fit.labels), minlength=kk).double()
        b = floor_marginal(counts / counts.sum(), cfg.cluster.min_mass).float()
        w = torch.as_tensor(fit.prototypes, dtype=torch.float32) / cfg.cluster.temperature
        noise = torch.randn(bank.weight.shape, generator=make_generator(seed, 4, kk))
        noise[0] = 0.0
        bank.weight.copy_((w[None] + noise * (INIT_JITTER * w.norm(dim=1).mean() / w.shape[1] ** 0.5)).to(bank.weight))
        bank.bias.copy_(b.log()[None].expand_as(bank.bias).to(bank.bias))
        sizes.append(b.to(x.device))
    return sizes


# ----------------------------------------------------------------------------- distributed batch means
def batch_mean_fn(ctx: DistContext, global_batch: int):
    """The mean over the GLOBAL batch of [H, B_local, ...] tensors: the local sum all-reduced with autograd
    (its backward all-reduces the gradient), so DDP's averaged gradients equal one process's."""
    if not ctx.enabled:
        return local_mean
    from torch.distributed.nn.functional import all_reduce  # autograd-aware collective

    def mean(t: Tensor) -> Tensor:
        return all_reduce(t.sum(1)) / global_batch

    return mean


# ----------------------------------------------------------------------------- mining and evaluation
@torch.no_grad()
def mine_neighbors(x: Tensor, n_neighbors: int, ctx: DistContext) -> Tensor:
    """[N, n_neighbors] int64 indices of each row's nearest rows (self excluded); each rank mines its block
    of query rows, then the blocks are gathered."""
    if not ctx.enabled:  # exact up to EXACT_MAX_ROWS, the faiss index beyond when installed (as the curation)
        return torch.from_numpy(knn(x, n_neighbors, exclude_self=True, normalized=True, device=x.device,
                                    method="auto").indices)
    s, e = ctx.block(x.shape[0])
    idx = knn_exact(x[s:e], n_neighbors + 1, x, normalized=True, device=x.device).indices  # own row is among them
    own = idx == np.arange(s, e)[:, None]
    keep = torch.from_numpy(_without_own(idx, own, n_neighbors + 1))
    return all_gather_blocks(keep, ctx)


def _without_own(idx: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    own[~own.any(1), -1] = True  # own row not among the k (ties): drop the last one
    return idx[~own].reshape(len(idx), k - 1)


@torch.no_grad()
def predict(model: NeighborHeads, x: Tensor, temperature: float = 1.0, batch_size: int = 8192) -> list[Tensor]:
    """softmax(logits / temperature) of every head of every bank over all rows: per bank [H, N, K] (CPU)."""
    outs: list[list[Tensor]] = [[] for _ in model.banks]
    for s in range(0, x.shape[0], batch_size):
        for b, logits in enumerate(model(x[s:s + batch_size])):
            outs[b].append((logits / temperature).softmax(-1).cpu())
    return [torch.cat(o, 1) for o in outs]


@torch.no_grad()
def head_losses(probs: Tensor, neighbors: Tensor, ncfg: NeighborsConfig, chunk: int = 4096,
                sizes: Tensor | None = None) -> Tensor:
    """Each head's objective over EVERY mined pair, without augmentation [H] (the label-free head choice).
    SCAN: consistency - w * entropy (+ w * KL to `sizes` instead, as trained with init=clustering);
    TEMI: the PMI loss with the head as its own teacher. Rows in chunks."""
    h, n, k = probs.shape
    mean_p = probs.mean(1)  # [H, K]
    total = torch.zeros(h, dtype=torch.float64)
    for s in range(0, n, chunk):
        p = probs[:, s:s + chunk, None, :]  # [H, c, 1, K]
        nb = neighbors[s:s + chunk]
        pn = probs[:, nb.reshape(-1)].reshape(h, nb.shape[0], nb.shape[1], k)
        agree = (p * pn).sum(-1)  # [H, c, nb]
        if ncfg.objective == "scan":
            term = -torch.log(agree.clamp_min(1e-7))
        else:  # TEMI's marginal is the (converged) teacher's mean prediction
            joint = ((p * pn).clamp_min(1e-12) ** ncfg.beta / mean_p[:, None, None, :]).sum(-1)
            term = -agree.mean(0, keepdim=True) * torch.log(joint)
        total += term.double().sum((1, 2))
    loss = (total / (n * neighbors.shape[1])).float()
    if ncfg.objective == "scan":
        loss = loss + ncfg.entropy_weight * size_penalty(mean_p, None if sizes is None else sizes.cpu().to(mean_p.dtype))
    return loss


@torch.no_grad()
def label_step(probs: Tensor, marginal: str, lamb: float, ctx: DistContext | None = None,
               sizes: Tensor | None = None) -> Tensor:
    """SeLa's label step on one head's probabilities [N, K]: Sinkhorn on P ** lamb with equal cluster
    sizes (`uniform`) or sizes estimated from the data (`estimated`): `sizes` when given (the clustering
    the heads started from), else the head's own mean prediction."""
    if marginal == "uniform":
        b = None
    else:
        b = probs.double().mean(0) if sizes is None else sizes.double().cpu()  # sizes sum to 1
    # targets for confident rows need cluster sizes within 0.1 %, not one image (0.1 / N): on near one-hot
    # heads the stricter tolerance took 2,000 iterations per step (imagenette-val) for the same argmax
    tol = 1e-3 / probs.shape[1] ** 0.5
    res = sinkhorn(probs.double().clamp_min(1e-30).log(), b=b, eps=1.0 / lamb, tol=tol, max_iters=1000)
    return res.plan.argmax(1)


def neighbor_diagnostics(labels: np.ndarray, neighbors: np.ndarray, gt: Sequence[Any] | None) -> dict[str, Any]:
    """Label-free: share of mined pairs given the same cluster, cluster sizes; with ground truth: the
    neighbour purity (share of mined pairs of the same class, the best predictor of what the heads add)."""
    out: dict[str, Any] = {
        "neighbor_agreement": float((labels[neighbors] == labels[:, None]).mean()),
        "cluster_sizes": np.bincount(labels, minlength=int(labels.max()) + 1).tolist(),
    }
    if gt is not None and all(g is not None for g in gt):
        _, gi = np.unique(np.asarray([str(g) for g in gt]), return_inverse=True)
        out["neighbor_purity"] = float((gi[neighbors] == gi[:, None]).mean())
    return out


# ----------------------------------------------------------------------------- the trainer
def train_neighbors(features: np.ndarray, k: int, cfg: RunConfig, *, heads: Sequence[int] = (),
                    out_dir: Path | None = None, device: str = "cpu", records=None,
                    stop_after_epoch: int | None = None, prepared: Tensor | None = None) -> LabelResult:
    """Cluster `features` [N, D] into `k` groups (plus `heads`, extra Ks) with neighbour-trained heads.

    `prepared`: the features already centred and L2-normalised on `device` (`selflabel.geometry.prepare`),
    to share one copy with the caller.
    With `out_dir`, a checkpoint goes to out_dir/checkpoints/neighbors.pt after every epoch (a new call with
    the same arguments resumes and gives the same labels) and the diagnostics to out_dir/neighbors.json.
    `records` (optional) provide ground truth (`.gt`) for the neighbour purity. `stop_after_epoch`
    (testing hook) raises TrainingInterrupted after that many epochs, like a kill.
    """
    with cpu_threads(cfg.neighbors.cpu_threads, device, False):
        return _train(features, k, cfg, heads=heads, out_dir=out_dir, device=device, records=records,
                      stop_after_epoch=stop_after_epoch, prepared=prepared)


def _train(features: np.ndarray, k: int, cfg: RunConfig, *, heads: Sequence[int], out_dir: Path | None,
           device: str, records, stop_after_epoch: int | None, prepared: Tensor | None) -> LabelResult:
    t_start = time.perf_counter()
    ncfg, seed = cfg.neighbors, int(cfg.seed)
    ks = head_ks(k, heads)
    n, d = check_features(features, ks)
    check_settings(ncfg, n, ks)
    ctx = context()
    batch_size = min(ncfg.batch_size, n)
    if ctx.enabled and batch_size % ctx.world_size:
        raise InputError(f"neighbors.batch_size={batch_size} must be divisible by the number of processes "
                         f"({ctx.world_size}) so every rank trains on an equal slice")
    lo, hi = ctx.block(batch_size)
    bmean = batch_mean_fn(ctx, batch_size)

    x = prepare_features(features, device) if prepared is None else prepared
    t0 = time.perf_counter()
    n_nbrs = neighbor_count(ncfg, n, k)
    nbrs = mine_neighbors(x, n_nbrs, ctx).to(device)
    mining_s = time.perf_counter() - t0
    log.info("neighbours: %d per image mined in %.1fs", n_nbrs, mining_s)

    model = build_heads(d, ks, ncfg.n_heads, seed).to(device)
    teacher = build_heads(d, ks, ncfg.n_heads, seed).to(device).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=ncfg.lr, weight_decay=ncfg.weight_decay)
    priors = [torch.full((ncfg.n_heads, kk), 1.0 / kk, device=device) for kk in ks]
    history: dict[str, list] = {"loss": [], "epoch_time_s": []}
    total_epochs = ncfg.epochs + ncfg.self_label_epochs
    # at least MIN_STEPS steps an epoch: a folder of 1,000 images has 3 batches, and 40 epochs of them
    # left the heads untrained (imagenette-val subset: 0.76 accuracy vs k-means' 0.84)
    steps = max(MIN_STEPS, n // batch_size)

    fp = fingerprint(method="neighbors", data=data_digest(features), ks=ks, seed=seed,
                     neighbors=dataclasses.asdict(ncfg),  # not the world size: every world gives one result
                     cluster=dataclasses.asdict(cfg.cluster) if ncfg.init == "clustering" else None)
    ckpt_file = checkpoint_path(out_dir, "neighbors") if out_dir is not None else None
    state = load_checkpoint(ckpt_file, fp) if ckpt_file is not None else None
    start_epoch = 0
    sizes: list[Tensor | None] = [None] * len(ks)  # each K's size target (init=clustering), None: SCAN's entropy
    if state is not None:
        start_epoch = int(state["epoch"])
        model.load_state_dict(state["model"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        priors = [p.to(device) for p in state["priors"]]
        history = state["history"]
        sizes = [None if b is None else b.to(device) for b in state["sizes"]]
        log.info("neighbors: resuming from %s after epoch %d/%d", ckpt_file, start_epoch, total_epochs)
    elif ncfg.init == "clustering":
        t0 = time.perf_counter()
        sizes = init_from_clustering(model, x, ks, cfg, seed, ctx)
        teacher.load_state_dict(model.state_dict())
        log.info("neighbors: heads start from the transport clustering (%.1fs)", time.perf_counter() - t0)
    ddp = wrap_ddp(model, ctx, device)

    chosen: list[int] | None = None
    student_t = ncfg.temperature if ncfg.objective == "temi" else 1.0  # the softmax the objective trained
    for epoch in range(start_epoch, total_epochs):
        t0 = time.perf_counter()
        self_label = epoch >= ncfg.epochs
        if self_label:  # SCAN step 3 on the chosen heads: targets from a Sinkhorn label step, confident rows only
            probs = predict(model, x, student_t)
            chosen = [int(head_losses(p, nbrs.cpu(), ncfg, sizes=b).argmin()) for p, b in zip(probs, sizes)]
            targets = [label_step(p[h], ncfg.marginal, ncfg.lamb, sizes=b).to(device)
                       for p, h, b in zip(probs, chosen, sizes)]
            confident = [(p[h].max(1).values >= ncfg.confidence).to(device) for p, h in zip(probs, chosen)]
        perm = epoch_order(n, steps * batch_size, seed, epoch).to(device)
        losses = []
        for step in range(steps):
            gen = make_generator(seed, epoch, step, 2)
            idx = perm[step * batch_size:(step + 1) * batch_size]
            pick = torch.randint(n_nbrs, (len(idx),), generator=gen).to(device)
            nidx = nbrs[idx, pick]
            va, vn = _view(x[idx], gen, ncfg.feature_noise), _view(x[nidx], gen, ncfg.feature_noise)
            va, vn, idx = va[lo:hi], vn[lo:hi], idx[lo:hi]  # this rank's slice (noise drawn for the whole batch)
            if self_label:
                loss = _self_label_loss(ddp, va, idx, chosen, targets, confident, bmean, student_t)
            else:
                both = ddp(torch.cat([va, vn]))  # one forward: DDP sees each parameter once per step
                out_a, out_n = [o[:, :len(va)] for o in both], [o[:, len(va):] for o in both]
                if ncfg.objective == "scan":
                    per_bank = [scan_loss(a, b, ncfg.entropy_weight, bmean, sz)[0]
                                for a, b, sz in zip(out_a, out_n, sizes)]
                else:
                    with torch.no_grad():
                        ta, tn = teacher(va), teacher(vn)
                    per_bank = [temi_loss(a, b, s, t, priors[i], ncfg.beta, ncfg.temperature,
                                          ncfg.teacher_temperature, bmean)
                                for i, (a, b, s, t) in enumerate(zip(out_a, out_n, ta, tn))]
                    with torch.no_grad():
                        for i, (s, t) in enumerate(zip(ta, tn)):
                            priors[i] = 0.9 * priors[i] + 0.1 * teacher_marginal(s, t, ncfg.teacher_temperature, bmean)
                loss = sum(l.sum() for l in per_bank) / len(per_bank)  # heads are independent: sum over them
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ncfg.objective == "temi" and not self_label:
                with torch.no_grad():
                    for pt, ps in zip(teacher.parameters(), model.parameters()):
                        pt.mul_(ncfg.teacher_momentum).add_(ps, alpha=1 - ncfg.teacher_momentum)
            losses.append(float(loss.detach()))
        end_epoch("neighbors", epoch, total_epochs, losses, t0, history, ctx, ckpt_file, lambda: {
            "fingerprint": fp, "epoch": epoch + 1, "model": model.state_dict(), "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict(), "priors": [p.cpu() for p in priors], "history": history,
            "sizes": [None if b is None else b.cpu() for b in sizes]},
            stop_after_epoch)

    # ---- choose each K's head by its loss over every mined pair, then the final labels
    use_teacher = ncfg.objective == "temi" and ncfg.self_label_epochs == 0  # TEMI predicts with its teacher
    probs = predict(teacher if use_teacher else model, x, ncfg.teacher_temperature if use_teacher else student_t)
    nb_cpu = nbrs.cpu()
    losses_per_k = [head_losses(p, nb_cpu, ncfg, sizes=b) for p, b in zip(probs, sizes)]
    chosen = [int(l.argmin()) for l in losses_per_k]
    final: dict[int, np.ndarray] = {}
    for kk, p, h, b in zip(ks, probs, chosen, sizes):
        lab = p[h].argmax(1) if ncfg.final_assign == "argmax" else label_step(p[h], ncfg.marginal, ncfg.lamb, sizes=b)
        final[kk] = lab.numpy().astype(np.int64)
    # clusters numbered by size, largest first, as the transport clustering numbers them (the partition's number)
    orders = {kk: canonical_order(torch.from_numpy(v), kk) for kk, v in final.items()}
    final = {kk: torch.argsort(orders[kk]).numpy()[v] for kk, v in final.items()}
    chosen_probs = probs[0][chosen[0]][:, orders[k]].numpy().astype(np.float32)
    labels = final[k]
    gt = [getattr(r, "gt", None) for r in records] if records is not None and len(records) == n else None
    diagnostics = {
        "objective": ncfg.objective, "k": k, "n_heads": ncfg.n_heads, "neighbors": n_nbrs, "init": ncfg.init,
        # init=clustering: the start clustering's cluster proportions, the size target of the loss
        "start_sizes": None if sizes[0] is None else [round(float(v), 6) for v in sizes[0].cpu()[orders[k]]],
        "chosen_head": chosen[0], "chosen_head_loss": float(losses_per_k[0][chosen[0]]),
        "head_losses": [float(v) for v in losses_per_k[0]],
        "chosen_heads_by_k": {str(kk): h for kk, h in zip(ks, chosen)},
        **neighbor_diagnostics(labels, nb_cpu.numpy(), gt),
        "mining_s": mining_s, "time_s": time.perf_counter() - t_start,
    }
    if out_dir is not None and ctx.is_main:
        atomic_write_json(Path(out_dir) / "neighbors.json", diagnostics)
    log.info("neighbors: head %d chosen (loss %.4f), neighbour agreement %.3f", chosen[0],
             diagnostics["chosen_head_loss"], diagnostics["neighbor_agreement"])
    protos = F.normalize(torch.zeros(k, d, dtype=torch.float64).index_add_(0, torch.from_numpy(labels), x.cpu().double()),
                         dim=1).float().numpy()
    info = {"method": "neighbors", "ks": ks, "epochs": total_epochs, "resumed_from_epoch": start_epoch,
            **diagnostics, **history}
    return LabelResult(labels=labels, confidence=chosen_probs[np.arange(n), labels], prototypes=protos,
                       head_labels={kk: v for kk, v in final.items() if kk != k}, probs=chosen_probs, info=info)


def _view(x: Tensor, gen: torch.Generator, noise: float) -> Tensor:
    """A noisy view of unit-norm rows (noise norm about `noise`), re-normalised; the rows themselves at 0."""
    if noise <= 0:
        return x
    eps = torch.randn(x.shape, generator=gen).to(x.device) * (noise / x.shape[1] ** 0.5)
    return F.normalize(x + eps, dim=1)


def _self_label_loss(ddp: nn.Module, va: Tensor, idx: Tensor, chosen: Sequence[int], targets: Sequence[Tensor],
                     confident: Sequence[Tensor], bmean, temperature: float = 1.0) -> Tensor:
    """Cross-entropy of each K's chosen head to its label-step targets, on the confident rows of the batch
    (mean over the global batch's confident rows)."""
    total = 0.0
    for bank_logits, h, tgt, conf in zip(ddp(va), chosen, targets, confident):
        logits = bank_logits[h] / temperature
        mask = conf[idx].float()
        ce = F.cross_entropy(logits, tgt[idx], reduction="none") * mask
        stats = bmean(torch.stack([ce, mask])[:, :, None])[:, 0]  # [2]: mean ce*mask, share confident
        total = total + stats[0] / stats[1].clamp_min(1e-8)
    return total / len(targets)
