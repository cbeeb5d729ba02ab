"""Exact chunked k-NN equals brute force; self exclusion; faiss index when installed; bad settings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from selflabel.errors import InputError
from selflabel.neighbors import Neighbors, faiss_available, knn, knn_exact, knn_faiss


def brute_force(q: np.ndarray, db: np.ndarray, k: int, exclude_self: bool = False):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    dn = db / np.linalg.norm(db, axis=1, keepdims=True)
    sim = qn.astype(np.float64) @ dn.astype(np.float64).T
    if exclude_self:
        np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sim, order, 1)


@pytest.mark.parametrize("block_bytes", [None, 4096, 50_000])  # one block; many tiny blocks in both directions
@pytest.mark.parametrize("exclude_self", [False, True])
def test_exact_equals_brute_force(block_bytes, exclude_self):
    x = np.random.default_rng(0).normal(size=(300, 24)).astype(np.float32)
    idx, sim = knn_exact(x, 7, exclude_self=exclude_self, block_bytes=block_bytes)
    ref_idx, ref_sim = brute_force(x, x, 7, exclude_self)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sim, ref_sim, atol=1e-5)
    assert idx.dtype == np.int64 and sim.dtype == np.float32
    assert (np.diff(sim, axis=1) <= 1e-7).all()  # sorted, most similar first
    if exclude_self:
        assert not (idx == np.arange(300)[:, None]).any()
    else:
        np.testing.assert_array_equal(idx[:, 0], np.arange(300))  # each row is its own nearest


def test_separate_database_and_memmap(tmp_path):
    rng = np.random.default_rng(1)
    db = rng.normal(size=(500, 16)).astype(np.float32)
    q = rng.normal(size=(40, 16)).astype(np.float32)
    np.save(tmp_path / "db.npy", db)
    mm = np.load(tmp_path / "db.npy", mmap_mode="r")
    res = knn_exact(q, 5, mm, block_bytes=8192)
    ref_idx, ref_sim = brute_force(q, db, 5)
    np.testing.assert_array_equal(res.indices, ref_idx)
    np.testing.assert_allclose(res.similarities, ref_sim, atol=1e-5)
    assert isinstance(res, Neighbors)


def test_exact_duplicates_are_found_but_self_is_not():
    x = np.random.default_rng(2).normal(size=(50, 8)).astype(np.float32)
    x[10] = x[3]  # an exact duplicate
    idx, sim = knn_exact(x, 1, exclude_self=True)
    assert idx[3, 0] == 10 and idx[10, 0] == 3
    assert sim[3, 0] == pytest.approx(1.0, abs=1e-6)


def test_ties_are_listed_by_index():
    x = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], dtype=np.float32)
    idx, _ = knn_exact(x, 3, block_bytes=16)
    np.testing.assert_array_equal(idx[:3], [[0, 1, 2]] * 3)


def test_torch_input_and_normalized_flag():
    x = torch.nn.functional.normalize(torch.randn(120, 10, generator=torch.Generator().manual_seed(3)), dim=1)
    a = knn_exact(x, 4, normalized=True)
    b = knn_exact(x.numpy() * 5.0, 4)  # scale does not matter for cosine
    np.testing.assert_array_equal(a.indices, b.indices)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_gpu_equals_cpu():
    x = np.random.default_rng(4).normal(size=(2000, 32)).astype(np.float32)
    a = knn_exact(x, 10, exclude_self=True)
    b = knn_exact(x, 10, exclude_self=True, device="cuda")
    np.testing.assert_array_equal(a.indices, b.indices)


@pytest.mark.parametrize("k, exclude_self", [(0, False), (50, False), (50, True), (49, True)])
def test_bad_k(k, exclude_self):
    x = np.ones((50, 4), dtype=np.float32) + np.arange(50)[:, None]
    if k == 49 and exclude_self:
        assert knn_exact(x, k, exclude_self=True).indices.shape == (50, 49)
        return
    if k == 50 and not exclude_self:
        assert knn_exact(x, k).indices.shape == (50, 50)
        return
    with pytest.raises(InputError, match="neighbours k="):
        knn_exact(x, k, exclude_self=exclude_self)


def test_bad_inputs():
    x = np.zeros((10, 4), dtype=np.float32)
    with pytest.raises(InputError, match="dimensions"):
        knn_exact(x, 2, np.zeros((10, 5), dtype=np.float32))
    with pytest.raises(InputError, match="exclude_self"):
        knn_exact(x, 2, x, exclude_self=True)
    with pytest.raises(InputError, match="unknown"):
        knn(x, 2, method="annoy")


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu not installed")
def test_faiss_recall_against_exact():
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(20, 32))
    x = (centres[rng.integers(0, 20, 4000)] + 0.3 * rng.normal(size=(4000, 32))).astype(np.float32)
    exact = knn_exact(x, 10, exclude_self=True)
    approx = knn_faiss(x, 10, exclude_self=True, nprobe=8)
    assert not (approx.indices == np.arange(4000)[:, None]).any()
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.indices, approx.indices)])
    assert recall > 0.9
