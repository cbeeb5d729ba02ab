"""Neighbour objectives for cluster heads on frozen features, as pure functions of tensors.

Every function takes logits of H heads at once, shaped [H, B, K] (anchor rows and one mined neighbour
per anchor), and returns one loss per head [H], so that heads trained together can be compared and the
lowest-loss head chosen without labels. `batch_mean` averages over the batch; under torch.distributed it
is replaced by a mean over the global batch (see `selflabel.train.neighbors`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

BatchMean = Callable[[Tensor], Tensor]


def local_mean(t: Tensor) -> Tensor:
    """Mean over the batch axis (dim 1) of [H, B, ...]."""
    return t.mean(1)


def scan_loss(anchor_logits: Tensor, neighbor_logits: Tensor, entropy_weight: float = 5.0,
              batch_mean: BatchMean = local_mean, sizes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """SCAN (Van Gansbeke et al., ECCV 2020, eq. 2): -log <p(x), p(x')> over mined neighbour pairs, minus
    `entropy_weight` times the entropy of the mean prediction (which keeps every cluster in use).
    With `sizes` [K] or [H, K] (cluster proportions, e.g. estimated from the data) the entropy term becomes
    `entropy_weight` * KL(mean prediction || sizes): with equal sizes that is the same loss up to a
    constant (KL = log K - entropy), with unequal ones it no longer pulls a long tail toward equal sizes.

    Returns (loss [H], consistency [H], size term [H]: the entropy, or the KL with `sizes`).
    """
    pa, pn = anchor_logits.softmax(-1), neighbor_logits.softmax(-1)
    consistency = batch_mean(-torch.log((pa * pn).sum(-1).clamp_min(1e-7)))
    penalty = size_penalty(batch_mean(pa), sizes)
    return consistency + entropy_weight * penalty, consistency, penalty if sizes is not None else -penalty


def size_penalty(mean_p: Tensor, sizes: Tensor | None = None) -> Tensor:
    """SCAN's size term per head [H] for mean_p [H, K]: minus the entropy of the mean prediction, or with
    `sizes` ([K] or [H, K]) KL(mean prediction || sizes)."""
    log_p = mean_p.clamp_min(1e-8).log()
    return (mean_p * (log_p if sizes is None else log_p - sizes.clamp_min(1e-8).log())).sum(-1)


def temi_loss(anchor_logits: Tensor, neighbor_logits: Tensor, teacher_anchor: Tensor, teacher_neighbor: Tensor,
              prior: Tensor, beta: float = 0.6, student_temperature: float = 0.1, teacher_temperature: float = 0.1,
              batch_mean: BatchMean = local_mean) -> Tensor:
    """TEMI (Adaloglou et al., BMVC 2023, eq. 6-8): the weighted pointwise mutual information

        -w(x, x') log sum_k (q_s(k|x) q_t(k|x'))^beta / q_t(k)

    symmetrised over the pair, with the teacher's agreement w = (1/H) sum_h <q_t^h(x), q_t^h(x')> as the
    pair's weight and `prior` [H, K] the teacher's cluster marginal (a running mean). Returns loss [H].
    """
    sa = (anchor_logits / student_temperature).softmax(-1)
    sn = (neighbor_logits / student_temperature).softmax(-1)
    with torch.no_grad():
        ta = (teacher_anchor / teacher_temperature).softmax(-1)
        tn = (teacher_neighbor / teacher_temperature).softmax(-1)
        weight = (ta * tn).sum(-1).mean(0, keepdim=True)  # [1, B]: shared by the heads

    def pmi(s: Tensor, t: Tensor) -> Tensor:
        return -torch.log(((s * t).clamp_min(1e-12) ** beta / prior[:, None]).sum(-1))

    return batch_mean(weight * 0.5 * (pmi(sa, tn) + pmi(sn, ta)))


def teacher_marginal(teacher_anchor: Tensor, teacher_neighbor: Tensor, teacher_temperature: float = 0.1,
                     batch_mean: BatchMean = local_mean) -> Tensor:
    """The batch's mean teacher prediction per head [H, K], which TEMI's running prior follows."""
    q = torch.cat([teacher_anchor, teacher_neighbor], 1) / teacher_temperature
    return batch_mean(q.softmax(-1))
