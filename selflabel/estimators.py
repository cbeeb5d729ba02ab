"""scikit-learn estimators for the clustering on an array (`BaseEstimator`, `ClusterMixin`).

    km = selflabel.SinkhornKMeans(n_clusters=10).fit(X)
    km.labels_, km.predict(X_new), km.predict_proba(X_new)

Parameters are stored unchanged in `__init__` and validated in `fit`; the learnt state ends in `_`.
The estimator works in the package's one geometry (`selflabel.geometry`: centred on the training mean,
L2-normalised), so `cluster_centers_` are unit vectors in that space and `geometry_` places new rows
exactly as `selflabel assign` places new images.
"""
from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from .geometry import Geometry, feature_mean, prepare
from .kmeans import M_STEPS, balanced_kmeans


class SinkhornKMeans(ClusterMixin, TransformerMixin, BaseEstimator):
    """Balanced spherical k-means whose assignment step is Sinkhorn optimal transport (SeLa's label step,
    Asano et al. ICLR 2020): `fit` gives clusters of equal size (or of the sizes in `prior`).

    labels_ are the balanced assignment of the training rows; `predict` gives each row its nearest
    prototype (no balance constraint, one row at a time), `predict_proba` softmax(cosine / temperature),
    `transform` the cosine distance 1 - cos to every centre.
    """

    _parameter_constraints: dict = {
        "n_clusters": [Interval(Integral, 1, None, closed="left")],
        "eps": [Interval(Real, 0, None, closed="neither")],
        "temperature": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "prior": ["array-like", None],
        "m_step": [StrOptions(set(M_STEPS))],
        "random_state": ["random_state"],
    }

    def __init__(self, n_clusters: int = 8, *, eps: float = 0.05, temperature: float = 0.1, max_iter: int = 30,
                 prior=None, m_step: str = "hard", random_state=None) -> None:
        self.n_clusters = n_clusters
        self.eps = eps
        self.temperature = temperature
        self.max_iter = max_iter
        self.prior = prior
        self.m_step = m_step
        self.random_state = random_state

    def fit(self, X, y=None):
        """Cluster the rows of X [n_samples, n_features]; returns self."""
        self._validate_params()
        X = validate_data(self, X, dtype=[np.float64, np.float32])
        if X.shape[0] < self.n_clusters:
            raise ValueError(f"n_samples={X.shape[0]} should be >= n_clusters={self.n_clusters}")
        prior = None if self.prior is None else [float(p) for p in np.asarray(self.prior, dtype=np.float64).ravel()]
        if prior is not None and len(prior) != self.n_clusters:
            raise ValueError(f"prior has {len(prior)} entries for n_clusters={self.n_clusters}")
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        mean = feature_mean(X)
        x = prepare(X, mean)
        fit = balanced_kmeans(x, self.n_clusters, eps=self.eps, iters=self.max_iter, seed=seed, prior=prior,
                              m_step=self.m_step)
        labels = fit.labels
        centres = torch.nn.functional.normalize(
            torch.zeros_like(fit.prototypes).index_add_(0, labels, x), dim=1)  # the final clusters' means
        empty = torch.bincount(labels, minlength=self.n_clusters) == 0
        centres[empty] = fit.prototypes[empty]
        self.geometry_ = Geometry(mean, centres.numpy(), float(self.temperature), "sinkhorn")
        self.labels_ = labels.numpy().astype(np.int64)
        self.cluster_centers_ = self.geometry_.prototypes
        self.mean_ = self.geometry_.mean
        self.n_iter_ = fit.alternations
        return self

    def _scores(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return self.geometry_.scores(X)

    def predict(self, X) -> np.ndarray:
        """Nearest centre (highest cosine) of each row."""
        return self._scores(X).argmax(1).astype(np.int64)

    def predict_proba(self, X) -> np.ndarray:
        """softmax(cosine / temperature) over the centres [n_samples, n_clusters]."""
        s = torch.from_numpy(self._scores(X)).double()
        return torch.softmax(s / self.temperature, dim=1).numpy()

    def transform(self, X) -> np.ndarray:
        """Cosine distance 1 - cos to every centre [n_samples, n_clusters]."""
        return (1.0 - self._scores(X)).astype(np.float64)

    def fit_predict(self, X, y=None) -> np.ndarray:
        """The balanced labels of the training rows (`labels_`)."""
        return self.fit(X).labels_
