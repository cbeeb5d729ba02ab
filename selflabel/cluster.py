"""Image-level clustering on an array of features: balanced Sinkhorn k-means and the k-means baseline.

Both prepare the features the same way (`selflabel.geometry`: centred, L2-normalised) and return a
`LabelResult` whose prototypes and confidences live in that geometry. Methods are looked up by name in
`selflabel.methods`; the trainers (`selflabel.train`) use the seeds and priors defined here.
"""
from __future__ import annotations

import numpy as np
import torch

from .distributed import DistContext, all_gather_blocks
from .geometry import hard_label_result, mean_prototypes, prepare_features
from .kmeans import balanced_kmeans, kmeanspp_init, prior_marginal
from .result import LabelResult

IMAGE_M_STEP = "soft"  # K ~ the classes: as accurate as hard, and SeLa initialised from it does better (kmeans.py)

__all__ = ["LabelResult", "prepare_features", "kmeanspp_init", "prior_marginal", "sinkhorn_cluster",
           "sinkhorn_cluster_prepared", "kmeans_cluster", "kmeans_cluster_prepared"]


@torch.no_grad()
def sinkhorn_cluster(features: np.ndarray, k: int, *, eps: float = 0.05, temperature: float = 0.1, iters: int = 30,
                     seed: int = 0, prior: list[float] | None = None, device: str | torch.device = "cpu",
                     ctx: DistContext | None = None) -> LabelResult:
    """Balanced k-means whose assignment step is an optimal transport problem (SeLa's label step).

    `selflabel.kmeans.balanced_kmeans` on the prepared features: equal (or `prior`) cluster sizes,
    labels = argmax of the plan. Under torch.distributed (`ctx`) each rank transports its block of
    rows and the result equals the single-process one.
    """
    # every rank prepares the same full matrix (identical init)
    return sinkhorn_cluster_prepared(prepare_features(features, device), k, eps=eps, temperature=temperature,
                                     iters=iters, seed=seed, prior=prior, ctx=ctx)


@torch.no_grad()
def sinkhorn_cluster_prepared(x: torch.Tensor, k: int, *, eps: float = 0.05, temperature: float = 0.1,
                              iters: int = 30, seed: int = 0, prior: list[float] | None = None,
                              ctx: DistContext | None = None) -> LabelResult:
    """`sinkhorn_cluster` on features already through `prepare_features` (several K, one preparation).

    Prototypes are the normalised means of the final clusters and confidences softmax(cos / temperature)
    of the chosen one: exactly what the run's `Geometry` gives for these rows."""
    ctx = ctx or DistContext()
    fit = balanced_kmeans(x, k, eps=eps, iters=iters, seed=seed, prior=prior, m_step=IMAGE_M_STEP, ctx=ctx)
    labels = all_gather_blocks(fit.labels, ctx)  # N integers: every rank gets the whole labelling
    return hard_label_result(x, labels, k, temperature, {
        "method": "sinkhorn", "alternations": fit.alternations, "sinkhorn_iters": [h["sinkhorn_iters"] for h in fit.history]})


def kmeans_cluster(features: np.ndarray, k: int, *, seed: int = 0, temperature: float = 0.1) -> LabelResult:
    """scikit-learn k-means on the same prepared features (the baseline)."""
    return kmeans_cluster_prepared(prepare_features(features), k, seed=seed, temperature=temperature)


def kmeans_cluster_prepared(x: torch.Tensor, k: int, *, seed: int = 0, temperature: float = 0.1) -> LabelResult:
    """`kmeans_cluster` on features already through `prepare_features`."""
    from sklearn.cluster import KMeans  # scikit-learn's import is slow; only the baseline needs it

    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x.cpu().numpy())  # the strong baseline (issue 14)
    labels = torch.as_tensor(km.labels_, dtype=torch.long)
    protos = mean_prototypes(x.cpu(), labels, k)
    probs = torch.softmax(x.cpu() @ protos.T / temperature, dim=1)
    conf = probs.gather(1, labels[:, None])[:, 0]
    return LabelResult(labels.numpy().astype(np.int64), conf.numpy().astype(np.float32),
                       protos.numpy().astype(np.float32), probs=probs.numpy().astype(np.float32),
                       info={"method": "kmeans"})
