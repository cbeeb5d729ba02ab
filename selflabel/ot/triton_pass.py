"""One Sinkhorn scaling iteration on a GPU in a single read of the kernel (Triton).

``u = a / (K v)`` needs a whole row of K before any column can use ``u``; ``K^T u`` then needs every
row. torch does this as two matrix-vector products, reading the N x K kernel twice. Here each program
takes a block of rows, computes their ``K v`` tile by tile, then reads the same tiles again while
they are still in the GPU's L2 cache to add ``u_i K_ij`` into its own column partials: one pass over
device memory per iteration, as the CPU path does with cache-sized row chunks (see ``kernel.py``).

Persistent programs (a fixed grid, each looping over row blocks) keep one partial row per program,
summed afterwards in float64, so the result is deterministic on a given GPU. Used by ``kernel.py``
for a materialised float32/float64 kernel on CUDA when Triton is importable; torch ops otherwise.
"""
from __future__ import annotations

import functools

import torch

try:  # Triton ships with torch's CUDA wheels; absent elsewhere
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

BLOCK_ROWS = 16  # rows per block: the block's tiles must still be in L2 for the second read
BLOCK_COLS = 128  # columns per tile
PROGRAMS_PER_SM = 4


def available(t) -> bool:
    """Whether the fused pass can run on this array (a CUDA tensor, Triton present, float32/float64, contiguous)."""
    return (triton is not None and isinstance(t, torch.Tensor) and t.is_cuda and t.dtype in (torch.float32, torch.float64) and t.dim() == 2
            and t.is_contiguous())


if triton is not None:

    @triton.jit
    def _pass_kernel(K, v, a, u, partial, n_rows, n_cols, stride_k, n_programs,
                     BR: tl.constexpr, BC: tl.constexpr):
        pid = tl.program_id(0)
        rows_in_block = tl.arange(0, BR)
        cols_in_tile = tl.arange(0, BC)
        n_blocks = tl.cdiv(n_rows, BR)
        for blk in range(pid, n_blocks, n_programs):
            rows = blk * BR + rows_in_block
            rmask = rows < n_rows
            # pass 1: K v for the block's rows
            acc = tl.zeros((BR,), dtype=K.dtype.element_ty)
            for c0 in range(0, n_cols, BC):
                cols = c0 + cols_in_tile
                cmask = cols < n_cols
                tile = tl.load(K + rows[:, None] * stride_k + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                               other=0.0)
                vv = tl.load(v + cols, mask=cmask, other=0.0)
                acc += tl.sum(tile * vv[None, :], axis=1)
            aa = tl.load(a + rows, mask=rmask, other=1.0)
            uu = aa / acc
            uu = tl.where(rmask, uu, 0.0)
            tl.store(u + rows, uu, mask=rmask)
            # pass 2: the same tiles (now in L2) weighted by u, into this program's column partials
            for c0 in range(0, n_cols, BC):
                cols = c0 + cols_in_tile
                cmask = cols < n_cols
                tile = tl.load(K + rows[:, None] * stride_k + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                               other=0.0)
                contrib = tl.sum(tile * uu[:, None], axis=0)
                ptr = partial + pid * n_cols + cols
                tl.store(ptr, tl.load(ptr, mask=cmask, other=0.0) + contrib, mask=cmask)


@functools.lru_cache(maxsize=None)
def _n_programs(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count * PROGRAMS_PER_SM


def fused_pass(K: torch.Tensor, v: torch.Tensor, a: torch.Tensor, u_out: torch.Tensor,
               col_out: torch.Tensor) -> None:
    """``u_out = a / (K v)`` and ``col_out = K^T u_out`` (float64) in one read of ``K`` [N, C]."""
    n, c = K.shape
    progs = max(1, min(_n_programs(K.device.index or 0), triton.cdiv(n, BLOCK_ROWS)))
    partial = torch.zeros(progs, c, dtype=K.dtype, device=K.device)
    _pass_kernel[(progs,)](K, v, a, u_out, partial, n, c, K.stride(0), progs, BR=BLOCK_ROWS, BC=BLOCK_COLS)
    torch.sum(partial, dim=0, dtype=torch.float64, out=col_out)
