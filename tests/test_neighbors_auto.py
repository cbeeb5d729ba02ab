"""method="auto": the exact search up to EXACT_MAX_ROWS, the faiss index beyond, exact with a warning
without faiss; the index's near-duplicate groups match the exact ones on a planted set."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from selflabel import neighbors
from selflabel.curate.duplicates import duplicate_of
from selflabel.curate.prepare import centred_unit
from selflabel.curate.run import neighbours_of
from selflabel.errors import InputError

needs_faiss = pytest.mark.skipif(not neighbors.faiss_available(), reason="faiss-cpu not installed")


def planted(n: int = 3000, d: int = 48, copies: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered rows with `copies` noisy copies (cosine about 0.95) of other rows; (rows, planted copy rows)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, d))
    x = (centres[rng.integers(0, 30, n)] + rng.normal(size=(n, d))).astype(np.float32)
    dst = rng.choice(np.arange(n // 2, n), copies, replace=False)
    src = rng.integers(0, n // 2, copies)
    x[dst] = x[src] + 0.3 * rng.normal(size=(copies, d)).astype(np.float32)
    return x, np.sort(dst)


class Spy:
    """Wraps a search function and records the row counts it was called with."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, queries, *args, **kwargs):
        self.calls.append(queries.shape[0])
        return self.fn(queries, *args, **kwargs)


@pytest.fixture
def spies(monkeypatch):
    exact, index = Spy(neighbors.knn_exact), Spy(neighbors.knn_faiss)
    monkeypatch.setattr(neighbors, "knn_exact", exact)
    monkeypatch.setattr(neighbors, "knn_faiss", index)
    monkeypatch.setattr(neighbors, "EXACT_MAX_ROWS", 200)
    return exact, index


def test_auto_picks_exact_at_the_cut_and_the_index_above(spies, monkeypatch):
    monkeypatch.setattr(neighbors, "faiss_available", lambda: True)
    assert neighbors.choose_method(200) == "exact"
    assert neighbors.choose_method(201) == "faiss"
    assert neighbors.choose_method(10_000, "exact") == "exact"  # an explicit method is kept
    exact, index = spies
    index.fn = exact.fn  # stands in for faiss: dispatch only
    x, _ = planted(300)
    neighbours_of(centred_unit(x[:200]))  # a run's curation: method "auto" by default
    neighbours_of(centred_unit(x))
    assert exact.calls == [200] and index.calls == [300]


@needs_faiss
def test_index_duplicates_match_the_exact_ones():
    x, copies = planted()
    u = centred_unit(x)
    exact = neighbours_of(u, method="exact")
    approx = neighbours_of(u, method="faiss")
    dup_exact = duplicate_of(exact.indices, exact.similarities)
    dup_approx = duplicate_of(approx.indices, approx.similarities)
    assert set(np.flatnonzero(dup_exact >= 0)) >= set(copies)  # the planted copies are found at all
    np.testing.assert_array_equal(dup_approx, dup_exact)
    assert not (approx.indices == np.arange(len(x))[:, None]).any()  # self excluded
    # the similarities the index returns are true cosines of the rows it returns
    true = np.einsum("nd,nkd->nk", u, u[approx.indices])
    np.testing.assert_allclose(approx.similarities, true, atol=1e-4)


@needs_faiss
def test_index_is_searched_above_the_cut(spies):
    x, _ = planted(300)
    exact, index = spies
    nb = neighbours_of(centred_unit(x))
    assert index.calls == [300] and exact.calls == []
    assert nb.indices.shape == (300, 10)


def test_without_faiss_auto_warns_once_and_searches_exactly(spies, monkeypatch, caplog):
    monkeypatch.setattr(neighbors, "faiss_available", lambda: False)
    exact, index = spies
    x, _ = planted(300)
    u = centred_unit(x)
    with caplog.at_level(logging.INFO, logger="selflabel.neighbors"):
        nb = neighbours_of(u)
    assert exact.calls == [300] and index.calls == []
    lines = [r.getMessage() for r in caplog.records if r.name == "selflabel.neighbors"]
    assert len(lines) == 1 and caplog.records[-1].levelno == logging.WARNING
    assert "faiss-cpu is not installed" in lines[0] and "exact" in lines[0] and "\n" not in lines[0]
    ref = neighbors.knn_exact.fn(u, 10, exclude_self=True)
    np.testing.assert_array_equal(nb.indices, ref.indices)


def test_unknown_method_names_the_choices():
    with pytest.raises(InputError, match="exact, faiss, auto"):
        neighbors.knn(np.ones((5, 2), np.float32), 2, method="annoy")
