"""The clustering methods, looked up by name (as timm's `create_model`): `cluster.method` in a config.

A method is a function `(MethodInput) -> LabelResult` registered with `@register_method(name, ...)`.
`cluster_features` runs the configured one and gives its result the run's `Geometry`: the centring
mean, the normalised prototypes of the final clusters in that space and the method's temperature,
the same for every method, so that `selflabel assign` can place new images later.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .cluster import kmeans_cluster_prepared
from .config import RunConfig
from .default_clustering import transport_clustering
from .distributed import DistContext
from .errors import InputError
from .geometry import Geometry, feature_mean, hard_label_result, prepare
from .result import LabelResult
from .train.neighbors import train_neighbors
from .train.sela import train_sela
from .train.swav import train_swav


@dataclass
class MethodInput:
    """What a method gets: the raw features [N, D] (maybe a memmap), K, the extra heads' Ks, the run
    config, and for trainers the run folder (checkpoints), device, image records and backbone."""

    features: np.ndarray
    k: int
    cfg: RunConfig
    heads: Sequence[int] = ()
    out_dir: Path | None = None
    device: str | torch.device = "cpu"
    records: Any = None
    backbone: Any = None
    ctx: DistContext | None = None

    @cached_property
    def mean(self) -> np.ndarray:
        return feature_mean(self.features)

    @cached_property
    def prepared(self) -> torch.Tensor:
        """normalise(features - mean), computed once on first use (one N x D float32 tensor)."""
        return prepare(self.features, self.mean, self.device)


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable[[MethodInput], LabelResult]
    temperature: Callable[[RunConfig], float]  # the softmax temperature of its confidences
    description: str = ""


_METHODS: dict[str, Method] = {}


def register_method(name: str, temperature: Callable[[RunConfig], float], description: str = ""):
    """Decorator: register `fn(MethodInput) -> LabelResult` as method `name`."""
    def wrap(fn: Callable[[MethodInput], LabelResult]) -> Callable[[MethodInput], LabelResult]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        _METHODS[name] = Method(name, fn, temperature, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return wrap


def list_methods() -> dict[str, str]:
    """name -> one-line description of every registered method."""
    return {name: m.description for name, m in _METHODS.items()}


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise InputError(f"unknown method '{name}' (choose {', '.join(_METHODS)})") from None


def _transport_clustering(inp: MethodInput, k: int, prior) -> LabelResult:
    """One K: fixed sizes (the user's prior, or equal with cluster.marginal=uniform) or sizes estimated
    from the data (cluster.marginal=estimated, the default; selflabel.imbalanced)."""
    return transport_clustering(inp.prepared, k, inp.cfg.cluster, inp.cfg.seed, prior, inp.ctx)


@register_method("sinkhorn", lambda cfg: cfg.cluster.temperature)
def _sinkhorn(inp: MethodInput) -> LabelResult:
    """Spherical k-means, the assignment an optimal transport problem (SeLa's label step); cluster
    sizes estimated from the data unless a prior or cluster.marginal=uniform fixes them."""
    res = _transport_clustering(inp, inp.k, inp.cfg.cluster.prior)
    for h in inp.heads:  # the prior is the main K's; extra heads follow cluster.marginal
        res.head_labels[h] = _transport_clustering(inp, h, None).labels
    return res


@register_method("kmeans", lambda cfg: cfg.cluster.temperature)
def _kmeans(inp: MethodInput) -> LabelResult:
    """scikit-learn k-means on the same prepared features (the baseline)."""
    x = inp.prepared.cpu()
    res = kmeans_cluster_prepared(x, inp.k, seed=inp.cfg.seed, temperature=inp.cfg.cluster.temperature)
    for h in inp.heads:
        res.head_labels[h] = kmeans_cluster_prepared(x, h, seed=inp.cfg.seed).labels
    return res


@register_method("sela", lambda cfg: cfg.sela.temperature)
def _sela(inp: MethodInput) -> LabelResult:
    """SeLa (Asano et al., ICLR 2020): heads trained on Sinkhorn pseudo-labels."""
    return train_sela(inp.features, inp.k, inp.cfg, heads=inp.heads, out_dir=inp.out_dir, device=str(inp.device),
                      records=inp.records, backbone=inp.backbone)


@register_method("swav", lambda cfg: cfg.swav.temperature)
def _swav(inp: MethodInput) -> LabelResult:
    """SwAV (Caron et al., NeurIPS 2020): swapped prediction of Sinkhorn codes."""
    return train_swav(inp.features, inp.k, inp.cfg, heads=inp.heads, out_dir=inp.out_dir, device=str(inp.device),
                      records=inp.records, backbone=inp.backbone)


@register_method("neighbors", lambda cfg: cfg.cluster.temperature)
def _neighbors(inp: MethodInput) -> LabelResult:
    """SCAN / TEMI heads trained on mined nearest neighbours of the cached features (the default)."""
    res = train_neighbors(inp.features, inp.k, inp.cfg, heads=inp.heads, out_dir=inp.out_dir, device=str(inp.device),
                          records=inp.records, prepared=inp.prepared)
    # confidences as the sinkhorn method's: softmax(cos / T) to the final clusters' means, what the run's
    # geometry gives a later `selflabel assign` (the heads' own softmax is sharpened by self-labelling)
    labels = torch.from_numpy(np.asarray(res.labels, dtype=np.int64))
    geo = hard_label_result(inp.prepared.cpu(), labels, inp.k, inp.cfg.cluster.temperature, res.info)
    geo.head_labels = res.head_labels
    return geo


def run_geometry(inp: MethodInput, result: LabelResult, method: Method) -> Geometry:
    """The geometry of a method's final clusters: normalised cluster means of the prepared features."""
    return Geometry.from_labels(inp.prepared.cpu(), inp.mean, result.labels, inp.k, method.temperature(inp.cfg),
                                method.name)


def cluster_features(features: np.ndarray, k: int, cfg: RunConfig, *, out_dir=None, device="cpu", records=None,
                     backbone=None, ctx: DistContext | None = None) -> LabelResult:
    """Run `cfg.cluster.method`; extra heads (`cfg.cluster.heads`) go to `head_labels`. The result's
    `geometry` is set and its `prototypes` are the geometry's (prepared space, every method)."""
    method = get_method(cfg.cluster.method)
    inp = MethodInput(features, k, cfg, [h for h in cfg.cluster.heads if h != k], out_dir, device, records, backbone, ctx)
    if k == 1 and not inp.heads:  # one cluster holds every row (a folder of one kind): nothing to train
        result = hard_label_result(inp.prepared.cpu(), torch.zeros(len(features), dtype=torch.int64), 1,
                                   method.temperature(cfg), {"method": method.name, "trivial": True})
    else:
        result = method.run(inp)
    result.geometry = run_geometry(inp, result, method)
    result.prototypes = result.geometry.prototypes
    return result


__all__ = ["Method", "MethodInput", "register_method", "list_methods", "get_method", "cluster_features"]
