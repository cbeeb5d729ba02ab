"""k nearest neighbours by cosine similarity: exact chunked matrix products, or a faiss index.

Pure maths on arrays, no I/O. Rows are L2-normalised (cosine = dot product), then every query
chunk is multiplied with every database chunk and a running top-k is merged per query chunk, so
memory is one similarity block (``block_bytes``) plus the normalised database, whatever N is:
200,000 x 1,280 float32 features (1 GiB) or 1,000,000 (5 GiB) fit on a 24 GiB machine. The same
torch code runs on CPU and GPU (`device`). Used by the neighbour trainer (mining SCAN/TEMI
neighbours) and by near-duplicate search.

An approximate index (faiss-cpu's inverted-file index on inner products, optional dependency
`selflabel[ann]`) serves very large N: `method="auto"` takes the exact search up to `EXACT_MAX_ROWS`
rows and the index beyond (the exact one, with a warning, when faiss is missing);
`benchmarks/memory.py` and `benchmarks/neighbors.py` measure its speed and recall against the exact search.
"""
from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

__all__ = ["Neighbors", "knn", "knn_exact", "knn_faiss", "faiss_available", "choose_method", "ann_cells",
           "EXACT_MAX_ROWS", "ANN_NPROBE", "METHODS"]

log = logging.getLogger(__name__)

METHODS = ("exact", "faiss", "auto")
# method="auto": the exact search up to this many rows (N^2 D: about 2.5 min on 2 CPU cores at 50,000 x 1,280,
# well under the feature extraction of that many images), the faiss index beyond (benchmarks/memory.py).
EXACT_MAX_ROWS = 50_000
ANN_NPROBE = 4  # cells searched per query by the faiss index (of ann_cells(N)); recall measured in benchmarks/memory.py

_CPU_BLOCK_BYTES = 64 << 20  # one query-chunk x database-chunk similarity block on CPU
_ACCEL_BLOCK_BYTES = 1 << 30  # on a GPU: big blocks, few launches
_NORM_ROWS = 8192  # rows normalised at a time when copying the database


@dataclass(frozen=True)
class Neighbors:
    """k nearest neighbours of each query: `indices` int64 [Nq, k] into the database and their cosine
    `similarities` float32 [Nq, k], most similar first."""

    indices: np.ndarray
    similarities: np.ndarray

    def __iter__(self):  # `idx, sim = knn(...)`
        return iter((self.indices, self.similarities))


def faiss_available() -> bool:
    """Whether the optional approximate index (faiss-cpu) is installed, without importing it."""
    return importlib.util.find_spec("faiss") is not None


def normalize_rows(x: Any, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L2-normalised copy of `x` [N, D] (numpy, memmap or tensor) on `device`, built chunk by chunk so the
    result is the only N x D array held. Zero rows stay zero."""
    n, d = x.shape
    out = torch.empty((n, d), dtype=dtype, device=device)
    for s in range(0, n, _NORM_ROWS):
        part = x[s:s + _NORM_ROWS]
        part = part if isinstance(part, torch.Tensor) else torch.from_numpy(np.asarray(part, dtype=np.float32))
        out[s:s + _NORM_ROWS] = F.normalize(part.to(device=device, dtype=torch.float32), dim=1).to(dtype)
    return out


def _check(n_query: int, n_db: int, d_query: int, d_db: int, k: int, exclude_self: bool) -> None:
    if d_query != d_db:
        raise InputError(f"queries have {d_query} dimensions but the database has {d_db}")
    available = n_db - (1 if exclude_self else 0)
    if k < 1 or k > available:
        raise InputError(f"neighbours k={k} must be between 1 and {available} "
                         f"(the database has {n_db} rows{', less the query itself' if exclude_self else ''})")


def _block_rows(n_query: int, n_db: int, k: int, device: torch.device, block_bytes: int | None) -> tuple[int, int]:
    """(query rows, database rows) of one similarity block of about `block_bytes` (float32)."""
    budget = block_bytes or (_CPU_BLOCK_BYTES if device.type == "cpu" else _ACCEL_BLOCK_BYTES)
    cells = max(1, budget // 4)
    db_rows = max(1, min(n_db, cells // 1024, 65536))
    q_rows = max(1, min(n_query, cells // (db_rows + k)))
    return q_rows, db_rows


@torch.no_grad()
def knn_exact(queries: Any, k: int, database: Any | None = None, *, exclude_self: bool = False,
              device: str | torch.device = "cpu", normalized: bool = False,
              block_bytes: int | None = None) -> Neighbors:
    """Exact k nearest neighbours of each query row among the database rows, by cosine similarity.

    `queries` [Nq, D], `database` [Nd, D] (default: the queries themselves); numpy arrays, memmaps or
    tensors. `exclude_self` (only without a separate database) drops each row's own index, not rows
    equal to it, so exact duplicates are still found. `normalized=True` trusts that the rows are
    already unit-norm tensors on `device` and skips the copy. Equal similarities are listed by index.
    """
    device = torch.device(device)
    same = database is None
    if exclude_self and not same:
        raise InputError("exclude_self needs the queries to be the database (leave database unset)")
    db_in = queries if same else database
    _check(queries.shape[0], db_in.shape[0], queries.shape[1], db_in.shape[1], k, exclude_self)
    db = db_in if normalized and isinstance(db_in, torch.Tensor) else normalize_rows(db_in, device)
    db = db.to(device)
    nq, nd = queries.shape[0], db.shape[0]
    q_rows, d_rows = _block_rows(nq, nd, k, device, block_bytes)
    out_idx = np.empty((nq, k), dtype=np.int64)
    out_sim = np.empty((nq, k), dtype=np.float32)
    for qs in range(0, nq, q_rows):
        qe = min(nq, qs + q_rows)
        q = db[qs:qe] if same else (queries[qs:qe].to(device) if normalized and isinstance(queries, torch.Tensor)
                                    else normalize_rows(queries[qs:qe], device))
        best_sim = torch.full((qe - qs, k), -math.inf, device=device)
        best_idx = torch.full((qe - qs, k), -1, dtype=torch.long, device=device)
        for ds in range(0, nd, d_rows):
            de = min(nd, ds + d_rows)
            sim = q @ db[ds:de].T
            if exclude_self and ds < qe and qs < de:  # this block holds some queries' own rows
                rows = torch.arange(max(qs, ds), min(qe, de), device=device)
                sim[rows - qs, rows - ds] = -math.inf
            kk = min(k, de - ds)
            s, i = sim.topk(kk, dim=1)
            # merge: earlier (lower-index) candidates first, so a stable sort breaks ties by index
            cand_sim = torch.cat([best_sim, s], dim=1)
            cand_idx = torch.cat([best_idx, i + ds], dim=1)
            order = _stable_desc(cand_sim, cand_idx)[:, :k]
            best_sim = cand_sim.gather(1, order)
            best_idx = cand_idx.gather(1, order)
        out_idx[qs:qe] = best_idx.cpu().numpy()
        out_sim[qs:qe] = best_sim.float().cpu().numpy()
    return Neighbors(out_idx, out_sim)


def _stable_desc(sim: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Column order sorting each row by similarity (descending), ties by index (ascending)."""
    by_index = idx.argsort(dim=1, stable=True)
    s = sim.gather(1, by_index)
    return by_index.gather(1, s.argsort(dim=1, descending=True, stable=True))


def ann_cells(n: int) -> int:
    """Inverted-file cells for an index of `n` rows: 2 sqrt(n) (2,000 at 1,000,000), at least 39 rows per cell
    (faiss's floor for training). Fewer, larger cells would make each query scan more rows; more cells make the
    coarse assignment (n x cells) and the training dearer."""
    return int(max(1, min(n // 39, round(2 * math.sqrt(n)))))


def _unit_rows(x: Any, normalized: bool) -> np.ndarray:
    """Contiguous float32 rows of `x` (a chunk), L2-normalised unless `normalized` says they already are."""
    part = x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    part = np.ascontiguousarray(part, dtype=np.float32)
    if normalized:
        return part
    return part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)


def knn_faiss(queries: Any, k: int, database: Any | None = None, *, exclude_self: bool = False,
              nlist: int | None = None, nprobe: int = ANN_NPROBE, seed: int = 0, normalized: bool = False,
              train_per_cell: int = 64, niter: int = 10, chunk: int = 65536) -> Neighbors:
    """Approximate k nearest neighbours by cosine with faiss-cpu (`pip install faiss-cpu`): an inverted-file
    index (IndexIVFFlat, inner product on unit rows; Jegou et al. 2011, "Product quantization for nearest
    neighbor search") of `nlist` cells (default `ann_cells(N)`), the `nprobe` cells nearest each query searched.

    Built for N = 1,000,000: the cells are trained on `train_per_cell` rows each (a seeded sample, `niter`
    k-means rounds), rows are normalised and added `chunk` at a time (the index holds the only full copy;
    `normalized=True` trusts the input's unit rows and skips the per-chunk copy), and without a separate
    database each row's cells are found once and used both to file it and to search from it. Recall
    against `knn_exact` is measured in benchmarks/neighbors.py and benchmarks/memory.py."""
    try:
        import faiss
    except ImportError:
        raise InputError("the approximate neighbour index needs faiss-cpu: pip install faiss-cpu") from None
    same = database is None
    if exclude_self and not same:
        raise InputError("exclude_self needs the queries to be the database (leave database unset)")
    db_in = queries if same else database
    _check(queries.shape[0], db_in.shape[0], queries.shape[1], db_in.shape[1], k, exclude_self)
    if nprobe < 1:
        raise InputError(f"neighbour index nprobe={nprobe} must be at least 1")
    n, d = db_in.shape
    nlist = int(nlist or ann_cells(n))
    nprobe = min(nprobe, nlist)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed, index.cp.niter = seed, niter
    sample = np.arange(n) if n <= train_per_cell * nlist else \
        np.sort(np.random.default_rng(seed).choice(n, train_per_cell * nlist, replace=False))
    index.train(_unit_rows(db_in[sample], normalized))
    index.nprobe = nprobe
    # the nprobe nearest cells of every database row: the first files the row, all are searched when it queries
    cells = np.empty((n, nprobe), dtype=np.int64)
    cell_sim = np.empty((n, nprobe), dtype=np.float32)
    for s in range(0, n, chunk):
        part = _unit_rows(db_in[s:s + chunk], normalized)
        cell_sim[s:s + len(part)], cells[s:s + len(part)] = quantizer.search(part, nprobe)
        first = np.ascontiguousarray(cells[s:s + len(part), 0])
        index.add_core(len(part), faiss.swig_ptr(part), None, faiss.swig_ptr(first))
    extra = 1 if exclude_self else 0
    nq = queries.shape[0]
    out_idx = np.empty((nq, k + extra), dtype=np.int64)
    out_sim = np.empty((nq, k + extra), dtype=np.float32)
    for s in range(0, nq, chunk):
        part = _unit_rows(queries[s:s + chunk], normalized)
        if same:
            c, cs = cells[s:s + len(part)], cell_sim[s:s + len(part)]
        else:
            cs, c = quantizer.search(part, nprobe)
        out_sim[s:s + len(part)], out_idx[s:s + len(part)] = index.search_preassigned(
            part, k + extra, np.ascontiguousarray(c), np.ascontiguousarray(cs))
    if exclude_self:
        out_sim, out_idx = _drop_self(out_sim, out_idx, k)
    return Neighbors(out_idx, out_sim)


def _drop_self(sim: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index from its k+1 results (or the last one when it was not found)."""
    own = idx == np.arange(len(idx))[:, None]
    own[~own.any(1), -1] = True
    keep = ~own
    return sim[keep].reshape(len(idx), k), idx[keep].reshape(len(idx), k)


def choose_method(n_rows: int, method: str = "auto") -> str:
    """The search `knn` runs for a database of `n_rows`: `method` itself, or for "auto" the exact one up to
    `EXACT_MAX_ROWS` rows and the faiss index beyond (exact, with a one-line warning, when faiss is missing)."""
    if method not in METHODS:
        raise InputError(f"neighbour method '{method}' is unknown (choose {', '.join(METHODS)})")
    if method != "auto":
        return method
    if n_rows <= EXACT_MAX_ROWS:
        return "exact"
    if faiss_available():
        log.info("neighbours: %d rows > %d, approximate faiss IVF index (nprobe %d)", n_rows, EXACT_MAX_ROWS, ANN_NPROBE)
        return "faiss"
    log.warning("neighbours: %d rows > %d but faiss-cpu is not installed: exact search, time grows as N^2 "
                "(pip install faiss-cpu, or selflabel[ann])", n_rows, EXACT_MAX_ROWS)
    return "exact"


def knn(queries: Any, k: int, database: Any | None = None, *, exclude_self: bool = False,
        device: str | torch.device = "cpu", method: str = "exact", **kwargs: Any) -> Neighbors:
    """k nearest neighbours by cosine: `method` "exact" (`knn_exact`), "faiss" (`knn_faiss`, approximate) or
    "auto" (`choose_method` by the database size)."""
    n_db = (queries if database is None else database).shape[0]
    if choose_method(n_db, method) == "exact":
        return knn_exact(queries, k, database, exclude_self=exclude_self, device=device, **kwargs)
    return knn_faiss(queries, k, database, exclude_self=exclude_self, **kwargs)
