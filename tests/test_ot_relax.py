"""Over-relaxation, warm starts and the reference Sinkhorn: the fast paths reach the fixed point of
plain Sinkhorn (POT's, the reference's) in fewer iterations, and fall back to plain steps when the
error grows."""
from __future__ import annotations

import logging
import warnings

import numpy as np
import ot
import pytest
import scipy.sparse
import torch

from selflabel.ot import kernel
from selflabel.ot import relax as ot_relax
from selflabel.ot import sinkhorn, sinkhorn_reference
from selflabel.ot.relax import AdaptiveRelaxation, omega_from_rate, plain_rate


def _problem(n, k, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((n, k)) * scale
    a, b = rng.random(n) + 0.2, rng.random(k) + 0.2
    return torch.from_numpy(s), a / a.sum(), b / b.sum()


def _sela_like(n, k, seed=0):
    """SeLa's label step: log-softmax of peaked logits at eps = 1/25 (slow for plain Sinkhorn)."""
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(3 * torch.randn(n, k, generator=g, dtype=torch.float64), dim=1)


# ------------------------------------------------------------------------------------------
# the reference


def test_reference_equals_pot_iterates_and_fixed_point():
    s, a, b = _problem(70, 8, seed=1)
    for it in (1, 5, 30):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = ot.sinkhorn(a, b, -s.numpy(), 0.3, numItermax=it, stopThr=0.0)
        plan, n, _ = sinkhorn_reference(s.numpy(), a, b, 0.3, n_iters=it)
        assert n == it
        np.testing.assert_allclose(plan, ref, rtol=1e-10, atol=1e-15)
    plan, n, err = sinkhorn_reference(s.numpy(), a, b, 0.3, tol=1e-12)
    assert err <= 1e-12
    np.testing.assert_allclose(plan.sum(1), a, atol=1e-14)
    np.testing.assert_allclose(plan.sum(0), b, atol=1e-12)


@pytest.mark.parametrize("log_domain", [False, True])
@pytest.mark.parametrize("relax", ["auto", 1.0])
def test_fast_paths_equal_the_reference(log_domain, relax):
    s, a, b = _problem(300, 12, seed=2, scale=2.0)
    ref, _, _ = sinkhorn_reference(s.numpy(), a, b, 0.2, tol=1e-13)
    res = sinkhorn(s, torch.from_numpy(a), torch.from_numpy(b), eps=0.2, tol=1e-12, log_domain=log_domain,
                   relax=relax, max_iters=20_000)
    assert res.converged and res.log_domain == log_domain
    np.testing.assert_allclose(res.plan.numpy(), ref, rtol=1e-8, atol=1e-15)


# ------------------------------------------------------------------------------------------
# over-relaxation


@pytest.mark.parametrize("log_domain", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_over_relaxed_plans_equal_plain_ones(log_domain, dtype):
    s = _sela_like(2000, 40).to(dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-6
    plain = sinkhorn(s, eps=1 / 25, tol=tol, relax=1.0, max_iters=5000, log_domain=log_domain)
    fast = sinkhorn(s, eps=1 / 25, tol=tol, max_iters=5000, log_domain=log_domain)
    fixed = sinkhorn(s, eps=1 / 25, tol=tol, relax=1.6, max_iters=5000, log_domain=log_domain)
    for r in (plain, fast, fixed):
        assert r.converged and r.marginal_err <= tol and r.log_domain == log_domain
        p = r.plan.double().numpy()
        np.testing.assert_allclose(p.sum(1), 1 / 2000, rtol=1e-5 if dtype == torch.float32 else 1e-12)
        assert np.linalg.norm(p.sum(0) - 1 / 40) <= tol * 1.01  # the reported error is the plan's
    assert fast.n_iters < plain.n_iters / 3 and fixed.n_iters < plain.n_iters
    # same fixed point: within what the tolerance allows (a marginal error of tol moves the plan by ~tol)
    scale = 1e3 * tol
    for r in (fast, fixed):
        assert np.abs(r.plan.double().numpy() - plain.plan.double().numpy()).max() <= scale / 2000
        assert (r.plan.argmax(1) == plain.plan.argmax(1)).float().mean() > 0.995


def test_over_relaxed_plan_matches_pot_to_tolerance():
    s, a, b = _problem(400, 25, seed=3, scale=3.0)
    ref = ot.sinkhorn(a, b, -s.numpy(), 0.1, numItermax=100_000, stopThr=1e-13)
    res = sinkhorn(s, torch.from_numpy(a), torch.from_numpy(b), eps=0.1, tol=1e-12, max_iters=100_000)
    np.testing.assert_allclose(res.plan.numpy(), ref, rtol=1e-7, atol=1e-14)


def test_fixed_iterations_stay_plain_unless_asked():
    s, a, b = _problem(60, 9, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ot.sinkhorn(a, b, -s.numpy(), 0.3, numItermax=12, stopThr=0.0)
    res = sinkhorn(s, torch.from_numpy(a), torch.from_numpy(b), eps=0.3, n_iters=12)
    np.testing.assert_allclose(res.plan.numpy(), ref, rtol=1e-9, atol=1e-14)  # POT's iterates
    relaxed = sinkhorn(s, torch.from_numpy(a), torch.from_numpy(b), eps=0.3, n_iters=12, relax=1.5)
    assert not np.allclose(relaxed.plan.numpy(), ref, rtol=1e-6)  # a relaxed iterate is another point
    np.testing.assert_allclose(relaxed.plan.numpy().sum(1), a, atol=1e-14)  # with exact rows


def test_fallback_when_error_grows(monkeypatch, caplog):
    """A step beyond 2 diverges: the schedule must notice the error growing, go back to plain
    steps and still reach plain Sinkhorn's plan."""
    s = _sela_like(1000, 30, seed=5)
    plain = sinkhorn(s, eps=1 / 25, tol=1e-9, relax=1.0, max_iters=5000)
    monkeypatch.setattr(ot_relax, "omega_from_rate", lambda lam: 2.6)
    for log_domain in (False, True):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="selflabel.ot"):
            res = sinkhorn(s, eps=1 / 25, tol=1e-9, max_iters=5000, log_domain=log_domain)
        assert "fell back to plain steps" in caplog.text
        assert res.converged and res.log_domain >= log_domain  # (diverging u, v may leave the kernel form)
        np.testing.assert_allclose(res.plan.numpy(), plain.plan.numpy(), rtol=1e-4, atol=1e-9 / 1000)


def test_schedule_estimates_the_rate_and_falls_back():
    sched = AdaptiveRelaxation(start=10, window=5)  # (explicit: the defaults may change)
    for it in range(1, 11):  # plain Sinkhorn contracting at 0.96 per iteration
        omega = sched.update(it, 0.96 ** it)
    assert omega == pytest.approx(omega_from_rate(0.96)) and omega == pytest.approx(2 / (1 + 0.2))
    # relaxed at omega: a rate rho is what Young's relation predicts for lam = 0.96 at that omega
    rho = omega - 1  # the optimum's rate
    assert plain_rate(rho, omega) == pytest.approx(0.96, rel=1e-9)
    err = 0.96 ** 10
    for it in range(11, 16):
        err *= 2.5  # diverging
        omega = sched.update(it, err)
        if sched.fell_back:
            break
    assert sched.fell_back and omega == 1.0 and sched.update(20, 1e-9) == 1.0


def test_relax_argument_is_validated():
    s = torch.zeros(4, 3)
    for bad in (0.0, 2.0, -1, "fast"):
        with pytest.raises(ValueError, match="relax"):
            sinkhorn(s, relax=bad)


# ------------------------------------------------------------------------------------------
# warm starts


@pytest.mark.parametrize("log_domain", [False, True])
def test_warm_start_converges_in_fewer_iterations_to_the_same_plan(log_domain):
    """SeLa's successive label steps: the network moved a little; restart from the last log_v."""
    s = _sela_like(3000, 50, seed=6)
    g = torch.Generator().manual_seed(7)
    s2 = torch.log_softmax(s + 0.02 * torch.randn(s.shape, generator=g, dtype=torch.float64), dim=1)
    first = sinkhorn(s, eps=1 / 25, tol=1e-9, log_domain=log_domain)
    cold = sinkhorn(s2, eps=1 / 25, tol=1e-9, log_domain=log_domain)
    warm = sinkhorn(s2, eps=1 / 25, tol=1e-9, log_domain=log_domain, init=first)  # log_v and rate
    assert cold.converged and warm.converged and 0.9 < first.rate < 1
    assert warm.n_iters < 0.8 * cold.n_iters, (warm.n_iters, cold.n_iters)
    np.testing.assert_allclose(warm.plan.numpy(), cold.plan.numpy(), rtol=0, atol=1e-6 / 3000)
    assert (warm.plan.argmax(1) == cold.plan.argmax(1)).float().mean() > 0.999
    # plain steps too: the start, not the relaxation, saves the iterations
    cold1 = sinkhorn(s2, eps=1 / 25, tol=1e-9, relax=1.0, log_domain=log_domain, max_iters=5000)
    warm1 = sinkhorn(s2, eps=1 / 25, tol=1e-9, relax=1.0, log_domain=log_domain, init=first.log_v, max_iters=5000)
    assert warm1.n_iters < 0.9 * cold1.n_iters, (warm1.n_iters, cold1.n_iters)
    np.testing.assert_allclose(warm1.plan.numpy(), cold.plan.numpy(), rtol=0, atol=1e-6 / 3000)


def test_warm_start_from_its_own_solution_stops_at_once():
    s = _sela_like(500, 20, seed=8)
    res = sinkhorn(s, eps=1 / 25, tol=1e-10)
    again = sinkhorn(s, eps=1 / 25, tol=1e-10, init=res.log_v)
    assert again.n_iters == 1
    np.testing.assert_allclose(again.plan.numpy(), res.plan.numpy(), rtol=1e-6, atol=1e-15)


def test_init_is_validated():
    s = torch.randn(10, 4)
    with pytest.raises(ValueError, match="init.*3 entries, expected 4"):
        sinkhorn(s, init=torch.zeros(3))
    with pytest.raises(ValueError, match="init.*finite"):
        sinkhorn(s, init=torch.tensor([0.0, float("nan"), 0.0, 0.0]))


# ------------------------------------------------------------------------------------------
# the sparse copy of a mostly-zero kernel


@pytest.mark.parametrize("relax", ["auto", 1.0])
def test_sparse_kernel_equals_the_dense_one(monkeypatch, relax):
    """SeLa-like float32 scores: most kernel entries underflow to exact zeros after the row shift;
    iterating on their CSR copy is the same matrix, so the same iterates up to float32 summation order."""
    from selflabel.ot import kernel, rows

    s = _sela_like(3000, 300, seed=9).float()
    calls = []
    real = kernel.sparse_groups
    monkeypatch.setattr(kernel, "sparse_groups", lambda K, rb: calls.append(real(K, rb)) or calls[-1])
    sparse = sinkhorn(s, eps=1 / 25, tol=1e-6, relax=relax, max_iters=5000)
    fixed = sinkhorn(s, eps=1 / 25, n_iters=30, relax=relax if relax != "auto" else 1.3)
    assert all(c is not None for c in calls) and len(calls) == 2  # both runs went sparse
    monkeypatch.setattr(kernel, "SPARSE_DENSITY", 0.0)  # force the dense passes
    monkeypatch.setattr(rows, "cpu_workers", lambda: 1)
    dense = sinkhorn(s, eps=1 / 25, tol=1e-6, relax=relax, max_iters=5000)
    dense_fixed = sinkhorn(s, eps=1 / 25, n_iters=30, relax=relax if relax != "auto" else 1.3)
    assert calls[-1] is None
    assert abs(sparse.n_iters - dense.n_iters) <= 1 and sparse.converged
    np.testing.assert_allclose(sparse.plan.numpy(), dense.plan.numpy(), rtol=1e-4, atol=1e-10)
    np.testing.assert_allclose(fixed.plan.numpy(), dense_fixed.plan.numpy(), rtol=1e-4, atol=1e-10)
    np.testing.assert_allclose(sparse.plan.double().numpy().sum(1), 1 / 3000, rtol=1e-5)


def test_dense_to_csr_equals_scipy_conversion():
    rng = np.random.default_rng(0)
    block = rng.random((50, 30)).astype(np.float32)
    block[block < 0.9] = 0
    block[7] = 0  # an empty row
    block[3, 5] = 1e-42  # a subnormal is a nonzero
    ours, ref = kernel.dense_to_csr(block), scipy.sparse.csr_matrix(block)
    assert ours.nnz == ref.nnz and (ours != ref).nnz == 0
    np.testing.assert_array_equal(ours.indptr, ref.indptr)
    np.testing.assert_array_equal(ours.toarray(), block)
    assert kernel.dense_to_csr(np.zeros((4, 3), np.float32)).nnz == 0
