"""Review suggestions: the edits most likely to be right, each one click to accept in the app.

From the current labels, the unit features and each image's k nearest neighbours:

- **merge** two clusters when their images' neighbours cross over (the share of A's neighbour
  links that land in B, and of B's in A, averaged) or their centres are close;
- **move** the images whose neighbours vote for another cluster (at least `MOVE_VOTE` of the
  k neighbours in one other cluster), grouped per (from, to) pair so one click moves them all;
- **split** a cluster whose two-means split explains unusually much of its spread (two modes
  inside): the gain of 2-means over the cluster's own centre, against the median gain of all clusters.

Each suggestion has a stable `key` (the app stores accepted and dismissed keys as edits, so a
dismissed suggestion does not come back and undo brings it back). Scores are comparable within a
kind; the list is ordered by the number of images an acceptance would fix, best first.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans

MERGE_CROSSING = 0.25  # share of neighbour links crossing between two clusters
MERGE_COSINE = 0.90  # or cosine of their centres (centred features)
MOVE_VOTE = 0.6  # share of an image's neighbours in one other cluster
SPLIT_GAIN_MADS = 3.0  # a cluster's 2-means gain this many MADs above the median gain
MIN_SPLIT_PART = 0.15  # each part of a suggested split holds at least this share of the cluster


@dataclass(frozen=True)
class Suggestion:
    """One proposed edit: `kind` merge (clusters[0] into clusters[1]), move (`rows` from clusters[0] to
    clusters[1]) or split (clusters[0] in two, `rows` = the second part)."""

    key: str
    kind: str
    clusters: tuple[int, ...]
    score: float
    rows: tuple[int, ...] = field(default=())
    size: int = 0  # images the edit changes

    def describe(self, names: dict[int, str]) -> str:
        n = lambda c: names.get(c, str(c))  # noqa: E731
        if self.kind == "merge":
            return f"merge {n(self.clusters[0])} into {n(self.clusters[1])} ({self.size} images; score {self.score:.2f})"
        if self.kind == "move":
            return f"move {self.size} image(s) from {n(self.clusters[0])} to {n(self.clusters[1])} (neighbour vote {self.score:.2f})"
        return f"split {n(self.clusters[0])} in two ({self.size} images; {self.score:.1f} MADs above the usual gain)"


def neighbour_counts(labels: np.ndarray, indices: np.ndarray, k: int) -> np.ndarray:
    """[K, K] links: entry (a, b) = neighbour links from images of a to images of b."""
    src = np.repeat(labels, indices.shape[1])
    dst = labels[indices.reshape(-1)]
    return np.bincount(src * k + dst, minlength=k * k).reshape(k, k).astype(np.float64)


def merge_suggestions(x: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> list[Suggestion]:
    k = int(labels.max()) + 1
    links = neighbour_counts(labels, indices, k)
    out_links = links.sum(1)
    share = links / np.maximum(out_links[:, None], 1)
    crossing = (share + share.T) / 2
    sizes = np.bincount(labels, minlength=k)
    centres = np.zeros((k, x.shape[1]), dtype=np.float64)
    np.add.at(centres, labels, x)
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    cos = centres @ centres.T
    out = []
    for a in range(k):
        for b in range(a + 1, k):
            if sizes[a] == 0 or sizes[b] == 0:
                continue
            if crossing[a, b] >= MERGE_CROSSING or cos[a, b] >= MERGE_COSINE:
                src, dst = (a, b) if sizes[a] <= sizes[b] else (b, a)  # the smaller one goes
                out.append(Suggestion(f"merge:{src}>{dst}", "merge", (src, dst), float(max(crossing[a, b], cos[a, b])),
                                      size=int(sizes[src])))
    return out


def move_suggestions(labels: np.ndarray, indices: np.ndarray) -> list[Suggestion]:
    k = int(labels.max()) + 1
    nb = labels[indices]  # [N, kn]
    votes = np.zeros((len(labels), k), dtype=np.int32)
    np.add.at(votes, (np.repeat(np.arange(len(labels)), nb.shape[1]), nb.reshape(-1)), 1)
    votes[np.arange(len(labels)), labels] = -1
    best = votes.argmax(1)
    frac = votes[np.arange(len(labels)), best] / nb.shape[1]
    pick = np.flatnonzero(frac >= MOVE_VOTE)
    out = []
    for (a, b) in sorted({(int(labels[i]), int(best[i])) for i in pick}):
        rows = pick[(labels[pick] == a) & (best[pick] == b)]
        digest = hashlib.sha1(rows.astype(np.int64).tobytes()).hexdigest()[:10]
        out.append(Suggestion(f"move:{a}>{b}:{digest}", "move", (a, b), float(frac[rows].mean()),
                              tuple(int(r) for r in rows), size=len(rows)))
    return out


def split_suggestions(x: np.ndarray, labels: np.ndarray, seed: int = 0, min_size: int = 20) -> list[Suggestion]:
    gains, parts = {}, {}
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) < min_size:
            continue
        xc = x[rows]
        sse1 = float(((xc - xc.mean(0)) ** 2).sum())
        km = KMeans(n_clusters=2, n_init=2, random_state=seed).fit(xc)
        gains[int(c)] = 1.0 - float(km.inertia_) / max(sse1, 1e-12)
        parts[int(c)] = rows[km.labels_ == 1] if (km.labels_ == 1).sum() <= (km.labels_ == 0).sum() else rows[km.labels_ == 0]
    if len(gains) < 3:
        return []
    g = np.array(list(gains.values()))
    med, mad = np.median(g), max(np.median(np.abs(g - np.median(g))) * 1.4826, 1e-6)
    out = []
    for c, gain in gains.items():
        z = (gain - med) / mad
        size = int((labels == c).sum())
        if z >= SPLIT_GAIN_MADS and len(parts[c]) >= MIN_SPLIT_PART * size:
            out.append(Suggestion(f"split:{c}:{size}", "split", (c,), float(z), tuple(int(r) for r in parts[c]), size=size))
    return out


def suggest(x: np.ndarray, labels: np.ndarray, indices: np.ndarray, *, splits: bool = True) -> list[Suggestion]:
    """Every suggestion for the current `labels` [N] of unit rows `x` [N, D] with neighbours `indices` [N, kn];
    moves and merges first (biggest first), then splits."""
    labels = np.asarray(labels, dtype=np.int64)
    found = move_suggestions(labels, indices) + merge_suggestions(x, labels, indices)
    found.sort(key=lambda s: (-s.size * s.score, s.key))
    return found + (split_suggestions(x, labels) if splits else [])
