"""Kernel-domain (scaling form) passes: the first scan of the scores and the Sinkhorn iterations on
``K = exp((scores - rowmax) / eps)`` held in the plan buffer or recomputed per row chunk.

An iteration is ``u = a / (K v)`` then ``v = b / (K^T u)`` (SeLa's ``sinkhornknopp.py`` form). Both
products need the same rows of K, so they run over cache-sized row chunks: each chunk is read from
memory once per iteration (on a GPU one Triton pass does the same, ``triton_pass.py``). After the
``u`` update the rows are exact and ``v * (K^T u)`` are the column sums of the current plan, so the
marginal error costs nothing extra. Over-relaxed steps (``relax.py``) also keep the plain ``u`` and
take ``K^T u`` for both in one small GEMM: the error is always that of the plan with exact rows.

A kernel whose float32 entries are mostly exact zeros (peaked scores at a small eps: SeLa's
``P ** lambda`` after the row shift is ~97 % zeros at 50k x 1,000) is iterated on a CSR copy of its
nonzeros, per row group: the same matrix, not an approximation (a zero adds nothing to any sum), read
in a tenth of the bytes. The plan is still the dense buffer, scaled once at the end.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.sparse
import torch
from torch import Tensor

from . import backend as B
from . import triton_pass
from .problem import Problem
from .rows import RowBlocks


# --------------------------------------------------------------------------------------------
# the first pass


def scan(p: Problem, out: Tensor | None = None):
    """One pass over the scores: row maxima m [n], the smallest row maximum (global) and, per column,
    ``log_top[j] = max_i (scores[i, j] - m_i) / eps``: how small the best entry of column j of the
    row-shifted kernel ``exp((scores - m) / eps)`` is, i.e. whether the kernel can represent it.

    With ``out`` the same pass writes that kernel into ``out`` (each chunk while it is in cache) and
    takes two column sums with one small GEMM: the plain sums, whose log stands in for ``log_top``
    (the same test up to log N, without a max pass), and the sums with row weights
    ``exp((m_i - M) / eps)``, M a running maximum: ``K^T u0`` for a uniform ``u0``, POT's first
    column normalisation. Returns (m, m_min, log_top, log K^T u0 or None, M or None), all global.
    """
    m = torch.empty(p.n, dtype=p.dt, device=p.device)
    mb, inv = B.backend(m), 1.0 / p.eps
    ob = B.backend(out) if out is not None else None
    xp = B.xp_for(p.device)
    with RowBlocks(p) as rb:
        parts = [r for r in rb.map(lambda s0, e0: _scan_block(p, rb, mb, ob, inv, s0, e0)) if r[0] is not None]
    if p.n and not bool(xp.isfinite(mb).all()):
        raise ValueError("scores contain NaN/+inf, or a row that is -inf everywhere")
    m_min = float(mb.min()) if p.n else math.inf
    if out is None:
        log_top, m_min = _merge_maxima(p, parts, m_min, inv)
        log_ktu, M = None, None
    else:
        log_top, log_ktu, M, m_min = _merge_sums(p, parts, m_min, inv)
    if not bool((log_top > -math.inf).all()):
        if out is not None:  # a float sum underflowed; only the max scan can tell -inf apart
            return m, m_min, scan(p)[2], log_ktu, M
        raise ValueError("scores have a column that is -inf everywhere: no mass can reach it")
    return m, m_min, log_top, log_ktu, M  # log_top, log_ktu: float64 backend arrays


def _scan_block(p: Problem, rb: RowBlocks, mb, ob, inv: float, s0: int, e0: int):
    """Rows s0:e0 of :func:`scan`: (column maxima of scores - m, None) without ``ob``; with it
    ([plain; weighted] column sums of the kernel written into ``ob``, their reference maximum)."""
    xp = B.xp_for(p.device)
    if ob is None:
        acc, work = None, B.scratch((rb.rows, p.k), p.dt, p.device)
        for s, e in rb.chunks(s0, e0):
            gg = B.block_stats(rb.scores(s, e), mb[s:e], work[: e - s])
            acc = gg if acc is None else xp.maximum(acc, gg)
        return acc, -math.inf
    acc = B.scratch((2, p.k), torch.float64, p.device, fill=0.0)
    w = B.scratch((2, rb.rows), p.dt, p.device, fill=1.0)
    tmp = B.scratch((2, p.k), p.dt, p.device)
    top = -math.inf  # running max of the row maxima, the reference of the weighted sums
    for s, e in rb.chunks(s0, e0):
        mc, o = mb[s:e], ob[s:e]
        B.kernel_into(rb.scores(s, e), mc, inv, o, row_max=mc)
        hi = float(mc.max())
        if hi > top:  # move the weighted sums to the new reference
            acc[1] *= math.exp((top - hi) * inv) if top > -math.inf else 0.0
            top = hi
        wc = w[:, : e - s]
        xp.exp((mc - top) * inv, out=wc[1])
        B.dot(wc, o, tmp)  # [1; w]^T K on the chunk just written
        acc += tmp
    return acc, top


def _merge_maxima(p: Problem, parts, m_min: float, inv: float):
    """Global log_top and smallest row maximum: one all-reduce (max)."""
    xp = B.xp_for(p.device)
    stats_t = B.zeros64(p.k + 1, p.device)
    stats = B.backend(stats_t)
    stats[:] = -math.inf
    for acc, _ in parts:
        stats[: p.k] = xp.maximum(stats[: p.k], B.cast(acc, torch.float64) * inv)
    stats[p.k] = -m_min
    B.all_reduce(stats_t, p.world, "max")
    return stats[: p.k], -float(stats[p.k])


def _merge_sums(p: Problem, parts, m_min: float, inv: float):
    """Global log column sums, plain and weighted relative to the global max score M: one max and
    one sum all-reduce. Returns (log plain sums, log K^T u0, M, m_min)."""
    xp = B.xp_for(p.device)
    top = torch.tensor([max([t for _, t in parts], default=-math.inf), -m_min], dtype=torch.float64,
                       device=p.device)
    B.all_reduce(top, p.world, "max")
    M, m_min = float(top[0]), -float(top[1])
    sums_t = B.zeros64(2 * p.k, p.device)
    sums = B.backend(sums_t).reshape(2, p.k)
    for acc, t in parts:
        sums[0] += acc[0]
        if t > -math.inf:
            sums[1] += acc[1] * math.exp((t - M) * inv)
    B.all_reduce(sums_t, p.world)
    return xp.log(sums[0]), xp.log(sums[1]), M, m_min


# --------------------------------------------------------------------------------------------
# the iterations

SPARSE_DENSITY = 0.1  # iterate on a CSR copy of the kernel's nonzeros below this fraction (CPU)


def sparse_groups(K: np.ndarray, rb: RowBlocks) -> dict[int, scipy.sparse.csr_matrix] | None:
    """Per row group (keyed by its first row), a CSR copy of the kernel's nonzero entries, when
    fewer than ``SPARSE_DENSITY`` of them are nonzero; else None (one counting pass decides)."""
    nnz = sum(rb.map(lambda s0, e0: int(np.count_nonzero(K[s0:e0] != 0))))  # (booleans: 3x faster)
    if K.size == 0 or nnz > SPARSE_DENSITY * K.size:
        return None
    return dict(zip([s0 for s0, _ in rb.groups], rb.map(lambda s0, e0: dense_to_csr(K[s0:e0]))))


def dense_to_csr(block: np.ndarray) -> scipy.sparse.csr_matrix:
    """``scipy.sparse.csr_matrix(block)`` built from one boolean nonzero scan (3x faster than scipy's
    conversion through COO; numpy's nonzero is 3x faster on booleans than on floats)."""
    rows, k = block.shape
    flat = np.flatnonzero(block != 0)
    indptr = np.zeros(rows + 1, dtype=np.int64 if len(flat) >= 2**31 else np.int32)
    np.cumsum(np.bincount(flat // k, minlength=rows), out=indptr[1:])
    return scipy.sparse.csr_matrix((block.reshape(-1)[flat], (flat % k).astype(indptr.dtype), indptr), shape=(rows, k))


class ScalingPass:
    """One scaling-form iteration over the row blocks, and the final scaling of the plan.

    State: ``U[1]`` = u (the iterate, float dt), ``U[0]`` = the plain ``a / (K v)`` of the last
    relaxed iteration (in plain iterations ``U[1]`` is that), ``v`` = exp(g) in dt. ``K`` is the
    kernel in the plan buffer, or None to recompute each chunk from the scores (``return_plan=False``).
    """

    def __init__(self, p: Problem, m: Tensor, plan: Tensor | None, rb: RowBlocks):
        self.p, self.rb, self.inv = p, rb, 1.0 / p.eps
        dt, dev = p.dt, p.device
        self.a = B.cast(B.backend(p.a), dt)
        self.U = B.scratch((2, p.n), dt, dev)
        self.v = B.scratch((p.k,), dt, dev)
        self.m = B.backend(m)
        self.K = B.backend(plan) if plan is not None else None
        self.fused = self.K is not None and triton_pass.available(self.K)
        self.sparse = sparse_groups(self.K, rb) if isinstance(self.K, np.ndarray) else None
        self.hat = 1  # the row of U holding the plain u of the last iteration

    def iterate(self, omega: float, last: bool):
        """u from v (relaxed by ``omega``) and the global column sums: (K^T u_plain, K^T u); the same
        array when ``omega == 1``. ``last``: also scale each chunk into the plan while in cache."""
        relaxed = omega != 1.0
        self.hat = 0 if relaxed else 1
        parts = self.rb.map(lambda s0, e0: self._block(s0, e0, omega, last))
        col_t = B.zeros64(2 * self.p.k if relaxed else self.p.k, self.p.device)
        col = B.backend(col_t)
        for c in parts:
            col += c.reshape(-1)
        B.all_reduce(col_t, self.p.world)  # (in place: col is a view of col_t)
        if relaxed:
            col = col.reshape(2, self.p.k)
            return col[0], col[1]
        return col, col

    def _block(self, s0: int, e0: int, omega: float, last: bool):
        """Rows s0:e0: u = a / (K v) chunk by chunk, relaxed, and the chunk's K^T u (each read once)."""
        p, U, relaxed = self.p, self.U, omega != 1.0
        if self.sparse is not None:
            return self._sparse_block(s0, e0, omega, last)
        acc = B.scratch((2, p.k) if relaxed else (p.k,), torch.float64, p.device, fill=0.0)
        if self.fused and not relaxed:  # GPU: one Triton pass over the rows, K read once
            triton_pass.fused_pass(self.K[s0:e0], self.v, self.a[s0:e0], U[1, s0:e0], acc)
            if last:
                self._finish_chunk(s0, e0)
            return acc
        tmp = B.scratch(acc.shape, p.dt, p.device)
        kv = B.scratch((self.rb.rows,), p.dt, p.device)
        work = None if self.K is not None else B.scratch((self.rb.rows, p.k), p.dt, p.device)
        for s, e in self.rb.chunks(s0, e0):
            Kc = self._kernel_rows(s, e, work)
            B.dot(Kc, self.v, kv[: e - s])  # K v
            if relaxed:
                B.div(self.a[s:e], kv[: e - s], U[0, s:e])  # the plain step
                B.relax_into(U[1, s:e], U[0, s:e], omega, U[1, s:e])
                B.dot(U[:, s:e], Kc, tmp)  # K^T [u_plain; u], same chunk, still in cache
            else:
                B.div(self.a[s:e], kv[: e - s], U[1, s:e])
                B.dot(U[1, s:e], Kc, tmp)
            acc += tmp
            if last:
                self._finish_chunk(s, e)
        return acc

    def _sparse_block(self, s0: int, e0: int, omega: float, last: bool):
        """:meth:`_block` on the group's CSR copy of the kernel (CPU, numpy arrays)."""
        K, U = self.sparse[s0], self.U
        kv = K @ self.v  # K v
        if omega != 1.0:
            np.divide(self.a[s0:e0], kv, out=U[0, s0:e0])
            B.relax_into(U[1, s0:e0], U[0, s0:e0], omega, U[1, s0:e0])
            Kt = K.T
            acc = np.stack([Kt @ U[0, s0:e0], Kt @ U[1, s0:e0]])  # K^T [u_plain; u] (two matvecs: faster than one with two columns)
        else:
            np.divide(self.a[s0:e0], kv, out=U[1, s0:e0])
            acc = K.T @ U[1, s0:e0]
        if last:
            for s, e in self.rb.chunks(s0, e0):
                self._finish_chunk(s, e)
        return acc.astype(np.float64)

    def _kernel_rows(self, s: int, e: int, work):
        if self.K is not None:
            return self.K[s:e]
        Kc = work[: e - s]  # streamed: recompute the kernel rows (one exp per entry per iteration)
        B.kernel_into(self.rb.scores(s, e), self.m[s:e], self.inv, Kc)
        return Kc

    def _finish_chunk(self, s: int, e: int) -> None:
        """Scale kernel rows into the plan; log u in the unshifted frame:
        P = u exp((S - m)/eps) v = exp(S/eps + log u - m/eps + log v)."""
        u = self.U[self.hat, s:e]
        if self.K is not None:
            B.scale_rows(self.K[s:e], u, self.v)
        xp = B.xp_of(self.f)
        self.f[s:e] = xp.log(B.cast(u, torch.float64)) - B.cast(self.m[s:e], torch.float64) * self.inv

    def finish(self, f: Tensor, scaled: bool) -> None:
        """Write log u into ``f`` and, unless the last iteration did (``scaled``), scale the plan."""
        self.f = B.backend(f)
        if not scaled:
            self.rb.map(lambda s0, e0: [self._finish_chunk(s, e) for s, e in self.rb.chunks(s0, e0)])


def kernel_iterations(p: Problem, m: Tensor, plan: Tensor | None, g, f: Tensor, budget: int,
                      stop_on_tol: bool, tol: float, check: int, sched, lazy: bool):
    """Scaling-form iterations from ``g = log v`` (float64 backend array); log u ends in ``f``.

    Returns (iterations done, error, stopped on tol, g, ok). ``ok=False``: u or v left the float
    range (checked each iteration, or with ``lazy`` every ``check``-th, rolling back to the last
    checked state); g then is the last good log v and the caller continues in the log domain.
    """
    xp = B.xp_for(p.device)
    bb = B.backend(p.b)
    logb = xp.log(bb)
    g = g - g.max()  # float64 log v: the exact state; the constant moves to u
    track = stop_on_tol or sched.needs_errors
    with RowBlocks(p) as rb:
        sp = ScalingPass(p, m, plan, rb)
        sp.f = B.backend(f)
        sp.v[:] = xp.exp(g)
        it, err, done, last, omega = 0, math.inf, False, False, 1.0  # u is unknown: a plain first step
        good, bad = (it, g), None  # lazy: the last state known to be in range, and the pending flag
        while it < budget:
            last = not stop_on_tol and it == budget - 1
            col_hat, col = sp.iterate(omega, last)
            bad, fail = _range_flag(col, bad, lazy)
            if fail:
                return it, err, False, g, False
            it += 1
            checked = it == budget or (track and it % check == 0)
            if checked:
                if lazy and bool(bad):  # left the range since the last check: go back there
                    return good[0], err, False, good[1], False
                # rows are exact now: v * K^T u_plain are the columns of the current plan
                err = B.l2(col_hat * xp.exp(g) - bb)
                if stop_on_tol and err <= tol:
                    done = True
                    break
            if it == budget:
                break
            g = column_step(g, logb, col, omega)
            sp.v[:] = xp.exp(g)
            bad, fail = _range_flag(sp.v, bad, lazy)
            if fail:
                return it, err, False, g, False
            if lazy and it % check == 0:  # one sync per `check` iterations
                if bool(bad):
                    return good[0], err, False, good[1], False
                good, bad = (it, g), None
            omega = sched.update(it, err) if checked else sched.omega  # the next iteration's step
        sp.finish(f, scaled=last)
    return it, err, done, g, True


def column_step(g, logb, col, omega: float):
    """log v after the (relaxed) column update: ``(1 - omega) g + omega (log b - log K^T u)``."""
    xp = B.xp_of(g)
    g_plain = logb - xp.log(col)  # float64: finite (col > 0) even where dt is not
    return g_plain if omega == 1.0 else (1.0 - omega) * g + omega * g_plain


def _range_flag(x, bad, lazy: bool):
    """(pending flag, fail now): eager mode fails at once; lazy mode accumulates a device flag."""
    flag = B.in_range(x)
    if lazy:
        return (~flag if bad is None else bad | ~flag), False
    return bad, not bool(flag)
