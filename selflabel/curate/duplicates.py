"""Near-duplicate groups: re-encoded, resized, slightly cropped or flipped copies of one photo.

Two images are near-duplicates when the cosine similarity of their centred features is at least
`DUPLICATE_THRESHOLD` and stands out from their neighbourhoods: it beats the k-th neighbour
similarity of both images by `DUPLICATE_MARGIN` (a copy is far closer than anything else, while
distinct photos in a dense region are all about equally close). Measured on imagenette-val with
mobilenet_v2 features and 160 copies (JPEG-30, half size, 10 % crop, flip) of 40 photos: copies
have cosine 0.76-0.97, while 5 % of distinct photos have a nearest neighbour above 0.77; the
threshold alone cannot separate them, the margin can (recall 1.0, 1.6 % of distinct photos grouped;
tests/test_curate_duplicates.py). Pairs come from the k nearest
neighbours (`selflabel.neighbors`, chunked: memory stays one similarity block plus the features,
so 1,000,000 rows fit), groups are the connected components of those pairs, and each group keeps
its lowest row as the original: `duplicate_of[i]` is that row, or -1 for an image with no copy
and for the original itself.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..runfiles import LabelRow

DUPLICATE_THRESHOLD = 0.75  # cosine of centred features; see the module docstring
DUPLICATE_MARGIN = 0.15  # over the k-th neighbour similarity of both images (k = the neighbours given, 10 in a run)
DUPLICATE_COLUMN = "duplicate_of"  # labels.csv: the path of the kept copy, empty otherwise


def duplicate_pairs(indices: np.ndarray, similarities: np.ndarray, threshold: float = DUPLICATE_THRESHOLD,
                    margin: float = DUPLICATE_MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """Rows (i, j) of every near-duplicate pair among k-NN results [N, k] (most similar first) of all N rows."""
    ref = similarities[:, -1]  # each image's k-th neighbour similarity
    rows = np.repeat(np.arange(indices.shape[0]), indices.shape[1])
    cols, sims = indices.reshape(-1), similarities.reshape(-1)
    ok = cols >= 0
    keep = ok & (sims >= threshold)
    keep[ok] &= sims[ok] - np.maximum(ref[rows[ok]], ref[cols[ok]]) >= margin
    return rows[keep], cols[keep]


def duplicate_of(indices: np.ndarray, similarities: np.ndarray, threshold: float = DUPLICATE_THRESHOLD,
                 margin: float = DUPLICATE_MARGIN) -> np.ndarray:
    """int64 [N]: the row each image is a near-duplicate of (lowest row of its group), -1 if none."""
    n = indices.shape[0]
    i, j = duplicate_pairs(indices, similarities, threshold, margin)
    if len(i) == 0:
        return np.full(n, -1, dtype=np.int64)
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    first = np.full(comp.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(n))
    out = first[comp]
    out[out == np.arange(n)] = -1
    return out


def duplicate_paths(rows: Iterable[LabelRow]) -> set[str]:
    """Paths marked as a copy of another image in labels.csv (the originals are not in it)."""
    return {r.path for r in rows if r.extra.get(DUPLICATE_COLUMN)}


def without_duplicates(rows: Sequence[LabelRow]) -> list[LabelRow]:
    """`rows` less the near-duplicate copies: one image per group is kept. The hook for exports."""
    drop = duplicate_paths(rows)
    return [r for r in rows if r.path not in drop]
