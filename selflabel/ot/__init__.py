"""Sinkhorn-Knopp: entropic optimal transport between N samples and K clusters.

Convention (docs/ARCHITECTURE.md): the kernel is ``exp(scores / eps)``, so
``sinkhorn(scores, a, b, eps=e)`` solves the problem of POT's
``ot.sinkhorn(a, b, M=-scores, reg=e)``: the plan ``P = diag(u) exp(scores/eps) diag(v)``
whose rows sum to ``a`` (default ``1/N``) and columns to ``b`` (default ``1/K``), i.e. the
equipartitioned pseudo-labels of SeLa [Asano et al. 2020] and the codes of SwAV [Caron et al. 2020].

How it is computed (Cuturi 2013; Peyre & Cuturi 2019, "Computational Optimal Transport", ch. 4),
one module per concern, every import pointing down the list:

* ``backend``: the array shim (numpy views on CPU, torch ops on GPUs) and the float-range rules.
* ``rows``: row chunks small enough to stay in cache, grouped for worker threads (BLAS held to one
  thread); partial sums merged in group order, so results do not depend on the thread count.
* ``problem``: validated scores and marginals (all-reduced when distributed), ``SinkhornResult``.
* ``relax``: the over-relaxation schedule (Lehmann et al. 2022): same fixed point, fewer passes.
* ``triton_pass``: one scaling iteration in one read of the kernel on a GPU.
* ``kernel``: the scaling form on ``exp((scores - rowmax) / eps)``, one pass over the rows per
  iteration, the marginal error for free after the row update.
* ``logdomain``: POT's ``sinkhorn_log`` updates in float64 row chunks, the fallback when ``u``/``v``
  would leave the float range (decided up front, or mid-run from the exact float64 potentials).
* ``balanced`` (``sinkhorn``, ``sinkhorn_codes``), ``unbalanced`` (``sinkhorn_unbalanced``),
  ``assign`` (labels from a plan or from the potentials).
* ``reference``: a 20-line log-domain Sinkhorn, the specification the fast paths are tested against.

Distributed (``distributed=True`` inside ``torch.distributed``): each rank holds a slice of the rows;
column sums, the global N and the total mass are all-reduced, as SwAV's ``distributed_sinkhorn``, and
every decision (domain, step size, stopping) is taken on all-reduced numbers, so ranks take it together.
"""
from .assign import assign, assign_from_potentials
from .balanced import sinkhorn, sinkhorn_codes
from .problem import SinkhornResult
from .reference import sinkhorn_reference
from .unbalanced import sinkhorn_unbalanced

__all__ = [
    "SinkhornResult",
    "sinkhorn",
    "sinkhorn_codes",
    "sinkhorn_unbalanced",
    "sinkhorn_reference",
    "assign",
    "assign_from_potentials",
]
