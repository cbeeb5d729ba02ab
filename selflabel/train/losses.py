"""Losses of the trainers, as pure functions of tensors (no model, no optimiser, no I/O)."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor


def multihead_cross_entropy(logits: Sequence[Tensor], labels: Sequence[Tensor]) -> Tensor:
    """SeLa's representation step: mean over heads of the cross-entropy to each head's pseudo-labels."""
    return sum(F.cross_entropy(lg, y) for lg, y in zip(logits, labels)) / len(logits)


def swav_loss(scores: Sequence[Tensor], codes: Mapping[int, Tensor], temperature: float = 0.1) -> Tensor:
    """SwAV's swapped prediction (Caron et al. 2020, eq. 1-2), as in main_swav.py.

    scores[v]: prototype scores [B, K] of view v; codes[i]: Sinkhorn codes [B, K] (rows sum to 1) computed
    from view i. Each code is predicted from every *other* view: -sum_k q_ik log softmax(z_v . c_k / T),
    averaged over the other views, then over the views that give codes.
    """
    log_p = [F.log_softmax(s / temperature, dim=1) for s in scores]  # once per view, not once per code
    total = 0.0
    for i, q in codes.items():
        sub = 0.0
        for v, lp in enumerate(log_p):
            if v != i:
                sub = sub - (q * lp).sum(1).mean()
        total = total + sub / (len(scores) - 1)
    return total / len(codes)
