"""Hard labels and confidences from a plan, or from the column potentials without the plan."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .rows import BULK_BYTES, chunks, rows_per_chunk


@torch.no_grad()
def assign(plan: Tensor) -> tuple[Tensor, Tensor]:
    """Hard labels from a plan: ``labels[i] = argmax_j plan[i, j]`` (int64) and ``confidence[i]``,
    the probability of that cluster within row i (``max / row sum``, float32 in [0, 1])."""
    if plan.device.type == "cpu" and plan.dtype in (torch.float32, torch.float64):
        x = plan.numpy()  # numpy: no OpenMP wake-ups (see backend.py)
        labels = x.argmax(axis=1)
        conf = x[np.arange(x.shape[0]), labels] / x.sum(axis=1, dtype=np.float64)
        return torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(conf.astype(np.float32))
    top, labels = plan.max(dim=1)
    conf = (top.double() / plan.sum(dim=1, dtype=torch.float64)).to(torch.float32)
    return labels, conf


@torch.no_grad()
def assign_from_potentials(scores: Tensor, log_v: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """:func:`assign` without the plan: row i of the plan is proportional to
    ``softmax_j(scores[i, j] / eps + log_v[j])``, computed over row chunks."""
    n, k = scores.shape
    labels = torch.empty(n, dtype=torch.int64, device=scores.device)
    conf = torch.empty(n, dtype=torch.float32, device=scores.device)
    g = log_v.to(device=scores.device, dtype=torch.float64)
    rows = rows_per_chunk(n, k, scores.device, BULK_BYTES, 8)
    for s, e in chunks(0, n, rows):
        z = scores[s:e].double() / eps + g
        top, labels[s:e] = z.max(dim=1)
        conf[s:e] = torch.exp(top - torch.logsumexp(z, dim=1)).to(torch.float32)
    return labels, conf
