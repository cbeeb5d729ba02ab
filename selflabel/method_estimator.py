"""Any registered method as a scikit-learn estimator: `SelfLabelClustering(method="sela", n_clusters=10)`.

The same `selflabel.methods.cluster_features` a run uses, on an array: `labels_` are the method's
labels, and `predict` places new rows in the stored geometry (nearest centre among the normalised
cluster means in the centred, L2-normalised space), as `selflabel assign` places new images.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from .config import RunConfig, apply_overrides
from .errors import InputError
from .methods import cluster_features, list_methods


class SelfLabelClustering(ClusterMixin, TransformerMixin, BaseEstimator):
    """Cluster rows with a registered method (neighbors, the run's default; sinkhorn, kmeans, sela, swav)
    and the run config's defaults; `overrides` are `--set` strings ("sela.epochs=10") or a nested dict."""

    def __init__(self, method: str = "neighbors", n_clusters: int = 8, *, overrides: Any = None, random_state=None) -> None:
        self.method = method
        self.n_clusters = n_clusters
        self.overrides = overrides
        self.random_state = random_state

    def _config(self) -> RunConfig:
        if self.method not in list_methods():
            raise ValueError(f"unknown method {self.method!r} (choose {', '.join(list_methods())})")
        cfg = RunConfig()
        try:
            if self.overrides:
                apply_overrides(cfg, dict(self.overrides) if isinstance(self.overrides, dict) else list(self.overrides))
        except InputError as exc:
            raise ValueError(str(exc)) from None
        cfg.cluster.method = self.method
        cfg.seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        return cfg

    def fit(self, X, y=None):
        """Cluster the rows of X [n_samples, n_features]; returns self."""
        if not isinstance(self.n_clusters, (int, np.integer)) or self.n_clusters < 1:
            raise ValueError(f"n_clusters must be a positive integer, not {self.n_clusters!r}")
        cfg = self._config()
        X = validate_data(self, X, dtype=[np.float32, np.float64])
        if X.shape[0] < self.n_clusters:
            raise ValueError(f"n_samples={X.shape[0]} should be >= n_clusters={self.n_clusters}")
        cfg.cluster.k = k = int(self.n_clusters)
        x = np.array(X, dtype=np.float32, order="C", copy=True)  # our own writable copy (X may be a read-only memmap)
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was; k = 1: one trivial cluster
            res = cluster_features(x, k, cfg)
        self.labels_ = np.asarray(res.labels, dtype=np.int64)
        self.geometry_ = res.geometry
        self.cluster_centers_ = res.geometry.prototypes
        self.mean_ = res.geometry.mean
        self.info_ = res.info
        return self

    def _scores(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self.geometry_.scores(validate_data(self, X, dtype=[np.float32, np.float64], reset=False))

    def predict(self, X) -> np.ndarray:
        """Nearest centre (highest cosine) of each row."""
        return self._scores(X).argmax(1).astype(np.int64)

    def predict_proba(self, X) -> np.ndarray:
        """softmax(cosine / the method's temperature) over the centres."""
        return torch.softmax(torch.from_numpy(self._scores(X)).double() / self.geometry_.temperature, dim=1).numpy()

    def transform(self, X) -> np.ndarray:
        """Cosine distance 1 - cos to every centre."""
        return (1.0 - self._scores(X)).astype(np.float64)
