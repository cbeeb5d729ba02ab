"""torch.distributed plumbing for `torchrun`: one context object, set up once at the edge.

Backend nccl on GPUs (with gloo beside it for the CPU tensors some steps reduce: "cpu:gloo,cuda:nccl"),
gloo on CPUs; collectives time out (SELFLABEL_DIST_TIMEOUT seconds, default
600) so a failed rank stops the job with an error instead of hanging it. The one exception is
`wait_for_main`: the other ranks wait for a stage only rank 0 runs (the dense stage), however long it
takes, on a gloo group of its own with no practical deadline (a dead rank 0 still ends the job:
torchrun stops the others). Rows are split in contiguous blocks, so rank r of a row-distributed
Sinkhorn holds rows [start:end).
"""
from __future__ import annotations

import datetime
import gc
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

from .errors import SelflabelError

log = logging.getLogger(__name__)
T = TypeVar("T")
NO_DEADLINE = datetime.timedelta(days=365)  # the wait group's timeout: a rank-0-only stage of any length
_wait_group: Any = None  # created with the default group, on every rank (new_group is collective)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def uses_nccl(self) -> bool:
        """CUDA tensors travel through nccl (the group may also have gloo for CPU tensors)."""
        return self.backend is not None and "nccl" in str(self.backend)

    @property
    def comm_device(self) -> torch.device:
        """Where collectives' own tensors live: this rank's GPU under nccl, else the CPU."""
        return torch.device("cuda", self.local_rank) if self.uses_nccl else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def block(self, n: int) -> tuple[int, int]:
        """This rank's contiguous [start, end) of n rows (sizes differ by at most one)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)


def context() -> DistContext:
    """The current context (single process when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_backend())
    return DistContext()


def process_group_backend(use_cuda: bool) -> str:
    """nccl carries only CUDA tensors; gloo beside it takes the CPU ones (label steps, loss means)."""
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


def init_from_env(device: str = "auto", timeout_s: float | None = None) -> DistContext:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if dist.is_initialized():
        return context()
    use_cuda = torch.cuda.is_available() and device != "cpu"
    backend = process_group_backend(use_cuda)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise SelflabelError(
                f"rank with LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) visible: one process "
                "per GPU (torchrun --nproc_per_node <= the GPU count), or --device cpu for CPU processes (gloo)")
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=float(timeout_s or os.environ.get("SELFLABEL_DIST_TIMEOUT", 600)))
    try:
        dist.init_process_group(backend=backend, timeout=timeout)
    except Exception as exc:  # rendezvous failure: say which settings to check
        raise SelflabelError(f"distributed set-up failed ({backend}, MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                             f"MASTER_PORT={os.environ.get('MASTER_PORT')}): {exc}") from None
    global _wait_group
    _wait_group = dist.new_group(backend="gloo", timeout=NO_DEADLINE)
    ctx = context()
    log.info("distributed: rank %d/%d backend %s", ctx.rank, ctx.world_size, backend)
    if os.environ.get("SELFLABEL_TEST_FAIL_RANK") == str(ctx.rank):  # testing hook: one rank dies after set-up
        raise SelflabelError(f"rank {ctx.rank} failed on purpose (SELFLABEL_TEST_FAIL_RANK)")
    return ctx


def device_for(ctx: DistContext, requested: str = "auto") -> torch.device:
    """cuda:LOCAL_RANK under nccl, else what was asked for."""
    if ctx.uses_nccl:
        return ctx.comm_device
    from .features import resolve_device

    return resolve_device(requested)


def shard(items: Sequence[T], ctx: DistContext) -> list[T]:
    """This rank's contiguous block of `items` (disjoint across ranks, covering all)."""
    s, e = ctx.block(len(items))
    return list(items[s:e])


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_gather_blocks(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate every rank's block (rank order) along dim 0: the inverse of `ctx.block` row splits.

    Blocks may differ in length by one row; they are padded to the longest for `all_gather` (gloo and
    nccl alike; under nccl the tensor travels on this rank's GPU and comes back on t's device).
    """
    if not ctx.enabled:
        return t
    comm = ctx.comm_device
    sizes = [torch.zeros(1, dtype=torch.long, device=comm) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], device=comm))
    sizes_i = [int(x.item()) for x in sizes]
    longest = max(sizes_i)
    pad = torch.zeros((longest - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=comm)
    mine = torch.cat([t.to(comm), pad])
    parts = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(parts, mine)
    return torch.cat([p[:m] for p, m in zip(parts, sizes_i)]).to(t.device)


def mean_over_ranks(value: float, ctx: DistContext) -> float:
    """The mean of a per-rank number (e.g. an epoch's loss) over ranks."""
    if not ctx.enabled:
        return value
    comm = ctx.comm_device
    t = torch.tensor([value], dtype=torch.float64, device=comm)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / ctx.world_size


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def wait_for_main(ctx: DistContext) -> None:
    """Every rank waits here until rank 0 arrives, without the collectives' deadline: for a stage only
    rank 0 runs, which may take longer than SELFLABEL_DIST_TIMEOUT."""
    if ctx.enabled:
        dist.barrier(group=_wait_group)


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """In-place sum over ranks (no-op in a single process)."""
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group after collecting garbage: a DDP module still alive in a reference
    cycle when the group goes away aborts the process at exit (C++ terminate)."""
    if ctx.enabled and dist.is_initialized():
        global _wait_group
        gc.collect()
        dist.barrier()
        _wait_group = None
        dist.destroy_process_group()
