"""distributed=True: two CPU processes (gloo), each holding a block of rows, give the rows of the
single-process plan. One spawn runs every scenario; rank results come back through files."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selflabel.ot import sinkhorn, sinkhorn_codes, sinkhorn_unbalanced

SPLIT = 37  # rank 0 holds rows [0, 37), rank 1 the rest: unequal blocks check the global N


def _data():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(100, 9, generator=g, dtype=torch.float64)
    a = torch.rand(100, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(9, generator=g, dtype=torch.float64) + 0.2
    return s, a / a.sum(), b / b.sum()


def _scenarios(s, a, b, rows, distributed):
    """name -> (plan rows, n_iters, marginal_err, converged, log_domain) for the given rows."""
    sl, al = s[rows], a[rows]
    out = {}

    def keep(name, r):
        out[name] = (r.plan, r.n_iters, r.marginal_err, r.converged, r.log_domain)

    keep("fixed", sinkhorn(sl, eps=0.2, n_iters=20, distributed=distributed))
    keep("tol_prior", sinkhorn(sl, al, b, eps=0.2, tol=1e-10, distributed=distributed))
    keep("float32", sinkhorn(sl.float(), al, b, eps=0.1, tol=1e-7, distributed=distributed))
    keep("log", sinkhorn(sl, al, b, eps=0.2, n_iters=15, log_domain=True, distributed=distributed))
    keep("peaked", sinkhorn((sl * 40).float(), eps=0.05, n_iters=50, distributed=distributed))
    r = sinkhorn(sl.float(), eps=0.1, n_iters=10, return_plan=False, distributed=distributed)
    out["streamed"] = (r.log_v, r.n_iters, r.marginal_err, r.converged, r.log_domain)
    out["codes"] = (sinkhorn_codes(sl.float(), n_iters=3, distributed=distributed),)
    keep("unbalanced", sinkhorn_unbalanced(sl, al, b, eps=0.3, reg_m=0.7, tol=1e-10, distributed=distributed))
    # over-relaxed (the default to a tolerance) vs plain steps, and a warm start, on a slow problem
    slow = torch.log_softmax(3 * sl, dim=1)
    keep("plain", sinkhorn(slow, eps=0.05, tol=1e-10, relax=1.0, max_iters=5000, distributed=distributed))
    keep("relaxed", sinkhorn(slow, eps=0.05, tol=1e-10, max_iters=5000, distributed=distributed))
    keep("relaxed_log", sinkhorn(slow, eps=0.05, tol=1e-10, max_iters=5000, log_domain=True, distributed=distributed))
    keep("warm", sinkhorn(slow, eps=0.05, tol=1e-10, init=torch.log(b) * 3, distributed=distributed))
    return out


def _worker(rank, world, port, tmp):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        s, a, b = _data()
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        torch.save(_scenarios(s, a, b, rows, True), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def single():
    s, a, b = _data()
    return _scenarios(s, a, b, slice(None), False)


NAMES = ["fixed", "tol_prior", "float32", "log", "peaked", "streamed", "codes", "unbalanced", "plain", "relaxed",
         "relaxed_log", "warm"]


@pytest.mark.parametrize("name", NAMES)
def test_gathered_rows_equal_single_process(ranks, single, name):
    r0, r1 = ranks[0][name], ranks[1][name]
    one = single[name]
    first = one[0]
    if name == "streamed":  # log v is global: every rank holds the whole vector
        gathered = r0[0]
        torch.testing.assert_close(r1[0], r0[0], rtol=0, atol=0)
    else:
        gathered = torch.cat([r0[0], r1[0]])
        assert r0[0].shape[0] == SPLIT
    f32 = name in ("float32", "peaked", "streamed", "codes")  # float32 sums, summed in another order
    torch.testing.assert_close(gathered, first, rtol=1e-5 if f32 else 1e-9, atol=1e-12)
    # iteration counts, errors, convergence and the kernel/log choice agree on both ranks
    for r in (r0, r1):
        assert r[1:] == ranks[0][name][1:]  # ranks take every decision together
        if len(r) > 1:
            assert abs(r[1] - one[1]) <= (2 if f32 else 0)  # float32: the tol may be crossed 1 later
            assert r[3:] == one[3:]
            if f32 and one[3]:  # stopped at tol 1e-7: both errors are float32 rounding noise, both below it
                assert r[2] <= 1e-7 and one[2] <= 1e-7
            else:
                assert r[2] == pytest.approx(one[2], rel=0.2 if f32 else 1e-6, abs=1e-14)


def test_scenarios_exercise_both_domains(single):
    assert single["log"][4] and single["peaked"][4] and not single["fixed"][4]
    assert single["tol_prior"][3] and single["unbalanced"][3]


def test_relaxed_plans_equal_plain_ones_across_ranks(ranks, single):
    plain = single["plain"]
    assert single["relaxed"][1] < plain[1] / 2 and single["relaxed_log"][4]  # fewer iterations, both domains
    for name in ("relaxed", "relaxed_log", "warm"):
        gathered = torch.cat([ranks[0][name][0], ranks[1][name][0]])
        torch.testing.assert_close(gathered, plain[0], rtol=0, atol=1e-8 / 100)


def test_more_ranks_than_gpus_is_a_clear_error(monkeypatch):
    """torchrun --nproc_per_node 2 on a one-GPU machine: say so, instead of CUDA's 'invalid device ordinal'."""
    import torch

    from selflabel.distributed import init_from_env
    from selflabel.errors import SelflabelError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SelflabelError, match="LOCAL_RANK=1 but only 1 GPU"):
        init_from_env("auto")
