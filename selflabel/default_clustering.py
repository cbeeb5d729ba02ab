"""The run's transport clustering of prepared features for one K, as configured by `ClusterConfig`:
fixed sizes (a prior, or equal with `cluster.marginal=uniform`) or sizes estimated from the data
(`cluster.marginal=estimated`, the default). Shared by the `sinkhorn` method and the trainers that
start from it (neighbour heads), so both read the same settings the same way."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from .cluster import sinkhorn_cluster_prepared
from .config import ClusterConfig
from .distributed import DistContext
from .imbalanced import estimated_cluster_prepared
from .result import LabelResult


def transport_clustering(x: Tensor, k: int, c: ClusterConfig, seed: int, prior: Sequence[float] | None = None,
                         ctx: DistContext | None = None) -> LabelResult:
    """K clusters of the prepared features ``x`` (every rank holds all rows); ``prior``: fixed sizes."""
    if prior is None and c.marginal == "estimated":
        return estimated_cluster_prepared(x, k, eps=c.eps, temperature=c.temperature, iters=c.iters, seed=seed,
                                          min_mass=c.min_mass, overcluster=c.overcluster, merge=c.merge, ctx=ctx)
    return sinkhorn_cluster_prepared(x, k, eps=c.eps, temperature=c.temperature, iters=c.iters, seed=seed,
                                     prior=prior, ctx=ctx)


__all__ = ["transport_clustering"]
