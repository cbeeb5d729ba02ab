"""A number of parts chosen without labels: the K whose concepts are most reproducible across part seeds.

The parts are an overclustering, so their number has no true value to recover; what matters is the
concepts made from them. With too few parts a part straddles two kinds of thing and no graph can
separate them; with too many the co-occurrence graph gets sparse and Louvain merges parts
differently for every fit. So for each K of a grid the whole concept step (parts, CBFE, graph,
resolution rule, Louvain) is fitted with `n_seeds` part seeds on a patch sample, every fit labels
the same fixed sample of patches with its concepts, and the stability of K is the mean pairwise adjusted
Rand index of those labellings (clustering stability, von Luxburg 2010, applied to the output the
user gets rather than to the parts). The rule keeps the most stable K (the smaller one on a tie).

No label is read; the same features, grid and seed give the same choice.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from ..metrics import ari


def labelling_stability(labellings: Sequence[np.ndarray]) -> tuple[float, float]:
    """(mean, min) pairwise adjusted Rand index of several labellings of the same items."""
    if len(labellings) < 2:
        raise ValueError("labelling_stability: needs at least two labellings")
    pair = [ari(a, b) for a, b in itertools.combinations(labellings, 2)]
    return float(np.mean(pair)), float(np.min(pair))


def choose_k_parts(curve: Sequence[dict[str, Any]]) -> int:
    """The K of a stability curve (entries with `k_parts` and `stability`) with the highest stability;
    a tie goes to the smaller K (cheaper, and coarser parts are the conservative side)."""
    if not curve:
        raise ValueError("choose_k_parts: empty curve")
    best = max(curve, key=lambda c: (round(float(c["stability"]), 6), -int(c["k_parts"])))
    return int(best["k_parts"])
