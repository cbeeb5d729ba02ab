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
  switches to the log-domain updates of POT's ``sinkhorn_log`` (float64 row chunks, one exp per
  entry and iteration), continuing from the current float64 potentials.
* **CPU execution.** Row chunks are numpy/OpenBLAS calls in a few worker threads, one block of rows
  each, BLAS held to one thread (see ``_RowBlocks``); on GPUs the same passes are torch ops.
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

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from . import ot_triton

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
_CPU_PASS_BYTES = 1 << 20  # row chunks of every pass: still in L2 for the second product
_GROUP_CHUNKS = 16  # chunks per reduction group (the unit of work of a thread)
_CPU_BULK_BYTES = 4 << 20  # assign_from_potentials' float64 temporaries
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
    return _chunks_range(0, n, rows)


def _chunks_range(start: int, end: int, rows: int):
    for s in range(start, end, rows):
        yield s, min(end, s + rows)


def _log_threshold(dtype: torch.dtype) -> float:
    """Largest kernel dynamic range (in nats) the scaling form is trusted with: half the exponent
    range of the dtype (44 for float32), so ``u``, ``v`` and their products stay representable."""
    return 0.5 * math.log(torch.finfo(dtype).max)


# --- the passes' array layer: numpy on CPU, torch elsewhere ----------------------------------
#
# On CPU every pass over the rows (kernel form and log domain) runs as numpy/OpenBLAS calls in our
# own threads, one contiguous block of rows per thread, with BLAS held to one thread: a single
# synchronisation per pass instead of one per operation. Measured on the shared 2-core AMD EPYC of
# the benchmark: torch's OpenMP regions and OpenBLAS's spinning threads fighting for the cores made
# the setup of a 50k x 1,000 problem 15x slower (5.7 s vs 0.37 s); MKL's sgemv in the torch wheel read 11 GB/s where
# OpenBLAS read 25-28 GB/s; numpy's float32 exp ran 1.7x faster than torch's on one thread.


def _numpy_path(device: torch.device) -> bool:
    """Whether the passes run as numpy on CPU (else torch ops; tests flip it to cover the GPU path)."""
    return device.type == "cpu"


def _backend(t: Tensor):
    """A numpy view of a CPU tensor (shares memory), the tensor itself elsewhere."""
    return t.numpy() if _numpy_path(t.device) else t


def _xp(device: torch.device):
    return np if _numpy_path(device) else torch


def _dot(x, y, out):
    if isinstance(out, np.ndarray):
        return np.dot(x, y, out=out)
    if x.dim() == 1:  # vector @ matrix
        return torch.mv(y.t(), x, out=out)
    return torch.mv(x, y, out=out) if y.dim() == 1 else torch.mm(x, y, out=out)


def _div(x, y, out):
    if isinstance(out, np.ndarray):
        return np.divide(x, y, out=out)
    return torch.div(x, y, out=out)


def _kernel_into(x, m, inv: float, out, row_max=None) -> None:
    """out = exp((x - m[:, None]) * inv): rows of the row-shifted kernel. With ``row_max`` (an
    output vector) m is first computed as the row maxima of x."""
    if isinstance(out, np.ndarray):
        if row_max is not None:
            np.max(x, axis=1, out=row_max)
        np.subtract(x, m[:, None], out=out)
        np.multiply(out, inv, out=out)
        np.exp(out, out=out)
    else:
        if row_max is not None:
            torch.amax(x, dim=1, out=row_max)
        torch.sub(x, m[:, None], out=out)
        out.mul_(inv).exp_()


def _scale_rows(x, u, v) -> None:
    """x *= u[:, None] * v[None, :] in place."""
    if isinstance(x, np.ndarray):
        np.multiply(x, u[:, None], out=x)
        np.multiply(x, v, out=x)
    else:
        x.mul_(u[:, None]).mul_(v)


def _block_stats(x, m_out, scratch):
    """Row maxima of x into m_out; returns the column maxima of x - m."""
    if isinstance(x, np.ndarray):
        np.max(x, axis=1, out=m_out)
        np.subtract(x, m_out[:, None], out=scratch)
        return scratch.max(axis=0)
    torch.amax(x, dim=1, out=m_out)
    torch.sub(x, m_out[:, None], out=scratch)
    return scratch.amax(0)


def _full(n: int, value: float, device: torch.device) -> Tensor:
    """float64 vector, numpy-allocated on CPU. Vector math on CPU goes through numpy views too: any
    torch op between our numpy calls woke libgomp's spinning workers, which then took the core from
    the numpy thread (3-8x slower solves once ``torch.set_num_threads`` had been called)."""
    if device.type == "cpu":
        return torch.from_numpy(np.full(n, value))
    return torch.full((n,), value, dtype=torch.float64, device=device)


def _cast(x, dtype: torch.dtype):
    """x (numpy or torch) converted to the numpy/torch version of ``dtype``."""
    if isinstance(x, np.ndarray):
        return x.astype(torch.empty(0, dtype=dtype).numpy().dtype, copy=False)
    return x.to(dtype)


def _empty_plan(n: int, k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The N x K output buffer. On CPU allocated by numpy, which asks Linux for transparent huge
    pages: first-touching 200 MB took 25-40 ms that way, 140-180 ms through ``torch.empty``."""
    if device.type == "cpu":
        return torch.from_numpy(np.empty((n, k), dtype=torch.empty(0, dtype=dtype).numpy().dtype))
    return torch.empty(n, k, dtype=dtype, device=device)


_BLAS_CONTROLLER = None


def _one_blas_thread(device: torch.device):
    """Hold numpy's BLAS to one thread while our own threads split the rows (CPU only)."""
    global _BLAS_CONTROLLER
    if not _numpy_path(device):
        return contextlib.nullcontext()
    try:
        if _BLAS_CONTROLLER is None:
            from threadpoolctl import ThreadpoolController

            _BLAS_CONTROLLER = ThreadpoolController()
        return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")
    except Exception:  # threadpoolctl missing or unable to see the library: run as is
        return contextlib.nullcontext()


def _cpu_workers() -> int:
    """Threads for the CPU passes: torch's intra-op thread count, capped by the cores that other
    processes leave free (1-minute load average, plus this process). On an oversubscribed machine
    extra threads only wait for each other (a thread preempted while holding the GIL stalls the
    rest): at load 11 on the 2-core benchmark box, 2 workers ran 3-5x slower than 1."""
    n = torch.get_num_threads()
    try:
        free = (os.cpu_count() or 1) - os.getloadavg()[0] + 1.0
    except (AttributeError, OSError):
        return n
    return max(1, min(n, int(free)))


_POOL = None


def _worker_pool():
    """One process-wide pool (idle threads block, they do not spin): starting threads per call cost
    ~8 ms each on the loaded benchmark machine."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix="selflabel-sinkhorn")
    return _POOL


def _quiet(fn, *args):
    """Run fn with numpy's floating-point warnings off (errstate is per thread): overflow and
    log(0) are expected in the passes and checked explicitly by the callers."""
    with np.errstate(all="ignore"):
        return fn(*args)


class _RowBlocks:
    """Row groups for the passes: fixed groups of ``_GROUP_CHUNKS`` chunks, each reduced in order,
    spread over worker threads in contiguous runs (CPU), or one group of torch ops (GPU).

    Partial results come back per group, in group order, whatever the number of workers: the
    float sums (and so the answer, to the bit) do not depend on the machine's load."""

    def __init__(self, p: "_Problem"):
        self.p = p
        self.rows = p.rows(_CPU_PASS_BYTES)
        span = self.rows * _GROUP_CHUNKS
        self.groups = [(s, min(p.n, s + span)) for s in range(0, p.n, span)] or [(0, 0)]
        workers = max(1, min(_cpu_workers(), len(self.groups))) if p.device.type == "cpu" else 1
        per = -(-len(self.groups) // workers)
        self.runs = [self.groups[i : i + per] for i in range(0, len(self.groups), per)]
        self.pool = _worker_pool() if len(self.runs) > 1 else None

    def __enter__(self):
        self._blas = _one_blas_thread(self.p.device)
        self._blas.__enter__()
        return self

    def __exit__(self, *exc):
        self._blas.__exit__(*exc)

    def map(self, fn) -> list:
        """[fn(start, end) for each group], in group order; runs of groups in parallel."""
        if self.pool is None:
            return [fn(s, e) for s, e in self.groups]
        futures = [self.pool.submit(_quiet, lambda run: [fn(s, e) for s, e in run], run) for run in self.runs]
        return [r for f in futures for r in f.result()]

    def chunks(self, s: int, e: int):
        return _chunks_range(s, e, self.rows)

    def scores(self, s: int, e: int):
        """Rows s:e of the scores in the compute dtype, as numpy on CPU (a view unless converted)."""
        p = self.p
        x = p.scores[s:e]
        if not _numpy_path(x.device):
            return x.to(p.dt)
        if x.dtype == p.dt:
            return x.numpy()
        if x.dtype == torch.float16:
            return x.numpy().astype(np.float32)
        return x.to(p.dt).numpy()  # bfloat16: numpy has no such type


def _as_vector(x, n: int, name: str, device: torch.device) -> Tensor:
    """A user marginal as a float64 vector on ``device`` (numpy-backed on CPU), validated."""
    if device.type == "cpu":
        arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else x
        t = torch.from_numpy(np.array(arr, dtype=np.float64).reshape(-1))
    else:
        t = torch.as_tensor(x, dtype=torch.float64, device=device).reshape(-1)
    xb = _backend(t)
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries, expected {n}")
    if not bool(_xp(device).isfinite(xb).all()) or bool((xb <= 0).any()):
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

    def rows(self, nbytes: int) -> int:
        itemsize = torch.finfo(self.dt).bits // 8
        return _rows_per_chunk(self.n, self.k, self.device, nbytes, itemsize)


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
    stats = torch.tensor([float(n), float(n) if a_t is None else float(_backend(a_t).sum())],
                         dtype=torch.float64, device=dev)
    _all_reduce(stats, world)
    n_global, mass = int(round(stats[0].item())), stats[1].item()
    if n_global == 0:
        raise ValueError("scores has no rows (N = 0)")
    if a_t is None:
        a_t = _full(n, 1.0 / n_global, dev)
        mass = 1.0
    if b is None:
        b_t = _full(k, mass / k, dev)
    else:
        b_t = _as_vector(b, k, "b", dev)
        total = float(_backend(b_t).sum())
        if rescale_b and abs(total - mass) > 1e-9 * mass:
            log.debug("b sums to %g, a to %g: b rescaled to the mass of a", total, mass)
            _backend(b_t)[:] *= mass / total
    return _Problem(scores, float(eps), _compute_dtype(scores.dtype), a_t, b_t, n_global, world)


# --------------------------------------------------------------------------------------------
# passes over the rows


def _scan(p: _Problem, out: Tensor | None = None):
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
    mb, inv = _backend(m), 1.0 / p.eps
    ob = _backend(out) if out is not None else None
    xp = _xp(p.device)
    with _RowBlocks(p) as rb:

        def block(s0, e0):
            acc = None  # column maxima of scores - m (scan) | [plain, weighted] column sums (build)
            top = -math.inf  # running max of the row maxima, the reference of the weighted sums
            o_buf = ob if ob is not None else _backend(torch.empty(rb.rows, p.k, dtype=p.dt, device=p.device))
            if ob is not None:
                acc = _backend(torch.zeros(2, p.k, dtype=torch.float64, device=p.device))
                w = _backend(torch.ones(2, rb.rows, dtype=p.dt, device=p.device))
                tmp = _backend(torch.empty(2, p.k, dtype=p.dt, device=p.device))
            for s, e in rb.chunks(s0, e0):
                x, mc = rb.scores(s, e), mb[s:e]
                if ob is None:
                    o = o_buf[: e - s]
                    gg = _block_stats(x, mc, o)
                    acc = gg if acc is None else xp.maximum(acc, gg)
                    continue
                o = ob[s:e]
                _kernel_into(x, mc, inv, o, row_max=mc)
                hi = float(mc.max())
                if hi > top:  # move the weighted sums to the new reference
                    acc[1] *= math.exp((top - hi) * inv) if top > -math.inf else 0.0
                    top = hi
                wc = w[:, : e - s]
                xp.exp((mc - top) * inv, out=wc[1])
                _dot(wc, o, tmp)  # [1; w]^T K on the chunk just written
                acc += tmp
            return acc, top

        parts = [r for r in rb.map(block) if r[0] is not None]
    if p.n and not bool(xp.isfinite(mb).all()):
        raise ValueError("scores contain NaN/+inf, or a row that is -inf everywhere")
    m_min = float(mb.min()) if p.n else math.inf
    M = None  # the global largest row maximum (known when the kernel is built)
    if out is None:  # one all-reduce (max) for the column statistics and the smallest row maximum
        stats_t = _zeros64(p.k + 1, p.device)
        stats = _backend(stats_t)
        stats[:] = -math.inf
        for acc, _ in parts:
            stats[: p.k] = xp.maximum(stats[: p.k], _cast(acc, torch.float64) * inv)
        stats[p.k] = -m_min
        _all_reduce(stats_t, p.world, "max")
        log_top, m_min, log_ktu = stats[: p.k], -float(stats[p.k]), None
    else:  # partial sums relative to the global max score M; one max and one sum all-reduce
        top = torch.tensor([max([t for _, t in parts], default=-math.inf), -m_min], dtype=torch.float64,
                           device=p.device)
        _all_reduce(top, p.world, "max")
        M, m_min = float(top[0]), -float(top[1])
        sums_t = _zeros64(2 * p.k, p.device)
        sums = _backend(sums_t).reshape(2, p.k)
        for acc, t in parts:
            sums[0] += acc[0]
            if t > -math.inf:
                sums[1] += acc[1] * math.exp((t - M) * inv)
        _all_reduce(sums_t, p.world)
        log_top, log_ktu = xp.log(sums[0]), xp.log(sums[1])
    if not bool((log_top > -math.inf).all()):
        if out is not None:  # a float sum underflowed; only the max scan can tell -inf apart
            return m, m_min, _scan(p)[2], log_ktu, M
        raise ValueError("scores have a column that is -inf everywhere: no mass can reach it")
    return m, m_min, log_top, log_ktu, M  # log_top, log_ktu: float64 backend arrays


def _scaled_into(x, inv: float, out) -> None:
    """out = x * inv computed in out's dtype (float64 for the log domain)."""
    if isinstance(out, np.ndarray):
        np.multiply(x, inv, out=out, dtype=out.dtype)
    else:
        out.copy_(x).mul_(inv)


def _amax(x, axis: int):
    return x.max(axis=axis) if isinstance(x, np.ndarray) else x.amax(axis)


def _merge_weighted(p: _Problem, parts):
    """Global ``log sum`` (backend array [K]) of per-block column sums kept relative to a ``top``."""
    M = max([t for _, t, *_ in parts], default=-math.inf)
    if p.world:
        M = float(_all_reduce(torch.tensor([M], dtype=torch.float64, device=p.device), p.world, "max"))
    total_t = _zeros64(p.k, p.device)
    total = _backend(total_t)
    for acc, t, *_ in parts:
        if t > -math.inf:
            total += acc * math.exp(t - M)
    _all_reduce(total_t, p.world)
    return M + _xp(p.device).log(total)  # -inf where a sum underflowed (or no rows anywhere)


def _col_logsumexp(p: _Problem, f: Tensor | None):
    """Exact ``log sum_i exp(scores[i, j] / eps + f[i])`` per column (global, float64 backend [K]):
    an online logsumexp over row chunks (per-column running max), merged over blocks and ranks."""
    inv = 1.0 / p.eps
    fb = _backend(f) if f is not None else None
    with _RowBlocks(p) as rb:

        def block(s0, e0):
            xp = _xp(p.device)
            z_buf = _backend(torch.empty(rb.rows, p.k, dtype=_LOG_DT, device=p.device))
            mx = _backend(torch.full((p.k,), -math.inf, dtype=_LOG_DT, device=p.device))
            acc = _backend(torch.zeros(p.k, dtype=_LOG_DT, device=p.device))
            for s, e in rb.chunks(s0, e0):
                z = z_buf[: e - s]
                _scaled_into(rb.scores(s, e), inv, z)
                if fb is not None:
                    z += fb[s:e, None]
                new = xp.maximum(mx, _amax(z, 0))
                new = xp.where(xp.isfinite(new), new, 0.0)  # columns still at -inf: any shift
                acc *= xp.exp(mx - new)  # exp(-inf) = 0 for columns first seen now
                mx = new
                z -= new
                xp.exp(z, out=z)
                acc += z.sum(0)
            return mx, acc

        parts = rb.map(block)
    xp = _xp(p.device)
    mx = _backend(torch.full((p.k,), -math.inf, dtype=torch.float64, device=p.device))
    for m_, _ in parts:
        mx = xp.maximum(mx, m_)
    mx_t = _tensor(mx)
    _all_reduce(mx_t, p.world, "max")
    total_t = _zeros64(p.k, p.device)
    total = _backend(total_t)
    for m_, a_ in parts:
        total += a_ * xp.exp(m_ - mx)
    _all_reduce(total_t, p.world)
    return mx + xp.log(total)  # backend array; -inf where a column got no mass


def _log_pass(p: _Problem, g, f: Tensor, loga, fi1: float = 1.0, ra=None,
              track: bool = False) -> tuple[object, float]:
    """One log-domain iteration over row chunks (float64): the row update, then the columns.

    Row update, POT's ``sinkhorn_log`` (balanced, ``fi1 = 1``) or Chizat et al.'s unbalanced one:
    ``f = fi1 (log a - LSE_j(S/eps + g)) + (1 - fi1) ra``. With ``E = exp(T - r)``,
    ``T = S/eps + g`` and r its row max, the rows of the plan ``exp(S/eps + f + g)`` are
    ``E * exp(r + f)``, so its column masses are one weighted GEMV over E: one exp per entry
    (POT's pair of logsumexps takes two). Returns (log column masses of the new plan, float64
    backend array [K], global; max |f - f_before| if ``track``). Columns whose sum underflowed are redone exactly.
    """
    inv = 1.0 / p.eps
    gb, fb = g, _backend(f)  # g: backend array (numpy on CPU)
    with _RowBlocks(p) as rb:

        def block(s0, e0):
            xp = _xp(p.device)
            t_buf = _backend(torch.empty(rb.rows, p.k, dtype=_LOG_DT, device=p.device))
            acc = _backend(torch.zeros(p.k, dtype=_LOG_DT, device=p.device))
            tmp = _backend(torch.empty(p.k, dtype=_LOG_DT, device=p.device))
            top, change = -math.inf, 0.0
            for s, e in rb.chunks(s0, e0):
                t = t_buf[: e - s]
                _scaled_into(rb.scores(s, e), inv, t)
                t += gb
                r = _amax(t, 1)
                t -= r[:, None]
                xp.exp(t, out=t)
                fc = loga[s:e] - (r + xp.log(t.sum(1)))
                if fi1 != 1.0:
                    fc = fi1 * fc + (1.0 - fi1) * ra[s:e]
                if track and e > s:
                    change = max(change, float(abs(fc - fb[s:e]).max()))
                fb[s:e] = fc
                lw = r + fc  # plan rows = E * exp(lw)
                hi = float(lw.max()) if e > s else -math.inf
                if hi > top:
                    acc *= math.exp(top - hi) if top > -math.inf else 0.0
                    top = hi
                _dot(xp.exp(lw - top), t, tmp)
                acc += tmp
            return acc, top, change

        parts = rb.map(block)
    lcol = _merge_weighted(p, parts)
    if not bool(_xp(p.device).isfinite(lcol).all()):  # a column's mass underflowed: exact LSE
        lcol = _col_logsumexp(p, f) + g
    change = max([c for *_, c in parts], default=0.0)
    if track and p.world:
        t_ = torch.tensor([change], dtype=torch.float64, device=p.device)
        change = float(_all_reduce(t_, p.world, "max"))
    return lcol, change


def _l2(x) -> float:
    return float(np.linalg.norm(x)) if isinstance(x, np.ndarray) else float(torch.linalg.vector_norm(x))


def _zeros64(k: int, device: torch.device) -> Tensor:
    """float64 zeros, numpy-allocated on CPU so that no torch kernel runs (see _full)."""
    if device.type == "cpu":
        return torch.from_numpy(np.zeros(k))
    return torch.zeros(k, dtype=torch.float64, device=device)


def _tensor(x) -> Tensor:
    """A backend array back as a tensor (shares memory)."""
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


# --------------------------------------------------------------------------------------------
# the balanced solver


def _solve(p: _Problem, n_iters: int | None, tol: float, max_iters: int, log_domain: bool | None,
           return_plan: bool) -> SinkhornResult:
    # kernel form with the plan: build the kernel in the output buffer during the scan
    build = return_plan and log_domain is not True
    plan = _empty_plan(p.n, p.k, p.dt, p.device) if return_plan else None
    m, m_min, log_top, log_ktu, M = _scan(p, plan if build else None)
    T = _log_threshold(p.dt)
    kernel_ok = bool(log_top.min() >= -T)
    use_log = (not kernel_ok) if log_domain is None else bool(log_domain)
    # switching to the log domain is routine in auto mode, worth a warning when it was ruled out
    note = log.warning if log_domain is False else log.debug
    if log_domain is False and not kernel_ok:
        note("Sinkhorn: some column of exp(scores/eps) underflows in %s; the kernel form may fall "
             "back to the log domain", p.dt)

    budget = n_iters if n_iters is not None else max_iters
    # g = log v after POT's first column normalisation from a uniform u (float64)
    g = None  # float64 backend array (numpy on CPU)
    logb = _xp(p.device).log(_backend(p.b))
    if log_ktu is not None and M - m_min <= T * p.eps:  # global numbers: every rank decides alike
        g = logb - log_ktu  # row weights were all representable
        if not _v_range_ok(g, p.dt):
            g = None  # some column sum underflowed: redo it exactly
    if g is None:
        g = logb - _col_logsumexp(p, None)
    if not use_log and not _v_range_ok(g, p.dt):
        note("Sinkhorn: the first column scaling spans more than the %s range; using the log domain",
             p.dt)
        use_log = True

    f = torch.empty(p.n, dtype=torch.float64, device=p.device)
    it, err, done = 0, math.inf, False
    check = _CHECK_EVERY_ACCEL if _lazy_checks(p.device) else 1
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
        _assemble_log_plan(p, f, g, plan)
    converged = err <= tol
    if n_iters is None and not converged:
        log.warning("Sinkhorn did not converge: marginal error %.3g > tol %.3g after %d iterations "
                    "(raise max_iters or eps)", err, tol, it)
    return SinkhornResult(plan, it, err, converged, f, _tensor(g), use_log)


def _lazy_checks(device: torch.device) -> bool:
    """Read errors and range flags only every ``_CHECK_EVERY_ACCEL`` iterations: on accelerators each
    read synchronises the stream; on CPU they are free and checked every iteration."""
    return device.type != "cpu"


def _v_range_ok(g, dt: torch.dtype) -> bool:
    """Can ``v = exp(g - max g)`` be held in ``dt`` with room for the products with the kernel?"""
    xp = np if isinstance(g, np.ndarray) else torch
    return bool(xp.isfinite(g).all()) and float(g.max() - g.min()) <= 1.5 * _log_threshold(dt)


def _kernel_iterations(p, m, plan, g, f, budget, stop_on_tol, tol, check):
    """Scaling-form iterations on exp((S - m)/eps); one fused pass over the rows per iteration.

    Returns (iterations done, error, stopped, g = log v in float64, ok). ``ok=False`` means u or v
    left the float range; g then is the last good log v and the caller continues in log domain.
    """
    dt, dev = p.dt, p.device
    xp = _xp(dev)
    g = g - g.max()  # float64 log v (backend array): the exact state; the constant moves to u
    u = torch.empty(p.n, dtype=dt, device=dev)
    v = torch.empty(p.k, dtype=dt, device=dev)
    col_t = _zeros64(p.k, dev)  # all-reduced in place through its tensor
    ab, ub, vb, mb, fb = _cast(_backend(p.a), dt), _backend(u), _backend(v), _backend(m), _backend(f)
    colb, bb = _backend(col_t), _backend(p.b)
    logb = xp.log(bb)
    vb[:] = xp.exp(g)
    Kb = _backend(plan) if plan is not None else None
    inv = 1.0 / p.eps
    fused = Kb is not None and ot_triton.available(Kb)
    lazy = _lazy_checks(dev)  # accelerators: read the range flags (a sync) only when checking

    it, err, done, ok = 0, math.inf, False, True
    with _RowBlocks(p) as rb:  # (overflow is detected below; numpy warnings are off, see _quiet)

        def finish_rows(s, e) -> None:
            """Scale kernel rows into the plan; log u in the unshifted frame:
            P = u exp((S - m)/eps) v = exp(S/eps + log u - m/eps + log v)."""
            if Kb is not None:
                _scale_rows(Kb[s:e], ub[s:e], vb)
            xp = np if isinstance(fb, np.ndarray) else torch
            fb[s:e] = xp.log(_cast(ub[s:e], torch.float64)) - _cast(mb[s:e], torch.float64) * inv

        def block(s0, e0, last=False):
            """u = a / (K v) on rows s0:e0 and their K^T u, chunk by chunk (each read once). In a
            known last iteration the chunk is also scaled into the plan while in cache."""
            acc = _backend(torch.zeros(p.k, dtype=torch.float64, device=dev))
            if fused:  # GPU: one Triton pass over the rows, K read once (selflabel/ot_triton.py)
                ot_triton.fused_pass(Kb[s0:e0], vb, ab[s0:e0], ub[s0:e0], acc)
                if last:
                    finish_rows(s0, e0)
                return acc
            tmp = _backend(torch.empty(p.k, dtype=dt, device=dev))
            kv = _backend(torch.empty(rb.rows, dtype=dt, device=dev))
            scratch = None if Kb is not None else _backend(torch.empty(rb.rows, p.k, dtype=dt, device=dev))
            for s, e in rb.chunks(s0, e0):
                if Kb is not None:
                    Kc = Kb[s:e]
                else:  # streamed: recompute the kernel rows (one exp per entry per iteration)
                    Kc = scratch[: e - s]
                    _kernel_into(rb.scores(s, e), mb[s:e], inv, Kc)
                kvc = kv[: e - s]
                _dot(Kc, vb, kvc)  # K v
                _div(ab[s:e], kvc, ub[s:e])  # u = a / K v
                _dot(ub[s:e], Kc, tmp)  # K^T u, same chunk, still in cache
                acc += tmp
                if last:
                    finish_rows(s, e)
            return acc

        finished = False
        good, bad = (it, g), None  # lazy mode: the last state known to be in range, and the pending flag

        def in_range(x):
            """all finite and > 0: a bool, or on accelerators a device tensor read at the next check."""
            flag = xp.isfinite(x).all() & (x > 0).all()
            return flag if lazy else bool(flag)

        while it < budget:
            finished = not stop_on_tol and it == budget - 1
            parts = rb.map(lambda s0, e0: block(s0, e0, finished))
            colb[:] = 0.0
            for c in parts:
                colb += c
            _all_reduce(col_t, p.world)
            flag = in_range(colb)
            if lazy:
                bad = ~flag if bad is None else bad | ~flag
            elif not flag:
                ok = False
                break
            it += 1
            # rows are exact now; v * K^T u are the columns of the current plan
            if it == budget or (stop_on_tol and it % check == 0):
                if lazy and bool(bad):  # left the range since the last check: go back there
                    ok, (it, g) = False, good
                    break
                err = _l2(colb * xp.exp(g) - bb)
                if stop_on_tol and err <= tol:
                    done = True
                    break
            if it == budget:
                break
            g = logb - xp.log(colb)  # float64: finite (col > 0) even where dt is not
            vb[:] = xp.exp(g)
            flag = in_range(vb)  # left dt's range?
            if lazy:
                bad = bad | ~flag
                if it % check == 0:  # one sync per `check` iterations
                    if bool(bad):
                        ok, (it, g) = False, good
                        break
                    good, bad = (it, g), None
            elif not flag:
                ok = False
                break
        if not ok:  # (a plan scaled in a failed last pass is rebuilt by the log domain)
            return it, err, False, g, False
        if not finished:

            def finish(s0, e0):
                for s, e in rb.chunks(s0, e0):
                    finish_rows(s, e)

            rb.map(finish)
    return it, err, done, g, True


def _log_iterations(p, g, f, it, budget, stop_on_tol, tol, check):
    """Log-domain iterations (POT's ``sinkhorn_log`` order: rows from g, then columns).
    ``g``: float64 backend array (numpy on CPU), returned updated."""
    err, done = math.inf, False
    xp, bb = _xp(p.device), _backend(p.b)
    logb, loga = xp.log(bb), _backend(_log_vec(p.a))
    while it < budget:
        lcol, _ = _log_pass(p, g, f, loga)
        it += 1
        if it == budget or (stop_on_tol and it % check == 0):
            err = _l2(xp.exp(lcol) - bb)
            if stop_on_tol and err <= tol:
                done = True
                break
        if it == budget:
            break
        g = g + logb - lcol
    return it, err, done, g


def _log_vec(x: Tensor) -> Tensor:
    """log of a float64 vector (numpy on CPU, see _full)."""
    return torch.from_numpy(np.log(x.numpy())) if _numpy_path(x.device) else torch.log(x)


def _assemble_log_plan(p: _Problem, f: Tensor, g: Tensor, out: Tensor) -> None:
    """out = exp(S/eps + f + g), exponent formed in float64 so large potentials cancel exactly."""
    inv, fb, gb, ob = 1.0 / p.eps, _backend(f), g, _backend(out)  # g: backend array
    with _RowBlocks(p) as rb:

        def block(s0, e0):
            xp = _xp(p.device)
            z_buf = _backend(torch.empty(rb.rows, p.k, dtype=_LOG_DT, device=p.device))
            for s, e in rb.chunks(s0, e0):
                z = z_buf[: e - s]
                _scaled_into(rb.scores(s, e), inv, z)
                z += fb[s:e, None]
                z += gb
                xp.exp(z, out=z)
                if isinstance(z, np.ndarray):
                    ob[s:e] = z
                else:
                    ob[s:e].copy_(z)

        rb.map(block)


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

    Memory: the input, the returned plan (float32 unless the scores are float64; the kernel is built
    in it) and row-chunk temporaries of about a megabyte per worker thread, nothing else N x K.
    """
    if n_iters is not None and n_iters < 1:
        raise ValueError("n_iters must be >= 1")
    if max_iters < 1:
        raise ValueError("max_iters must be >= 1")
    p = _prepare(scores, a, b, eps, distributed)
    return _quiet(_solve, p, n_iters, tol, max_iters, log_domain, return_plan)


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
    res = _quiet(_solve, p, n_iters, 0.0, n_iters, None, True)
    _backend(res.plan)[...] *= p.n_global
    return res.plan


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
    return _quiet(_unbalanced, p, fi, reg_type, n_iters, tol, max_iters, return_plan)


def _unbalanced(p: _Problem, fi, reg_type: str, n_iters, tol: float, max_iters: int,
                return_plan: bool) -> SinkhornResult:
    """The log-domain loop of :func:`sinkhorn_unbalanced` (POT's order: rows, then columns)."""
    xp, bb = _xp(p.device), _backend(p.b)
    loga, logb = _backend(_log_vec(p.a)), xp.log(bb)
    ra, rb = (loga, logb) if reg_type == "kl" else (loga * 0.0, logb * 0.0)
    _scan(p)  # validates the scores (NaN, rows or columns that are -inf everywhere)

    budget = n_iters if n_iters is not None else max_iters
    f = _full(p.n, 0.0, p.device)
    g = rb + 0.0  # POT starts from u = v = 1 on the kernel exp(S/eps) * c
    it, change, err = 0, math.inf, math.inf
    converged = False
    while it < budget:
        lcol, df = _log_pass(p, g, f, loga, fi[0], ra, track=True)
        lse_col = lcol - g  # LSE_i(S/eps + f)
        g_new = fi[1] * (logb - lse_col) + (1.0 - fi[1]) * rb
        it += 1
        change = max(float(abs(g_new - g).max()), df)
        g = g_new
        if n_iters is None and change <= tol:
            converged = True
            break
    # (f, g) is POT's last (u, v) pair: f from the previous g, g from this f
    plan = _empty_plan(p.n, p.k, p.dt, p.device) if return_plan else None
    if plan is not None:
        _assemble_log_plan(p, f, g, plan)
    if it:
        err = _l2(xp.exp(lse_col + g) - bb)
    if n_iters is not None:
        converged = change <= tol
    elif not converged:
        log.warning("Unbalanced Sinkhorn did not converge: potentials still move by %.3g after %d "
                    "iterations", change, it)
    return SinkhornResult(plan, it, err, converged, f, _tensor(g), True)


@torch.no_grad()
def assign(plan: Tensor) -> tuple[Tensor, Tensor]:
    """Hard labels from a plan: ``labels[i] = argmax_j plan[i, j]`` (int64) and ``confidence[i]``,
    the probability of that cluster within row i (``max / row sum``, float32 in [0, 1])."""
    if plan.device.type == "cpu" and plan.dtype in (torch.float32, torch.float64):
        x = plan.numpy()  # numpy: no OpenMP wake-ups (see _full)
        labels = x.argmax(axis=1)
        conf = x[np.arange(x.shape[0]), labels] / x.sum(axis=1, dtype=np.float64)
        return torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(conf.astype(np.float32))
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
