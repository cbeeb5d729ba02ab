"""Estimated cluster sizes under torch.distributed: two CPU processes (gloo), each holding a block of
rows, give the single-process labels and the same size estimate (all-reduced EM step)."""
from __future__ import annotations

import os
import socket

import numpy as np
import torch
import torch.multiprocessing as mp

from selflabel.imbalanced import estimated_cluster_prepared
from selflabel.marginals import estimate_marginal
from selflabel.train.sela import estimate_sizes
from test_longtail import PROPS, mixture

N = 503  # odd: unequal rank blocks check the global N


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    x, _ = mixture(PROPS, n=N, seed=7)
    g = torch.Generator().manual_seed(7)
    log_p = torch.log_softmax(torch.randn(len(x), 5, generator=g, dtype=torch.float64) * 3, dim=1)
    return x, log_p


def _worker(rank, world, port, out):
    import torch.distributed as dist

    from selflabel.distributed import context

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x, log_p = _data()
        ctx = context()
        res = estimated_cluster_prepared(x, len(PROPS), seed=2, ctx=ctx)
        s, e = ctx.block(len(x))
        b = estimate_marginal(log_p[s:e], torch.full((5,), 0.2, dtype=torch.float64), 0.04, distributed=True)
        sizes = estimate_sizes(log_p[s:e], None, 25.0, 0.1, distributed=True)
        torch.save({"labels": torch.from_numpy(res.labels), "protos": torch.from_numpy(res.prototypes),
                    "sizes": torch.tensor(res.info["estimated_sizes"]), "b": b, "sela": sizes}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    x, log_p = _data()
    one = estimated_cluster_prepared(x, len(PROPS), seed=2)
    for r in ranks:  # every rank holds the whole, single-process result
        np.testing.assert_array_equal(r["labels"].numpy(), one.labels)
        np.testing.assert_allclose(r["protos"].numpy(), one.prototypes, atol=1e-5)
        np.testing.assert_allclose(r["sizes"].numpy(), one.info["estimated_sizes"], atol=1e-5)
        b = estimate_marginal(log_p, torch.full((5,), 0.2, dtype=torch.float64), 0.04)
        np.testing.assert_allclose(r["b"].numpy(), b.numpy(), rtol=1e-12)
        np.testing.assert_allclose(r["sela"].numpy(), estimate_sizes(log_p, None, 25.0, 0.1).numpy(), rtol=1e-12)
    # the estimate is of these long-tailed sizes, not uniform
    assert max(one.info["estimated_sizes"]) > 0.3


def _near_duplicates():
    """3 groups of 6 near-copies (one colour, pixel noise) at K = 3: 18 small clusters for 18 rows, so
    which copy joins which small cluster is a tie that the order of the ranks' sums can break."""
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 64, generator=g), dim=1)
    x = centres.repeat_interleave(6, 0) + 1e-3 * torch.randn(18, 64, generator=g)
    x = x - x.mean(0)
    return torch.nn.functional.normalize(x, dim=1)


def _tie_worker(rank, world, port, out):
    import torch.distributed as dist

    from selflabel.distributed import context

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = estimated_cluster_prepared(_near_duplicates(), 3, seed=0, ctx=context())
        torch.save(torch.from_numpy(res.labels), f"{out}/ties{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_near_duplicate_groups_keep_their_numbers_across_processes(tmp_path):
    """The torchrun run equals the one-process run in cluster numbers too, when the small clusters of
    near-copies are interchangeable (the case that renumbered a torchrun run's clusters)."""
    mp.spawn(_tie_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    one = estimated_cluster_prepared(_near_duplicates(), 3, seed=0).labels
    assert one.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    for r in range(2):
        assert torch.load(tmp_path / f"ties{r}.pt", weights_only=True).tolist() == one.tolist()
