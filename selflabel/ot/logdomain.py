"""Log-domain passes (POT's ``sinkhorn_log``): potentials ``f``, ``g`` in float64, one exp per entry
and iteration over row chunks, no N x K temporaries. The fallback for exponents beyond the range of
the scaling form, also mid-run, and the engine of the unbalanced solver."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from . import backend as B
from .problem import Problem
from .rows import RowBlocks


def merge_weighted(p: Problem, parts):
    """Global ``log sum`` (backend array [K] or [2, K]) of per-block column sums kept relative to a ``top``."""
    M = max([t for _, t, *_ in parts], default=-math.inf)
    if p.world:
        M = float(B.all_reduce(torch.tensor([M], dtype=torch.float64, device=p.device), p.world, "max"))
    shape = parts[0][0].shape
    total_t = B.zeros64(int(np.prod(shape)), p.device)
    total = B.backend(total_t).reshape(shape)
    for acc, t, *_ in parts:
        if t > -math.inf:
            total += acc * math.exp(t - M)
    B.all_reduce(total_t, p.world)
    return M + B.xp_for(p.device).log(total)  # -inf where a sum underflowed (or no rows anywhere)


def col_logsumexp(p: Problem, f: Tensor | None):
    """Exact ``log sum_i exp(scores[i, j] / eps + f[i])`` per column (global, float64 backend [K]):
    an online logsumexp over row chunks (per-column running max), merged over blocks and ranks."""
    inv = 1.0 / p.eps
    fb = B.backend(f) if f is not None else None
    xp = B.xp_for(p.device)

    def block(s0, e0):
        z_buf = B.scratch((rb.rows, p.k), B.LOG_DT, p.device)
        mx = B.scratch((p.k,), B.LOG_DT, p.device, fill=-math.inf)
        acc = B.scratch((p.k,), B.LOG_DT, p.device, fill=0.0)
        for s, e in rb.chunks(s0, e0):
            z = z_buf[: e - s]
            B.scaled_into(rb.scores(s, e), inv, z)
            if fb is not None:
                z += fb[s:e, None]
            new = xp.maximum(mx, B.amax(z, 0))
            new = xp.where(xp.isfinite(new), new, 0.0)  # columns still at -inf: any shift
            acc *= xp.exp(mx - new)  # exp(-inf) = 0 for columns first seen now
            mx = new
            z -= new
            xp.exp(z, out=z)
            acc += z.sum(0)
        return mx, acc

    with RowBlocks(p) as rb:
        parts = rb.map(block)
    mx = B.scratch((p.k,), torch.float64, p.device, fill=-math.inf)
    for m_, _ in parts:
        mx = xp.maximum(mx, m_)
    B.all_reduce(B.as_tensor(mx), p.world, "max")
    total_t = B.zeros64(p.k, p.device)
    total = B.backend(total_t)
    for m_, a_ in parts:
        total += a_ * xp.exp(m_ - mx)
    B.all_reduce(total_t, p.world)
    return mx + xp.log(total)  # backend array; -inf where a column got no mass


def log_pass(p: Problem, g, f: Tensor, loga, fi1: float = 1.0, ra=None, track: bool = False,
             omega: float = 1.0, f_hat: Tensor | None = None):
    """One log-domain iteration over row chunks (float64): the row update, then the column masses.

    Row update, POT's ``sinkhorn_log`` (balanced, ``fi1 = 1``) or Chizat et al.'s unbalanced one:
    ``f = fi1 (log a - LSE_j(S/eps + g)) + (1 - fi1) ra``; over-relaxed (``omega != 1``, balanced):
    the plain update goes to ``f_hat`` and ``f = (1 - omega) f + omega f_hat``. With
    ``E = exp(T - r)``, ``T = S/eps + g`` and r its row max, the rows of the plan ``exp(S/eps + f + g)``
    are ``E * exp(r + f)``, so its column masses are one weighted GEMV over E (a 2-row GEMM for the
    plain and the relaxed f): one exp per entry (POT's pair of logsumexps takes two).

    Returns (log column masses with the plain f, with f: float64 backend arrays [K], global and the
    same array when ``omega == 1``; max |f - f_before| if ``track``). Columns whose sum underflowed
    are redone exactly.
    """
    inv, relaxed = 1.0 / p.eps, omega != 1.0
    fb = B.backend(f)
    hb = B.backend(f_hat) if relaxed else None
    xp = B.xp_for(p.device)

    def block(s0, e0):
        t_buf = B.scratch((rb.rows, p.k), B.LOG_DT, p.device)
        acc = B.scratch((2, p.k) if relaxed else (p.k,), B.LOG_DT, p.device, fill=0.0)
        tmp = B.scratch(acc.shape, B.LOG_DT, p.device)
        top, change = -math.inf, 0.0
        for s, e in rb.chunks(s0, e0):
            t = t_buf[: e - s]
            B.scaled_into(rb.scores(s, e), inv, t)
            t += g
            r = B.amax(t, 1)
            t -= r[:, None]
            xp.exp(t, out=t)
            fc = loga[s:e] - (r + xp.log(t.sum(1)))
            if fi1 != 1.0:
                fc = fi1 * fc + (1.0 - fi1) * ra[s:e]
            if track and e > s:
                change = max(change, float(abs(fc - fb[s:e]).max()))
            if relaxed:
                hb[s:e] = fc
                fb[s:e] = (1.0 - omega) * fb[s:e] + omega * fc
                lw = xp.stack([r + fc, r + fb[s:e]])  # plan rows = E * exp(lw)
            else:
                fb[s:e] = fc
                lw = r + fc
            hi = float(lw.max()) if e > s else -math.inf
            if hi > top:
                acc *= math.exp(top - hi) if top > -math.inf else 0.0
                top = hi
            B.dot(xp.exp(lw - top), t, tmp)
            acc += tmp
        return acc, top, change

    with RowBlocks(p) as rb:
        parts = rb.map(block)
    lcol = merge_weighted(p, parts)
    if not bool(xp.isfinite(lcol).all()):  # a column's mass underflowed: exact LSE
        lcol = xp.stack([col_logsumexp(p, f_hat), col_logsumexp(p, f)]) + g if relaxed else col_logsumexp(p, f) + g
    change = max([c for *_, c in parts], default=0.0)
    if track and p.world:
        change = float(B.all_reduce(torch.tensor([change], dtype=torch.float64, device=p.device), p.world, "max"))
    return (lcol[0], lcol[1], change) if relaxed else (lcol, lcol, change)


def log_iterations(p: Problem, g, f: Tensor, it: int, budget: int, stop_on_tol: bool, tol: float,
                   check: int, sched):
    """Balanced log-domain iterations (POT's ``sinkhorn_log`` order: rows from g, then columns),
    over-relaxed as ``sched`` says; the first one is plain (only g is known on entry).
    ``g``: float64 backend array (numpy on CPU), returned updated; log u (exact rows) ends in ``f``."""
    err, done, omega = math.inf, False, 1.0
    xp, bb = B.xp_for(p.device), B.backend(p.b)
    logb, loga = xp.log(bb), B.backend(B.log_vec(p.a))
    f_hat = B.full64(p.n, 0.0, p.device)
    track = stop_on_tol or sched.needs_errors
    while it < budget:
        lcol_hat, lcol, _ = log_pass(p, g, f, loga, omega=omega, f_hat=f_hat)
        it += 1
        checked = it == budget or (track and it % check == 0)
        if checked:
            err = B.l2(xp.exp(lcol_hat) - bb)
            if stop_on_tol and err <= tol:
                done = True
                break
        if it == budget:
            break
        g = g + logb - lcol if omega == 1.0 else g + omega * (logb - lcol)
        omega = sched.update(it, err) if checked else sched.omega
    if omega != 1.0:  # the plan is the one with exact rows
        B.backend(f)[:] = B.backend(f_hat)
    return it, err, done, g


def assemble_log_plan(p: Problem, f: Tensor, g, out: Tensor) -> None:
    """out = exp(S/eps + f + g), exponent formed in float64 so large potentials cancel exactly."""
    inv, fb, ob = 1.0 / p.eps, B.backend(f), B.backend(out)  # g: backend array
    xp = B.xp_for(p.device)

    def block(s0, e0):
        z_buf = B.scratch((rb.rows, p.k), B.LOG_DT, p.device)
        for s, e in rb.chunks(s0, e0):
            z = z_buf[: e - s]
            B.scaled_into(rb.scores(s, e), inv, z)
            z += fb[s:e, None]
            z += g
            xp.exp(z, out=z)
            if isinstance(z, np.ndarray):
                ob[s:e] = z
            else:
                ob[s:e].copy_(z)

    with RowBlocks(p) as rb:
        rb.map(block)
