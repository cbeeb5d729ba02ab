"""The effort benchmark's simulated reviewer: a suggestion it accepted or dismissed is not shown again (as in the app)."""
from __future__ import annotations

import numpy as np

from benchmarks import review_effort
from selflabel.curate.suggestions import Suggestion
from selflabel.neighbors import Neighbors


def test_decided_suggestions_are_not_checked_again(monkeypatch):
    y = np.array([0] * 10 + [1] * 10)
    labels = np.array([0] * 8 + [1] * 2 + [1] * 10)  # rows 8, 9 are class 0 but sit in cluster 1
    good = Suggestion("move:1>0:a", "move", (1, 0), 1.0, (8, 9), size=2)  # right: accepted
    bad = Suggestion("move:0>1:b", "move", (0, 1), 1.0, (0, 1), size=2)  # wrong: dismissed
    monkeypatch.setattr(review_effort, "suggest", lambda x, labels, nb: [good, bad])  # offered every round
    monkeypatch.setattr(review_effort, "neighbours_of", lambda x: Neighbors(np.zeros((20, 1), np.int64),
                                                                           np.zeros((20, 1), np.float32)))
    r = review_effort.Reviewer(np.eye(20, dtype=np.float32), y, labels.copy(), names={0: 0, 1: 1})
    r.suggestions()
    assert (r.labels == y).all()
    # each decided once: 2 images looked at + 1 action, twice; no second round of the same two
    assert r.cost == 2 * (2 + 1)
