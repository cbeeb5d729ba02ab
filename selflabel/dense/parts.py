"""Part clusters: Sinkhorn-balanced prototypes fitted on frozen patch features (overclustering).

Leopart clusters patch tokens into many parts (K ~ 100-300) with prototypes whose assignments are
balanced by Sinkhorn-Knopp, so no prototype is left empty and none swallows the data set (SwAV / SeLa
self-labelling applied to patches). On CPU we fit that head on frozen features with the package's one
balanced spherical k-means (`selflabel.kmeans.balanced_kmeans`, hard M-step: soft weights let
prototypes that share a dense region collapse onto its mean, which defeats overclustering;
benchmarks/kmeans_mstep.py). New patches are assigned by the nearest prototype (argmax cosine),
without the balance constraint.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..kmeans import balanced_kmeans

log = logging.getLogger(__name__)


@dataclass
class PartModel:
    """Prototypes [K, d] (unit rows) in the space of the projected patch features."""

    prototypes: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.prototypes.shape[0])


@torch.no_grad()
def fit_part_prototypes(z: np.ndarray | torch.Tensor, k: int, *, eps: float = 0.05, iters: int = 20,
                        seed: int = 0, rel_tol: float = 0.01, max_sinkhorn_iters: int = 1000) -> PartModel:
    """Fit K Sinkhorn-balanced prototypes to patch features `z` [N, d] (L2-normalised inside).

    Each Sinkhorn solve stops when the column marginals are within `rel_tol` (relative L2) of 1/K:
    the M-step needs balance, not digits. Stops early when fewer than 0.1% of the patches change
    their (argmax-plan) cluster.
    """
    x = F.normalize(torch.as_tensor(np.asarray(z), dtype=torch.float32), dim=1)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"fit_part_prototypes: k={k} must be between 1 and the number of patches ({n})")
    fit = balanced_kmeans(x, k, eps=eps, iters=iters, seed=seed, rel_tol=rel_tol, max_sinkhorn_iters=max_sinkhorn_iters,
                          m_step="hard", stop_changed=1e-3)
    protos = fit.prototypes
    hard = (x @ protos.T).argmax(1)
    sizes = torch.bincount(hard, minlength=k).numpy()
    info = {"alternations": fit.alternations, "history": fit.history, "n_patches": n, "eps": eps,
            "empty_clusters": int((sizes == 0).sum()), "largest_share": float(sizes.max() / n)}
    log.info("part prototypes: K=%d on %d patches, %d alternations, %d empty", k, n, fit.alternations, info["empty_clusters"])
    return PartModel(prototypes=protos.numpy().astype(np.float32), info=info)


@torch.no_grad()
def part_scores(z_map: np.ndarray | torch.Tensor, prototypes: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every patch of a feature map [h, w, d] to every prototype -> [K, h, w]."""
    z = F.normalize(torch.as_tensor(np.asarray(z_map), dtype=torch.float32), dim=-1)
    c = torch.as_tensor(np.asarray(prototypes), dtype=torch.float32)
    return torch.einsum("hwd,kd->khw", z, c)
