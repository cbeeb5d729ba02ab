"""Concepts by majority over several fits: evidence accumulation (Fred & Jain, TPAMI 2005) on the parts.

One fit of the concept step (parts from one seed, CBFE, graph, resolution rule, Louvain) is not
reproducible: on CamVid val two part seeds agree on their concepts with an ARI of about 0.5, and the
number of concepts moves between 8 and 21. So the step is fitted with several seeds and the fits vote.
Every fit labels the same patches with its concepts. For the parts of the first fit (the ones the
masks are drawn with), the co-association A[p, q] is, averaged over the fits, the probability that a
patch of part p and a patch of part q fall in the same concept. Average linkage on 1 - A, cut at
distance 0.5, joins two groups of parts when, on average, most fits put them together: the number of
concepts comes out of the vote, not out of one Louvain run.

Pure functions; the fits themselves are run by `pipeline.fit_concepts`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform


def coassociation(parts: np.ndarray, labellings: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(A [k, k], patches per part [k]) for patches whose part (0..k-1) is `parts` [n] and whose concept in
    each fit is `labellings[s]` [n]. A[p, q] = mean over fits of sum_c h_s[p, c] h_s[q, c], where h_s[p] is the
    distribution of fit s's concepts over the patches of part p. Parts without patches get zero rows."""
    parts = np.asarray(parts, dtype=np.int64)
    counts = np.bincount(parts, minlength=k).astype(np.float64)
    a = np.zeros((k, k))
    for lab in labellings:
        lab = np.asarray(lab, dtype=np.int64)
        if lab.shape != parts.shape:
            raise ValueError("coassociation: every labelling must label the same patches as `parts`")
        h = np.zeros((k, int(lab.max()) + 1 if len(lab) else 1))
        np.add.at(h, (parts, lab), 1.0)
        h /= np.maximum(counts, 1.0)[:, None]
        a += h @ h.T
    return a / max(1, len(labellings)), counts


def majority_concepts(a: np.ndarray, cut: float = 0.5) -> np.ndarray:
    """Concept id (0..M-1) per row of a co-association matrix: average linkage on the distance 1 - A, cut at
    `cut` (0.5: groups join when most fits, on average, put their patches together)."""
    k = a.shape[0]
    if k == 1:
        return np.zeros(1, dtype=np.int64)
    d = 1.0 - (np.asarray(a, dtype=np.float64) + np.asarray(a, dtype=np.float64).T) / 2
    np.fill_diagonal(d, 0.0)
    z = linkage(squareform(d.clip(0.0, 1.0), checks=False), method="average")
    labels = fcluster(z, t=cut, criterion="distance")
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)


def attach_absent(labels: np.ndarray, present: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """Parts that no patch fell in (`present` False) take the concept of their most similar present prototype."""
    labels = np.asarray(labels).copy()
    present = np.asarray(present, dtype=bool)
    if present.all() or not present.any():
        return labels
    p = np.asarray(prototypes, dtype=np.float64)
    sim = p[~present] @ p[present].T
    labels[~present] = labels[present][sim.argmax(1)]
    return labels
