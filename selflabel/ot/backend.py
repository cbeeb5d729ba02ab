"""The array shim of the passes: numpy views on CPU, torch ops elsewhere (POT's ``ot/backend.py`` idea).

On CPU every pass over the rows runs as numpy/OpenBLAS calls in our own threads (see ``rows.py``):
measured on the shared 2-core AMD EPYC of the benchmark, torch's OpenMP regions and OpenBLAS's
spinning threads fighting for the cores made the setup of a 50k x 1,000 problem 15x slower (5.7 s vs
0.37 s); MKL's sgemv in the torch wheel read 11 GB/s where OpenBLAS read 25-28 GB/s; numpy's float32
exp ran 1.7x faster than torch's on one thread. Vector maths on CPU goes through numpy views too: any
torch op between our numpy calls woke libgomp's spinning workers, which then took the core from the
numpy thread (3-8x slower solves once ``torch.set_num_threads`` had been called).

Every helper that must know which path it is on asks :func:`numpy_path` at call time (tests flip it
to run the torch branch, what CUDA executes, on CPU tensors).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

# The log domain is the fallback for exponents beyond the float32 range (|scores/eps| up to 1e3 and
# more), where float32 sums of potentials lose ~1e-4 nats; its row-chunk temporaries are float64.
LOG_DT = torch.float64


def numpy_path(device: torch.device) -> bool:
    """Whether the passes run as numpy on CPU (else torch ops)."""
    return device.type == "cpu"


def backend(t: Tensor):
    """A numpy view of a CPU tensor (shares memory), the tensor itself elsewhere."""
    return t.numpy() if numpy_path(t.device) else t


def xp_for(device: torch.device):
    """The array module of the passes on ``device``."""
    return np if numpy_path(device) else torch


def xp_of(x):
    """The array module of an array (numpy or torch)."""
    return np if isinstance(x, np.ndarray) else torch


def as_tensor(x) -> Tensor:
    """A backend array back as a tensor (shares memory)."""
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def world(distributed: bool) -> bool:
    """True when a process group is up and the caller asked for distributed reductions."""
    return distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(t: Tensor, in_world: bool, op: str = "sum") -> Tensor:
    """In-place sum (or max) over the ranks when ``in_world``; ``t`` unchanged otherwise."""
    if in_world:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 scores are computed in float32 (exp overflows float16 at 11)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def numpy_dtype(dtype: torch.dtype):
    return torch.empty(0, dtype=dtype).numpy().dtype


# --- allocation: numpy-allocated on CPU so that no torch kernel runs -------------------------


def full64(n: int, value: float, device: torch.device) -> Tensor:
    """float64 vector filled with ``value``."""
    if device.type == "cpu":
        return torch.from_numpy(np.full(n, value))
    return torch.full((n,), value, dtype=torch.float64, device=device)


def zeros64(k: int, device: torch.device) -> Tensor:
    return full64(k, 0.0, device)


def empty_plan(n: int, k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The N x K output buffer. On CPU allocated by numpy, which asks Linux for transparent huge
    pages: first-touching 200 MB took 25-40 ms that way, 140-180 ms through ``torch.empty``."""
    if device.type == "cpu":
        return torch.from_numpy(np.empty((n, k), dtype=numpy_dtype(dtype)))
    return torch.empty(n, k, dtype=dtype, device=device)


def scratch(shape, dtype: torch.dtype, device: torch.device, fill: float | None = None):
    """A backend work array (uninitialised unless ``fill``)."""
    t = torch.empty(shape, dtype=dtype, device=device) if fill is None else \
        torch.full(shape, fill, dtype=dtype, device=device)
    return backend(t)


def cast(x, dtype: torch.dtype):
    """x (numpy or torch) converted to the numpy/torch version of ``dtype``."""
    if isinstance(x, np.ndarray):
        return x.astype(numpy_dtype(dtype), copy=False)
    return x.to(dtype)


def log_vec(x: Tensor) -> Tensor:
    """log of a float64 vector (numpy on CPU)."""
    return torch.from_numpy(np.log(x.numpy())) if numpy_path(x.device) else torch.log(x)


# --- the operations of the passes ------------------------------------------------------------


def dot(x, y, out):
    """out = x @ y for vector @ matrix, matrix @ vector and matrix @ matrix."""
    if isinstance(out, np.ndarray):
        return np.dot(x, y, out=out)
    if x.dim() == 1:  # vector @ matrix
        return torch.mv(y.t(), x, out=out)
    return torch.mv(x, y, out=out) if y.dim() == 1 else torch.mm(x, y, out=out)


def div(x, y, out):
    if isinstance(out, np.ndarray):
        return np.divide(x, y, out=out)
    return torch.div(x, y, out=out)


def kernel_into(x, m, inv: float, out, row_max=None) -> None:
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


def scale_rows(x, u, v) -> None:
    """x *= u[:, None] * v[None, :] in place."""
    if isinstance(x, np.ndarray):
        np.multiply(x, u[:, None], out=x)
        np.multiply(x, v, out=x)
    else:
        x.mul_(u[:, None]).mul_(v)


def block_stats(x, m_out, work):
    """Row maxima of x into m_out; returns the column maxima of x - m."""
    if isinstance(x, np.ndarray):
        np.max(x, axis=1, out=m_out)
        np.subtract(x, m_out[:, None], out=work)
        return work.max(axis=0)
    torch.amax(x, dim=1, out=m_out)
    torch.sub(x, m_out[:, None], out=work)
    return work.amax(0)


def scaled_into(x, inv: float, out) -> None:
    """out = x * inv computed in out's dtype (float64 for the log domain)."""
    if isinstance(out, np.ndarray):
        np.multiply(x, inv, out=out, dtype=out.dtype)
    else:
        out.copy_(x).mul_(inv)


def relax_into(old, new, omega: float, out) -> None:
    """out = old ** (1 - omega) * new ** omega: an over-relaxed scaling step (positive vectors)."""
    if isinstance(out, np.ndarray):
        np.power(old, 1.0 - omega, out=out)
        out *= np.power(new, omega)
    else:
        torch.pow(old, 1.0 - omega, out=out).mul_(torch.pow(new, omega))


def amax(x, axis: int):
    return x.max(axis=axis) if isinstance(x, np.ndarray) else x.amax(axis)


def l2(x) -> float:
    return float(np.linalg.norm(x)) if isinstance(x, np.ndarray) else float(torch.linalg.vector_norm(x))


def in_range(x):
    """All finite and > 0: a numpy bool, or a device tensor (read it only when needed: a sync)."""
    return xp_of(x).isfinite(x).all() & (x > 0).all()


def log_threshold(dtype: torch.dtype) -> float:
    """Largest kernel dynamic range (in nats) the scaling form is trusted with: half the exponent
    range of the dtype (44 for float32), so ``u``, ``v`` and their products stay representable."""
    return 0.5 * math.log(torch.finfo(dtype).max)


def v_range_ok(g, dt: torch.dtype) -> bool:
    """Can ``v = exp(g - max g)`` be held in ``dt`` with room for the products with the kernel?"""
    return bool(xp_of(g).isfinite(g).all()) and float(g.max() - g.min()) <= 1.5 * log_threshold(dt)
