"""Row blocks of the passes: chunk sizes, the CPU worker pool and BLAS held to one thread.

Every pass reads the N x K scores or kernel in row chunks small enough to stay in cache, grouped
into fixed reduction groups that worker threads take in contiguous runs (CPU) or that run as torch
ops in one go (GPU). Partial results come back per group, in group order, whatever the number of
workers: the float sums (and so the answer, to the bit) do not depend on the machine's load.
"""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import backend as B

try:  # scikit-learn's dependency; without it BLAS keeps its own threads
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - depends on the installation
    ThreadpoolController = None

# Rows per chunk are chosen so that one chunk of the kernel has about this many bytes.
PASS_BYTES = 1 << 20  # row chunks of every pass: still in L2 for the second product
GROUP_CHUNKS = 16  # chunks per reduction group (the unit of work of a thread)
BULK_BYTES = 4 << 20  # assign_from_potentials' float64 temporaries
ACCEL_BYTES = 256 << 20  # GPUs have no cache to fuse in; big chunks only bound the temporaries


def rows_per_chunk(n: int, k: int, device: torch.device, nbytes: int, itemsize: int = 4) -> int:
    if device.type != "cpu":
        nbytes = ACCEL_BYTES
    return max(1, min(n, nbytes // max(1, k * itemsize)))


def chunks(start: int, end: int, rows: int):
    """(s, e) row ranges of at most ``rows`` rows covering [start, end)."""
    for s in range(start, end, rows):
        yield s, min(end, s + rows)


def cpu_workers() -> int:
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


_POOL: ThreadPoolExecutor | None = None
_BLAS_CONTROLLER = None


def worker_pool() -> ThreadPoolExecutor:
    """One process-wide pool (idle threads block, they do not spin): starting threads per call cost
    ~8 ms each on the loaded benchmark machine."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix="selflabel-sinkhorn")
    return _POOL


def one_blas_thread(device: torch.device):
    """Hold numpy's BLAS to one thread while our own threads split the rows (CPU only)."""
    global _BLAS_CONTROLLER
    if not B.numpy_path(device) or ThreadpoolController is None:
        return contextlib.nullcontext()
    try:
        if _BLAS_CONTROLLER is None:
            _BLAS_CONTROLLER = ThreadpoolController()
        return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")
    except Exception:  # threadpoolctl unable to see the library: run as is
        return contextlib.nullcontext()


def quiet(fn, *args):
    """Run fn with numpy's floating-point warnings off (errstate is per thread): overflow and
    log(0) are expected in the passes and checked explicitly by the callers."""
    with np.errstate(all="ignore"):
        return fn(*args)


class RowBlocks:
    """Row groups of ``GROUP_CHUNKS`` chunks over a problem's local rows (``p``: a ``Problem``)."""

    def __init__(self, p):
        self.p = p
        self.rows = p.rows(PASS_BYTES)
        span = self.rows * GROUP_CHUNKS
        self.groups = [(s, min(p.n, s + span)) for s in range(0, p.n, span)] or [(0, 0)]
        workers = max(1, min(cpu_workers(), len(self.groups))) if p.device.type == "cpu" else 1
        per = -(-len(self.groups) // workers)
        self.runs = [self.groups[i: i + per] for i in range(0, len(self.groups), per)]
        self.pool = worker_pool() if len(self.runs) > 1 else None

    def __enter__(self):
        self._blas = one_blas_thread(self.p.device)
        self._blas.__enter__()
        return self

    def __exit__(self, *exc):
        self._blas.__exit__(*exc)

    def map(self, fn) -> list:
        """[fn(start, end) for each group], in group order; runs of groups in parallel."""
        if self.pool is None:
            return [fn(s, e) for s, e in self.groups]
        futures = [self.pool.submit(quiet, lambda run: [fn(s, e) for s, e in run], run) for run in self.runs]
        return [r for f in futures for r in f.result()]

    def chunks(self, s: int, e: int):
        return chunks(s, e, self.rows)

    def scores(self, s: int, e: int):
        """Rows s:e of the scores in the compute dtype, as numpy on CPU (a view unless converted)."""
        p = self.p
        x = p.scores[s:e]
        if not B.numpy_path(x.device):
            return x.to(p.dt)
        if x.dtype == p.dt:
            return x.numpy()
        if x.dtype == torch.float16:
            return x.numpy().astype(np.float32)
        return x.to(p.dt).numpy()  # bfloat16: numpy has no such type
