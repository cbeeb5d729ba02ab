"""Sinkhorn-Knopp: entropic optimal transport between N samples and K clusters.

Convention (docs/ARCHITECTURE.md): the kernel is ``exp(scores / eps)``, so
``sinkhorn(scores, a, b, eps=e)`` solves the problem of POT's
``ot.sinkhorn(a, b, M=-scores, reg=e)``: the plan ``P = diag(u) exp(scores/eps) diag(v)``
whose rows sum to ``a`` (default ``1/N``) and columns to ``b`` (default ``1/K``), i.e. the
equipartitioned pseudo-labels of SeLa [Asano et al. 2020] and the codes of SwAV [Caron et al. 2020].

How it is computed (Cuturi 2013; Peyre & Cuturi 2019, "Computational Optimal Transport", ch. 4):

* **Scaling form** as SeLa's ``sinkhornknopp.py``: only ``u`` [N] and ``v`` [K] change; the N x K
  kernel is read, never rewritten, and scaled once at the end.
* **One pass per iteration.** An iteration is ``u = a / (K v)`` followed by ``v = b / (K^T u)``.
  Both products need the same rows of K, so they run over row chunks small enough to stay in
  cache: each chunk is read from memory once per iteration instead of twice.
* **Safe exponent.** The kernel is built as ``exp((scores - rowmax) / eps)`` (entries in (0, 1]);
  the row shift is absorbed into ``u``. If some column would have only underflowing entries (small
  eps, peaked logits), or if ``u``/``v`` leave the floating-point range while iterating, the solver
  switches to the log-domain updates of POT's ``sinkhorn_log`` (``logsumexp`` over row chunks),
  continuing from the current potentials.
* **Free stopping test.** After the ``u`` update the rows are exact and ``v * (K^T u)`` are the column
  sums of the current plan, so the marginal error (POT's: L2 norm of the column violation) costs
  nothing extra and is checked every iteration (every 10th on GPUs, where reading it syncs).
* **Distributed** (``distributed=True`` inside ``torch.distributed``): each rank holds a slice of the
  rows; the column sums, the global N and the total mass are all-reduced, as SwAV's
  ``distributed_sinkhorn``. Every decision (kernel or log domain, stopping) is taken on all-reduced
  numbers, so all ranks take it together.

The iterates are POT's: starting from a uniform ``u`` and normalising the columns first, iteration
``t`` here is iteration ``t`` of ``ot.sinkhorn`` (``numItermax=t``), in the kernel and the log domain.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = [
    "SinkhornResult",
    "sinkhorn",
    "sinkhorn_codes",
    "sinkhorn_unbalanced",
    "assign",
    "assign_from_potentials",
]

# Rows per chunk are chosen so that one chunk of the kernel has about this many bytes.
_CPU_PASS_BYTES = 1 << 20  # fused u/v pass: the chunk must still be in L2 for the second product
_CPU_BULK_BYTES = 4 << 20  # elementwise passes (exp, scaling, logsumexp temporaries)
_ACCEL_BYTES = 256 << 20  # GPUs have no cache to fuse in; big chunks only bound the temporaries
_CHECK_EVERY_ACCEL = 10  # reading the error on a GPU synchronises the stream


@dataclass(frozen=True)
class SinkhornResult:
    """Output of :func:`sinkhorn` / :func:`sinkhorn_unbalanced`.

    ``plan[i, j] = exp(scores[i, j] / eps + log_u[i] + log_v[j])``; rows sum to ``a`` exactly
    (balanced case) and ``marginal_err`` is the L2 norm of ``plan.sum(0) - b`` (POT's ``stopThr``
    measure). ``log_u``/``log_v`` are float64 and let callers rebuild any rows of the plan without
    holding it (see :func:`assign_from_potentials`).
    """

    plan: Tensor | None
    n_iters: int
    marginal_err: float
    converged: bool
    log_u: Tensor
    log_v: Tensor
    log_domain: bool


# --------------------------------------------------------------------------------------------
# small helpers


def _world(distributed: bool) -> bool:
    """True when a process group is up and the caller asked for distributed reductions."""
    if not distributed:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: Tensor, world: bool, op: str = "sum") -> Tensor:
    if world:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 scores are computed in float32 (exp overflows float16 at 11)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_chunk(n: int, k: int, device: torch.device, nbytes: int, itemsize: int = 4) -> int:
    if device.type != "cpu":
        nbytes = _ACCEL_BYTES
    return max(1, min(n, nbytes // max(1, k * itemsize)))


def _chunks(n: int, rows: int):
    for s in range(0, n, rows):
        yield s, min(n, s + rows)


def _log_threshold(dtype: torch.dtype) -> float:
    """Largest kernel dynamic range (in nats) the scaling form is trusted with: half the exponent
    range of the dtype (44 for float32), so ``u``, ``v`` and their products stay representable."""
    return 0.5 * math.log(torch.finfo(dtype).max)


def _backend(t: Tensor):
    """A numpy view of a CPU tensor (no copy), the tensor itself elsewhere.

    Matrix-vector products on CPU go through numpy's OpenBLAS: the MKL ``sgemv`` shipped in the
    torch wheel ran at 11 GB/s on the 2-core AMD EPYC we benchmark on, OpenBLAS at 25-28 GB/s.
    """
    return t.numpy() if t.device.type == "cpu" else t


def _dot(x, y, out):
    if isinstance(out, np.ndarray):
        return np.dot(x, y, out=out)
    return torch.matmul(x, y, out=out)


def _div(x, y, out):
    if isinstance(out, np.ndarray):
        return np.divide(x, y, out=out)
    return torch.div(x, y, out=out)


def _as_vector(x, n: int, name: str, device: torch.device) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.float64, device=device).reshape(-1)
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries, expected {n}")
    if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        raise ValueError(f"{name} must be finite and strictly positive (drop empty rows/clusters instead)")
    return t


@dataclass
class _Problem:
    scores: Tensor  # [n, k] local rows, input dtype
    eps: float
    dt: torch.dtype  # compute dtype
    a: Tensor  # float64 [n]
    b: Tensor  # float64 [k]
    n_global: int
    world: bool

    @property
    def n(self) -> int:
        return self.scores.shape[0]

    @property
    def k(self) -> int:
        return self.scores.shape[1]

    @property
    def device(self) -> torch.device:
        return self.scores.device

    def rows(self, nbytes: int, dtype: torch.dtype | None = None) -> int:
        itemsize = torch.finfo(dtype or self.dt).bits // 8
        return _rows_per_chunk(self.n, self.k, self.device, nbytes, itemsize)

    def chunk(self, s: int, e: int, dtype: torch.dtype | None = None) -> Tensor:
        """Scores rows s:e in the compute dtype (a view when no conversion is needed)."""
        return self.scores[s:e].to(dtype or self.dt)


# The log domain is the fallback for exponents beyond the float32 range (|scores/eps| up to 1e3 and
# more), where float32 sums of potentials lose ~1e-4 nats; its row-chunk temporaries are float64.
_LOG_DT = torch.float64


def _prepare(scores: Tensor, a, b, eps: float, distributed: bool, rescale_b: bool = True) -> _Problem:
    if not isinstance(scores, Tensor):
        scores = torch.as_tensor(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [N, K], got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        scores = scores.to(torch.float32)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive number, got {eps}")
    n, k = scores.shape
    if k == 0:
        raise ValueError("scores has no columns (K = 0)")
    scores = scores.contiguous()
    world = _world(distributed)
    dev = scores.device
    a_t = None if a is None else _as_vector(a, n, "a", dev)
    # one all-reduce for the global row count and the total mass of a
    stats = torch.tensor([float(n), float(n) if a_t is None else float(a_t.sum())], dtype=torch.float64, device=dev)
    _all_reduce(stats, world)
    n_global, mass = int(round(stats[0].item())), stats[1].item()
    if n_global == 0:
        raise ValueError("scores has no rows (N = 0)")
    if a_t is None:
        a_t = torch.full((n,), 1.0 / n_global, dtype=torch.float64, device=dev)
        mass = 1.0
    if b is None:
        b_t = torch.full((k,), mass / k, dtype=torch.float64, device=dev)
    else:
        b_t = _as_vector(b, k, "b", dev)
        total = float(b_t.sum())
        if rescale_b and abs(total - mass) > 1e-9 * mass:
            log.debug("b sums to %g, a to %g: b rescaled to the mass of a", total, mass)
            b_t = b_t * (mass / total)
    return _Problem(scores, float(eps), _compute_dtype(scores.dtype), a_t, b_t, n_global, world)


# --------------------------------------------------------------------------------------------
# passes over the rows


def _scan(p: _Problem) -> tuple[Tensor, Tensor, Tensor, float]:
    """One pass: row maxima m [n], column maxima c [K], ``gap[j] = max_i (scores - m_i)`` [K] and
    the smallest row maximum (global).

    ``gap`` says how small the best entry of each column of the row-shifted kernel is, i.e.
    whether ``exp((scores - m) / eps)`` can represent every column.
    """
    m = torch.empty(p.n, dtype=p.dt, device=p.device)
    c = torch.full((p.k,), -math.inf, dtype=p.dt, device=p.device)
    gap = torch.full((p.k,), -math.inf, dtype=p.dt, device=p.device)
    for s, e in _chunks(p.n, p.rows(_CPU_BULK_BYTES)):
        x = p.chunk(s, e)
        torch.amax(x, dim=1, out=m[s:e])
        torch.maximum(c, x.amax(0), out=c)
        torch.maximum(gap, (x - m[s:e, None]).amax(0), out=gap)
    if p.n and not bool(torch.isfinite(m).all()):
        raise ValueError("scores contain NaN/+inf, or a row that is -inf everywhere")
    # one all-reduce (max) for both column statistics and the smallest row maximum
    m_min = m.min().reshape(1) if p.n else torch.full((1,), math.inf, dtype=p.dt, device=p.device)
    stats = torch.cat([c, gap, -m_min]).double()
    _all_reduce(stats, p.world, "max")
    c, gap = stats[: p.k], stats[p.k : 2 * p.k]
    if not bool(torch.isfinite(c).all()):
        raise ValueError("scores have a column that is -inf everywhere: no mass can reach it")
    return m, c, gap, -float(stats[-1])


def _col_logsumexp(p: _Problem, f: Tensor | None, c: Tensor | None = None) -> Tensor:
    """Exact ``log sum_i exp(scores[i, j] / eps + f[i])`` per column (global), float64 [K].

    With ``f=None`` and the known column maxima ``c`` the shift is fixed and one sum suffices.
    """
    shift = None if c is None else c / p.eps
    acc = _OnlineColLSE(p.k, p.device, _LOG_DT, shift)
    for s, e in _chunks(p.n, p.rows(_CPU_BULK_BYTES, _LOG_DT)):
        z = p.chunk(s, e, _LOG_DT) / p.eps
        if f is not None:
            z += f[s:e, None]
        acc.add(z)
    return acc.result(p.world)


class _OnlineColLSE:
    """Column-wise logsumexp accumulated over row chunks (and ranks), in float64."""

    def __init__(self, k: int, device: torch.device, dt: torch.dtype, shift: Tensor | None = None):
        self.fixed = shift is not None
        self.mx = shift.double() if shift is not None else torch.full((k,), -math.inf, dtype=torch.float64, device=device)
        self.s = torch.zeros(k, dtype=torch.float64, device=device)
        self.dt = dt

    def add(self, z: Tensor) -> None:  # z: [rows, K] in the compute dtype, overwritten
        if self.fixed:
            shift = self.mx.to(self.dt)
        else:
            new = torch.maximum(self.mx, z.amax(0).double())
            shift = torch.where(torch.isfinite(new), new, 0.0).to(self.dt)
            new = shift.double()
            self.s *= torch.exp(self.mx - new)  # exp(-inf) = 0 for columns first seen now
            self.mx = new
        z.sub_(shift).exp_()
        self.s += z.sum(0, dtype=torch.float64)

    def result(self, world: bool) -> Tensor:
        if world and not self.fixed:
            g = self.mx.clone()
            _all_reduce(g, world, "max")
            self.s *= torch.exp(self.mx - g)
            self.mx = g
        _all_reduce(self.s, world)
        return self.mx + torch.log(self.s)  # -inf where a column got no mass


def _log_pass(p: _Problem, g: Tensor, f_out: Tensor, fi: tuple[float, float] = (1.0, 1.0),
              ref: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """One log-domain iteration over row chunks: f from g (rows), then the column logsumexp.

    Balanced: ``f = log a - LSE_j(S/eps + g)``. Unbalanced (Chizat et al. 2018, POT's
    ``sinkhorn_knopp_unbalanced`` in log form): ``f = fi1 (log a - LSE) + (1 - fi1) ra``, where
    ``ra``/``rb`` are the log reference marginals (``log a``/``log b`` for POT's ``reg_type='kl'``).
    Returns ``LSE_i(S/eps + f)`` per column (float64 [K], global); the caller updates g.
    """
    loga = torch.log(p.a)
    acc = _OnlineColLSE(p.k, p.device, _LOG_DT)
    for s, e in _chunks(p.n, p.rows(_CPU_BULK_BYTES, _LOG_DT)):
        x = p.chunk(s, e, _LOG_DT) / p.eps
        f = loga[s:e] - torch.logsumexp(x + g, dim=1)
        if fi[0] != 1.0:
            f = fi[0] * f + (1.0 - fi[0]) * ref[0][s:e]
        f_out[s:e] = f
        x += f[:, None]
        acc.add(x)
    return acc.result(p.world)


def _l2(x: Tensor) -> float:
    return float(torch.linalg.vector_norm(x))


# --------------------------------------------------------------------------------------------
# the balanced solver


def _solve(p: _Problem, n_iters: int | None, tol: float, max_iters: int, log_domain: bool | None,
           return_plan: bool) -> SinkhornResult:
    m, c, gap, m_min = _scan(p)
    T = _log_threshold(p.dt)
    kernel_ok = bool(gap.min() / p.eps >= -T)
    use_log = (not kernel_ok) if log_domain is None else bool(log_domain)
    # switching to the log domain is routine in auto mode, worth a warning when it was ruled out
    note = log.warning if log_domain is False else log.debug
    if log_domain is False and not kernel_ok:
        note("Sinkhorn: some column of exp(scores/eps) underflows in %s; the kernel form may fall "
             "back to the log domain", p.dt)

    budget = n_iters if n_iters is not None else max_iters
    plan: Tensor | None = None
    g: Tensor | None = None  # float64 log v, POT's first column normalisation from a uniform u
    if not use_log and return_plan:
        # Build the row-shifted kernel in the output buffer; when the row maxima are within range,
        # the first column sums K^T u0 (u0 uniform) come from the same pass, in cache.
        plan = torch.empty(p.n, p.k, dtype=p.dt, device=p.device)
        M = float(c.max())
        g = _build_kernel(p, m, plan, M if (M - m_min) / p.eps <= T else None)
        if g is not None and not _v_range_ok(g, p.dt):
            g = None  # some column sum underflowed: redo it exactly below
    if g is None:
        g = torch.log(p.b) - _col_logsumexp(p, None, c)
    if not use_log and not _v_range_ok(g, p.dt):
        note("Sinkhorn: the first column scaling spans more than the %s range; using the log domain",
             p.dt)
        use_log = True

    f = torch.empty(p.n, dtype=torch.float64, device=p.device)
    it, err, done = 0, math.inf, False
    check = 1 if p.device.type == "cpu" else _CHECK_EVERY_ACCEL
    if not use_log:
        it, err, done, g, ok = _kernel_iterations(p, m, plan, g, f, budget, n_iters is None, tol, check)
        if not ok:
            (log.warning if log_domain is False else log.info)(
                "Sinkhorn: the scaling vectors left the %s range at iteration %d; continuing in the "
                "log domain", p.dt, it + 1)
            use_log = True
    if use_log:
        it, err, done, g = _log_iterations(p, g, f, it, budget, n_iters is None, tol, check)
    if use_log and return_plan:
        if plan is None:
            plan = torch.empty(p.n, p.k, dtype=p.dt, device=p.device)
        _assemble_log_plan(p, f, g, plan)
    converged = err <= tol
    if n_iters is None and not converged:
        log.warning("Sinkhorn did not converge: marginal error %.3g > tol %.3g after %d iterations "
                    "(raise max_iters or eps)", err, tol, it)
    return SinkhornResult(plan, it, err, converged, f, g, use_log)


def _v_range_ok(g: Tensor, dt: torch.dtype) -> bool:
    """Can ``v = exp(g - max g)`` be held in ``dt`` with room for the products with the kernel?"""
    return bool(torch.isfinite(g).all()) and float(g.max() - g.min()) <= 1.5 * _log_threshold(dt)


def _build_kernel(p: _Problem, m: Tensor, out: Tensor, M: float | None) -> Tensor | None:
    """out = exp((scores - m) / eps) in place, chunk by chunk.

    With ``M`` (global max score, rows maxima within the float range of it) also returns
    ``log b - log(K^T u0)`` for a uniform ``u0``, via weights ``exp((m - M)/eps)``: POT's first
    column normalisation, from the chunk while it is in cache.
    """
    col = torch.zeros(p.k, dtype=torch.float64, device=p.device) if M is not None else None
    tmp = _backend(torch.empty(p.k, dtype=p.dt, device=p.device))
    w = torch.exp((m - M) / p.eps) if M is not None else None
    wb = _backend(w) if w is not None else None
    colb = _backend(col) if col is not None else None
    inv = 1.0 / p.eps
    for s, e in _chunks(p.n, p.rows(_CPU_BULK_BYTES)):
        o = out[s:e]
        if p.scores.dtype == p.dt:
            torch.sub(p.scores[s:e], m[s:e, None], out=o)
        else:
            o.copy_(p.scores[s:e])
            o.sub_(m[s:e, None])
        o.mul_(inv).exp_()
        if col is not None:
            _dot(wb[s:e], _backend(o), tmp)
            colb += tmp
    if col is None:
        return None
    _all_reduce(col, p.world)
    return torch.log(p.b) - torch.log(col)


def _kernel_iterations(p, m, plan, g, f, budget, stop_on_tol, tol, check):
    """Scaling-form iterations on exp((S - m)/eps); one fused pass over the rows per iteration.

    Returns (iterations done, error, stopped, g = log v in float64, ok). ``ok=False`` means u or v
    left the float range; g then is the last good log v and the caller continues in log domain.
    """
    dt, dev = p.dt, p.device
    rows = p.rows(_CPU_PASS_BYTES)
    v = torch.exp(g - g.max()).to(dt)  # the overall constant moves to u
    u = torch.empty(p.n, dtype=dt, device=dev)
    a = p.a.to(dt)
    col = torch.zeros(p.k, dtype=torch.float64, device=dev)
    tmp = torch.empty(p.k, dtype=dt, device=dev)
    kv = torch.empty(min(rows, max(p.n, 1)), dtype=dt, device=dev)
    ab, ub, vb, colb, tmpb, kvb = map(_backend, (a, u, v, col, tmp, kv))

    if plan is not None:
        Kb = _backend(plan)
        kernel: Callable[[int, int], object] = lambda s, e: Kb[s:e]
    else:  # streamed: recompute the kernel rows (one exp per entry per iteration)
        scratch = torch.empty(rows, p.k, dtype=dt, device=dev)

        def kernel(s, e):
            o = scratch[: e - s]
            torch.sub(p.chunk(s, e), m[s:e, None], out=o)
            o.mul_(1.0 / p.eps).exp_()
            return _backend(o)

    it, err, done = 0, math.inf, False
    v64 = v.double()
    while it < budget:
        col.zero_()
        for s, e in _chunks(p.n, rows):
            Kc = kernel(s, e)
            kvc = kvb[: e - s]
            _dot(Kc, vb, kvc)  # K v   (rows of the chunk)
            _div(ab[s:e], kvc, ub[s:e])  # u = a / K v
            _dot(ub[s:e], Kc, tmpb)  # K^T u  (same chunk, still in cache)
            colb += tmpb
        _all_reduce(col, p.world)
        if not (bool(torch.isfinite(col).all()) and bool((col > 0).all())):
            return it, err, False, torch.log(v64), False
        it += 1
        # rows are exact now; v * K^T u are the columns of the current plan
        if it == budget or (stop_on_tol and it % check == 0):
            err = _l2(col * v64 - p.b)
            if stop_on_tol and err <= tol:
                done = True
                break
        if it == budget:
            break
        v64 = p.b / col
        if not bool(torch.isfinite(v64).all()) or float(v64.max()) > torch.finfo(dt).max / 4:
            return it, err, False, torch.log(v64), False
        v.copy_(v64)
        if not bool((v > 0).all()):  # underflow in the compute dtype
            return it, err, False, torch.log(v64), False
    # log u in the unshifted frame: P = u exp((S - m)/eps) v = exp(S/eps + log u - m/eps + log v)
    f.copy_(torch.log(u.double()) - m.double() / p.eps)
    g = torch.log(v64)
    if plan is not None:
        for s, e in _chunks(p.n, p.rows(_CPU_BULK_BYTES)):
            plan[s:e].mul_(u[s:e, None]).mul_(v)
    return it, err, done, g, True


def _log_iterations(p, g, f, it, budget, stop_on_tol, tol, check):
    """Log-domain iterations (POT's ``sinkhorn_log`` order: rows from g, then columns)."""
    err, done = math.inf, False
    logb = torch.log(p.b)
    while it < budget:
        lse = _log_pass(p, g, f)
        it += 1
        if it == budget or (stop_on_tol and it % check == 0):
            err = _l2(torch.exp(lse + g) - p.b)
            if stop_on_tol and err <= tol:
                done = True
                break
        if it == budget:
            break
        g = logb - lse
    return it, err, done, g


def _assemble_log_plan(p: _Problem, f: Tensor, g: Tensor, out: Tensor) -> None:
    """out = exp(S/eps + f + g), exponent formed in float64 so large potentials cancel exactly."""
    for s, e in _chunks(p.n, p.rows(_CPU_BULK_BYTES, _LOG_DT)):
        z = p.chunk(s, e, _LOG_DT) / p.eps
        z += f[s:e, None]
        z += g
        out[s:e] = z.exp_()


# --------------------------------------------------------------------------------------------
# public API


@torch.no_grad()
def sinkhorn(
    scores: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    eps: float = 0.05,
    n_iters: int | None = None,
    tol: float = 1e-6,
    max_iters: int = 1000,
    log_domain: bool | None = None,
    distributed: bool = False,
    return_plan: bool = True,
) -> SinkhornResult:
    """Balanced entropic OT plan between the rows and columns of ``scores`` (Cuturi 2013).

    Solves ``max <P, scores> + eps H(P)`` s.t. ``P 1 = a``, ``P^T 1 = b``: the same problem and the
    same iterates as POT's ``ot.sinkhorn(a, b, -scores, eps)`` (method ``sinkhorn`` in kernel form,
    ``sinkhorn_log`` in log domain). This is SeLa's label step (Asano et al., ICLR 2020) with
    ``eps = 1 / lambda`` and ``b`` the cluster-size prior.

    Args:
        scores: [N, K] similarities (higher = more likely), any float dtype, any device; float16
            and bfloat16 are computed in float32. With ``distributed=True`` the rows of this rank.
        a: [N] positive row masses (default ``1/N``, N global). Rows of this rank when distributed.
        b: [K] positive column masses, e.g. a prior on cluster sizes as proportions or counts; it is
            rescaled to the total mass of ``a``. Default uniform.
        eps: entropic regularisation (POT's ``reg``); smaller = harder assignments.
        n_iters: run exactly this many iterations (SwAV style); ``None`` iterates until the marginal
            error is ``<= tol`` or ``max_iters``.
        tol: stop when ``||P^T 1 - b||_2 <= tol`` (POT's ``stopThr``).
        log_domain: ``None`` picks the kernel form unless ``exp(scores/eps)`` cannot be represented
            (then logsumexp updates); ``True``/``False`` forces one (the kernel form still falls back
            to the log domain if its scaling vectors overflow).
        distributed: all-reduce column sums, N and mass over the default process group.
        return_plan: ``False`` keeps no N x K array (the kernel is recomputed per row chunk in each
            iteration, slower); use :func:`assign_from_potentials` for labels.

    Returns:
        :class:`SinkhornResult`; a warning is logged when ``n_iters is None`` and it did not converge.
    """
    if n_iters is not None and n_iters < 1:
        raise ValueError("n_iters must be >= 1")
    if max_iters < 1:
        raise ValueError("max_iters must be >= 1")
    p = _prepare(scores, a, b, eps, distributed)
    return _solve(p, n_iters, tol, max_iters, log_domain, return_plan)


@torch.no_grad()
def sinkhorn_codes(scores: Tensor, eps: float = 0.05, n_iters: int = 3, distributed: bool = False) -> Tensor:
    """SwAV's soft codes (Caron et al., NeurIPS 2020, ``distributed_sinkhorn``): ``n_iters`` Sinkhorn
    iterations towards equal cluster sizes, rows scaled to sum to 1.

    Same iterates as the SwAV/lightly reference (columns normalised first) but overflow-safe: SwAV's
    ``exp(scores / eps)`` overflows float32 at scores > 88 eps. Returns [N, K] float32 (float64 for
    float64 scores); with ``distributed=True`` this rank's rows of the global solution.
    """
    if n_iters < 1:
        raise ValueError("n_iters must be >= 1")
    p = _prepare(scores, None, None, eps, distributed)
    res = _solve(p, n_iters, 0.0, n_iters, None, True)
    return res.plan.mul_(p.n_global)


@torch.no_grad()
def sinkhorn_unbalanced(
    scores: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    eps: float = 0.05,
    reg_m: float | Sequence[float] = 1.0,
    reg_type: str = "kl",
    n_iters: int | None = None,
    tol: float = 1e-6,
    max_iters: int = 1000,
    distributed: bool = False,
    return_plan: bool = True,
) -> SinkhornResult:
    """Unbalanced entropic OT: marginals enforced softly by KL penalties (Chizat et al., "Scaling
    algorithms for unbalanced optimal transport problems", Math. Comp. 2018; Frogner et al. 2015).

    Solves POT's ``ot.sinkhorn_unbalanced(a, b, -scores, eps, reg_m, reg_type=reg_type)``:
    ``min <P, -scores> + eps KL(P | c) + reg_m1 KL(P 1 | a) + reg_m2 KL(P^T 1 | b)`` with reference
    ``c = a b^T`` (``reg_type='kl'``, POT's default since 0.9.5) or ``c = 1`` (``'entropy'``).
    ``reg_m`` is a float or a pair (rows, columns); ``inf`` enforces that marginal exactly. Useful
    when the cluster-size prior ``b`` is only a hint. Runs in the log domain (row chunks, no N x K
    temporaries). Stops when the potentials change by at most ``tol`` (max abs, in nats);
    ``marginal_err`` reports ``||P^T 1 - b||_2``, not zero by design.
    """
    if reg_type not in ("kl", "entropy"):
        raise ValueError("reg_type must be 'kl' or 'entropy'")
    r1, r2 = (reg_m, reg_m) if not isinstance(reg_m, Sequence) else (tuple(reg_m) * 2)[:2]
    if min(r1, r2) <= 0:
        raise ValueError("reg_m must be positive (use inf for an exact marginal)")
    p = _prepare(scores, a, b, eps, distributed, rescale_b=False)
    fi = tuple(1.0 if math.isinf(r) else r / (r + p.eps) for r in (r1, r2))
    loga, logb = torch.log(p.a), torch.log(p.b)
    ra, rb = (loga, logb) if reg_type == "kl" else (torch.zeros_like(loga), torch.zeros_like(logb))
    _scan(p)  # validates the scores (NaN, empty rows/columns)

    budget = n_iters if n_iters is not None else max_iters
    f = torch.zeros(p.n, dtype=torch.float64, device=p.device)
    g = rb.clone()  # POT starts from u = v = 1 on the kernel exp(S/eps) * c
    f_prev = f.clone()
    it, change = 0, math.inf
    converged = False
    while it < budget:
        f_prev.copy_(f)
        lse = _log_pass(p, g, f, fi, (ra, rb))
        g_new = fi[1] * (logb - lse) + (1.0 - fi[1]) * rb
        it += 1
        dg = (g_new - g).abs().max()
        df = torch.tensor([float((f - f_prev).abs().max()) if p.n else 0.0], dtype=torch.float64, device=p.device)
        _all_reduce(df, p.world, "max")
        change = max(float(dg), float(df))
        g = g_new
        if n_iters is None and change <= tol:
            converged = True
            break
    # (f, g) is POT's last (u, v) pair: f from the previous g, g from this f
    plan = torch.empty(p.n, p.k, dtype=p.dt, device=p.device) if return_plan else None
    if plan is not None:
        _assemble_log_plan(p, f, g, plan)
    col = torch.exp(_col_logsumexp(p, f) + g)
    err = _l2(col - p.b)
    if n_iters is not None:
        converged = change <= tol
    elif not converged:
        log.warning("Unbalanced Sinkhorn did not converge: potentials still move by %.3g after %d "
                    "iterations", change, it)
    return SinkhornResult(plan, it, err, converged, f, g, True)


@torch.no_grad()
def assign(plan: Tensor) -> tuple[Tensor, Tensor]:
    """Hard labels from a plan: ``labels[i] = argmax_j plan[i, j]`` (int64) and ``confidence[i]``,
    the probability of that cluster within row i (``max / row sum``, float32 in [0, 1])."""
    top, labels = plan.max(dim=1)
    conf = (top.double() / plan.sum(dim=1, dtype=torch.float64)).to(torch.float32)
    return labels, conf


@torch.no_grad()
def assign_from_potentials(scores: Tensor, log_v: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """:func:`assign` without the plan: row i of the plan is proportional to
    ``softmax_j(scores[i, j] / eps + log_v[j])``, computed over row chunks."""
    n, k = scores.shape
    labels = torch.empty(n, dtype=torch.int64, device=scores.device)
    conf = torch.empty(n, dtype=torch.float32, device=scores.device)
    g = log_v.to(device=scores.device, dtype=torch.float64)
    rows = _rows_per_chunk(n, k, scores.device, _CPU_BULK_BYTES, 8)
    for s, e in _chunks(n, rows):
        z = scores[s:e].double() / eps + g
        top, labels[s:e] = z.max(dim=1)
        conf[s:e] = torch.exp(top - torch.logsumexp(z, dim=1)).to(torch.float32)
    return labels, conf
