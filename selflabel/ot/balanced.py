"""The balanced solver: :func:`sinkhorn` (SeLa's label step, POT's ``ot.sinkhorn``) and
:func:`sinkhorn_codes` (SwAV's codes). Chooses the kernel or the log domain, starts from POT's first
column normalisation or a warm start, and runs the (over-relaxed) iterations to the stopping rule."""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from . import backend as B
from . import problem as P
from .kernel import kernel_iterations, scan
from .logdomain import assemble_log_plan, col_logsumexp, log_iterations
from .problem import Problem, SinkhornResult, as_vector, prepare
from .relax import schedule
from .rows import quiet

log = logging.getLogger(__name__)


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
    relax: float | str = "auto",
    init: SinkhornResult | Tensor | None = None,
) -> SinkhornResult:
    """Balanced entropic OT plan between the rows and columns of ``scores`` (Cuturi 2013).

    Solves ``max <P, scores> + eps H(P)`` s.t. ``P 1 = a``, ``P^T 1 = b``: the same problem as POT's
    ``ot.sinkhorn(a, b, -scores, eps)`` (method ``sinkhorn`` in kernel form, ``sinkhorn_log`` in log
    domain), with POT's iterates when the steps are plain. This is SeLa's label step (Asano et al.,
    ICLR 2020) with ``eps = 1 / lambda`` and ``b`` the cluster-size prior.

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
        relax: over-relaxed steps (``relax.py``; same fixed point, fewer iterations). ``'auto'``:
            adaptive when iterating to ``tol``, plain (POT's and SwAV's iterates) with ``n_iters``;
            ``'adaptive'``; or a fixed step in (0, 2), ``1.0`` = plain Sinkhorn. Any relaxed schedule
            falls back to plain steps if the error grows.
        init: an earlier result on similar scores (e.g. SeLa's previous label step), or its [K]
            ``log_v``: the iterations start from that ``v`` instead of from a uniform ``u``, and an
            adaptive schedule from that result's estimated rate instead of from plain steps.

    Returns:
        :class:`SinkhornResult`; a warning is logged when ``n_iters is None`` and it did not converge.
        The returned plan has exact rows and is the one whose column error is ``marginal_err``.

    Memory: the input, the returned plan (float32 unless the scores are float64; the kernel is built
    in it) and row-chunk temporaries of about a megabyte per worker thread, nothing else N x K.
    """
    if n_iters is not None and n_iters < 1:
        raise ValueError("n_iters must be >= 1")
    if max_iters < 1:
        raise ValueError("max_iters must be >= 1")
    warm = init if isinstance(init, SinkhornResult) else None
    sched = schedule(relax, fixed_iterations=n_iters is not None, lam=warm.rate if warm is not None else 0.0)
    p = prepare(scores, a, b, eps, distributed)
    log_v = warm.log_v if warm is not None else init
    g0 = None if log_v is None else B.backend(as_vector(log_v, p.k, "init (log_v)", p.device, positive=False))
    return quiet(solve, p, n_iters, tol, max_iters, log_domain, return_plan, sched, g0)


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
    p = prepare(scores, None, None, eps, distributed)
    res = quiet(solve, p, n_iters, 0.0, n_iters, None, True, schedule(1.0, True), None)
    B.backend(res.plan)[...] *= p.n_global
    return res.plan


def first_potential(p: Problem, log_ktu, M, m_min: float, T: float):
    """g = log v after POT's first column normalisation from a uniform u (float64 backend array)."""
    logb = B.xp_for(p.device).log(B.backend(p.b))
    if log_ktu is not None and M - m_min <= T * p.eps:  # global numbers: every rank decides alike
        g = logb - log_ktu  # row weights were all representable
        if B.v_range_ok(g, p.dt):
            return g
    return logb - col_logsumexp(p, None)  # some column sum underflowed: redo it exactly


def solve(p: Problem, n_iters: int | None, tol: float, max_iters: int, log_domain: bool | None,
          return_plan: bool, sched, g0=None) -> SinkhornResult:
    """Pick the domain, start, iterate (kernel form, falling back to the log domain), build the plan."""
    build = return_plan and log_domain is not True  # kernel form: build the kernel in the plan buffer
    plan = B.empty_plan(p.n, p.k, p.dt, p.device) if return_plan else None
    m, m_min, log_top, log_ktu, M = scan(p, plan if build else None)
    T = B.log_threshold(p.dt)
    kernel_ok = bool(log_top.min() >= -T)
    use_log = (not kernel_ok) if log_domain is None else bool(log_domain)
    # switching to the log domain is routine in auto mode, worth a warning when it was ruled out
    note = log.warning if log_domain is False else log.debug
    if log_domain is False and not kernel_ok:
        note("Sinkhorn: some column of exp(scores/eps) underflows in %s; the kernel form may fall "
             "back to the log domain", p.dt)
    g = first_potential(p, log_ktu, M, m_min, T) if g0 is None else g0
    if not use_log and not B.v_range_ok(g, p.dt):
        note("Sinkhorn: the %s scaling spans more than the %s range; using the log domain",
             "first column" if g0 is None else "initial", p.dt)
        use_log = True

    budget = n_iters if n_iters is not None else max_iters
    stop_on_tol = n_iters is None
    f = torch.empty(p.n, dtype=torch.float64, device=p.device)
    lazy = P.lazy_checks(p.device)
    check = P.CHECK_EVERY_ACCEL if lazy else 1
    it, err, done = 0, math.inf, False
    if not use_log:
        it, err, done, g, ok = kernel_iterations(p, m, plan, g, f, budget, stop_on_tol, tol, check, sched, lazy)
        if not ok:
            (log.warning if log_domain is False else log.info)(
                "Sinkhorn: the scaling vectors left the %s range at iteration %d; continuing in the "
                "log domain", p.dt, it + 1)
            use_log = True
    if use_log:
        it, err, done, g = log_iterations(p, g, f, it, budget, stop_on_tol, tol, check, sched)
        if return_plan:
            assemble_log_plan(p, f, g, plan)
    converged = err <= tol
    if stop_on_tol and not converged:
        log.warning("Sinkhorn did not converge: marginal error %.3g > tol %.3g after %d iterations "
                    "(raise max_iters or eps)", err, tol, it)
    if sched.fell_back:
        log.info("Sinkhorn: over-relaxation fell back to plain steps at iteration %d (the error grew)",
                 sched.history[-1][0])
    return SinkhornResult(plan, it, err, converged, f, B.as_tensor(g), use_log, getattr(sched, "lam", 0.0))
