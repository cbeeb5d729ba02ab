"""The feature geometry a clustering works in, and placing vectors in it (pure maths, no I/O).

Every method clusters in one space: a feature vector x becomes normalise(x - mean) (centred on the
data set's mean feature, then L2-normalised: cosine geometry), and cluster k is a unit prototype c_k
in that space. A vector's scores are the cosines <x', c_k>, its probabilities softmax(scores / T)
with the method's temperature T. A run stores this `Geometry` (see `geometry_io`), so an image added
later is placed exactly where the clustering placed the old ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from .result import LabelResult

NORMALISATION = "centre-l2"  # the only one: subtract `mean`, then divide by the L2 norm


def feature_mean(features: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """The mean row [D] (float64 accumulation), reading a memmap `chunk` rows at a time."""
    n, d = features.shape
    total = np.zeros(d, dtype=np.float64)
    for s in range(0, n, chunk):
        total += np.asarray(features[s:s + chunk]).sum(0, dtype=np.float64)
    return (total / max(n, 1)).astype(np.float32)


def prepare(features: np.ndarray, mean: np.ndarray, device: str | torch.device = "cpu", chunk: int = 8192) -> torch.Tensor:
    """normalise(x - mean) for every row, into one float32 tensor (chunked: the only N x D array held)."""
    n, d = features.shape
    out = torch.empty((n, d), dtype=torch.float32, device=device)
    m = torch.as_tensor(np.asarray(mean, dtype=np.float32), device=device)
    for s in range(0, n, chunk):
        x = out[s:s + chunk]
        x.copy_(torch.from_numpy(np.array(features[s:s + chunk], dtype=np.float32)))  # a writable copy of the chunk
        x.sub_(m)
        x.div_(x.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return out


def prepare_features(features: np.ndarray, device: str | torch.device = "cpu", chunk: int = 8192) -> torch.Tensor:
    """Centre on the features' own mean and L2-normalise (cosine geometry). Post-ReLU CNN features all
    share a large mean direction; removing it makes cosine similarity discriminative."""
    return prepare(features, feature_mean(features, chunk), device, chunk)


def mean_prototypes(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Unit-normalised sum of each cluster's prepared rows [K, D] (zero row for an empty cluster)."""
    sums = torch.zeros((k, x.shape[1]), dtype=x.dtype, device=x.device).index_add_(0, labels.to(x.device), x)
    return F.normalize(sums, dim=1)


@dataclass(frozen=True)
class Geometry:
    """Where a clustering lives: centring `mean` [D], unit `prototypes` [K, D] in the prepared space,
    softmax `temperature`, and the cluster id of each prototype row (`cluster_ids`, default 0..K-1)."""

    mean: np.ndarray
    prototypes: np.ndarray
    temperature: float
    method: str = "sinkhorn"
    cluster_ids: np.ndarray = field(default=None)  # type: ignore[assignment]
    normalisation: str = NORMALISATION

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", np.asarray(self.mean, dtype=np.float32).reshape(-1))
        object.__setattr__(self, "prototypes", np.asarray(self.prototypes, dtype=np.float32))
        ids = np.arange(len(self.prototypes)) if self.cluster_ids is None else self.cluster_ids
        object.__setattr__(self, "cluster_ids", np.asarray(ids, dtype=np.int64).reshape(-1))
        if self.prototypes.ndim != 2 or self.prototypes.shape[1] != self.mean.shape[0]:
            raise ValueError(f"prototypes {self.prototypes.shape} do not match a mean of {self.mean.shape[0]} dims")
        if len(self.cluster_ids) != len(self.prototypes):
            raise ValueError(f"{len(self.cluster_ids)} cluster ids for {len(self.prototypes)} prototypes")
        if self.normalisation != NORMALISATION:
            raise ValueError(f"unknown normalisation {self.normalisation!r} (only {NORMALISATION!r})")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, not {self.temperature}")

    @property
    def k(self) -> int:
        return int(self.prototypes.shape[0])

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def from_labels(cls, x: torch.Tensor, mean: np.ndarray, labels: np.ndarray, k: int, temperature: float,
                    method: str) -> "Geometry":
        """The geometry of a partition of prepared rows `x`: prototypes = normalised cluster means."""
        lab = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        return cls(mean, mean_prototypes(x, lab, k).cpu().numpy(), float(temperature), method)

    def with_clusters(self, prototypes: np.ndarray, cluster_ids: np.ndarray) -> "Geometry":
        """The same space (mean, temperature) with other clusters, e.g. a reviewed run's."""
        return replace(self, prototypes=prototypes, cluster_ids=cluster_ids)

    def prepare(self, features: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
        """Rows placed in this geometry's space: normalise(x - mean)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be [N, {self.dim}], got {tuple(features.shape)}")
        return prepare(features, self.mean, device)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Cosine of every row to every prototype [N, K]."""
        return (self.prepare(features) @ torch.from_numpy(self.prototypes).T).numpy()

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """softmax(scores / temperature) [N, K]: the confidences a run reports."""
        return torch.softmax(torch.from_numpy(self.scores(features)) / self.temperature, dim=1).numpy()

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cluster id [N], confidence [N], cosine to that prototype [N]) of the nearest prototype."""
        s = torch.from_numpy(self.scores(features))
        best = s.argmax(1)
        p = torch.softmax(s / self.temperature, dim=1)
        return (self.cluster_ids[best.numpy()], p.gather(1, best[:, None])[:, 0].numpy().astype(np.float32),
                s.gather(1, best[:, None])[:, 0].numpy().astype(np.float32))


def hard_label_result(x: torch.Tensor, labels: torch.Tensor, k: int, temperature: float, info: dict) -> LabelResult:
    """A clustering's result from its hard labels on prepared rows `x`: prototypes the normalised cluster
    means, confidences softmax(cos / temperature) of the chosen cluster (what the run's Geometry gives)."""
    protos = mean_prototypes(x, labels, k)
    probs = torch.softmax(x @ protos.T / temperature, dim=1)
    conf = probs.gather(1, labels[:, None])[:, 0]
    return LabelResult(labels=labels.cpu().numpy().astype(np.int64), confidence=conf.cpu().numpy().astype(np.float32),
                       prototypes=protos.cpu().numpy().astype(np.float32), probs=probs.cpu().numpy().astype(np.float32),
                       info=info)
