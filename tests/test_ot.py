"""Sinkhorn core against POT (ot.sinkhorn, ot.bregman.sinkhorn_log, ot.sinkhorn_unbalanced) and
SwAV's reference, plus invariants: marginals, extreme logits, shapes, dtypes, chunking."""
from __future__ import annotations

import logging
import warnings

import numpy as np
import ot
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selflabel.ot import backend as ot_backend
from selflabel.ot import problem as ot_problem
from selflabel.ot import rows as ot_rows
from selflabel.ot import assign, assign_from_potentials, sinkhorn, sinkhorn_codes, sinkhorn_unbalanced


def _problem(n, k, seed=0, scale=1.0, uniform=False):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((n, k)) * scale
    if uniform:
        return s, np.full(n, 1.0 / n), np.full(k, 1.0 / k)
    a = rng.random(n) + 0.2
    b = rng.random(k) + 0.2
    return s, a / a.sum(), b / b.sum()


def _t(x, dtype=torch.float64):
    return torch.as_tensor(x, dtype=dtype)


def _pot(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "did not converge" for fixed iteration counts
        return fn(*args, **kw)


def _swav_reference(out: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """SwAV's distributed_sinkhorn (facebookresearch/swav main_swav.py), single process."""
    q = torch.exp(out / eps).t()
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


# ------------------------------------------------------------------------------------------
# POT: same iterates, same plan


@pytest.mark.parametrize("n_iters", [1, 7, 40])
@pytest.mark.parametrize("log_domain", [False, True])
def test_same_iterates_as_pot(n_iters, log_domain):
    s, a, b = _problem(60, 9, seed=1)
    pot = ot.bregman.sinkhorn_log if log_domain else ot.sinkhorn
    ref = _pot(pot, a, b, -s, 0.3, numItermax=n_iters, stopThr=0.0)
    res = sinkhorn(_t(s), _t(a), _t(b), eps=0.3, n_iters=n_iters, log_domain=log_domain)
    assert res.n_iters == n_iters and res.log_domain == log_domain
    np.testing.assert_allclose(res.plan.numpy(), ref, rtol=1e-9, atol=1e-14)
    # the reported error is POT's: L2 norm of the column violation of the returned plan
    assert res.marginal_err == pytest.approx(np.linalg.norm(ref.sum(0) - b), rel=1e-6, abs=1e-15)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_converged_plan_matches_pot_nonuniform_marginals(seed):
    s, a, b = _problem(150, 17, seed=seed, scale=2.0)
    ref = ot.sinkhorn(a, b, -s, 0.5, numItermax=10_000, stopThr=1e-12)
    ref_log = ot.bregman.sinkhorn_log(a, b, -s, 0.5, numItermax=10_000, stopThr=1e-12)
    for log_domain, r in [(False, ref), (True, ref_log)]:
        res = sinkhorn(_t(s), _t(a), _t(b), eps=0.5, tol=1e-11, log_domain=log_domain)
        assert res.converged and res.marginal_err <= 1e-11
        np.testing.assert_allclose(res.plan.numpy(), r, rtol=1e-7, atol=1e-13)
        np.testing.assert_allclose(res.plan.numpy().sum(1), a, atol=1e-12)
        np.testing.assert_allclose(res.plan.numpy().sum(0), b, atol=1e-11)


def test_float32_input_stays_float32_and_matches_float64_pot():
    s, a, b = _problem(400, 30, seed=3)
    s32 = s.astype(np.float32)
    ref = ot.sinkhorn(a, b, -s32.astype(np.float64), 0.1, numItermax=10_000, stopThr=1e-10)
    res = sinkhorn(torch.from_numpy(s32), _t(a), _t(b), eps=0.1, tol=1e-8)
    assert res.plan.dtype == torch.float32 and not res.log_domain and res.converged
    np.testing.assert_allclose(res.plan.numpy(), ref, rtol=2e-4, atol=1e-9)
    p = res.plan.double().numpy()
    assert np.abs(p.sum(1) - a).max() < 1e-4 * a.max()
    assert np.abs(p.sum(0) - b).max() < 1e-4 * b.max()


def test_default_marginals_and_log_potentials_rebuild_the_plan():
    s, _, _ = _problem(90, 12, seed=4)
    res = sinkhorn(_t(s), eps=0.2, tol=1e-12)
    p = res.plan.numpy()
    np.testing.assert_allclose(p.sum(1), 1 / 90, atol=1e-14)
    np.testing.assert_allclose(p.sum(0), 1 / 12, atol=1e-12)
    rebuilt = torch.exp(_t(s) / 0.2 + res.log_u[:, None] + res.log_v[None, :])
    np.testing.assert_allclose(rebuilt.numpy(), p, rtol=1e-10)


def test_cluster_size_prior_given_as_counts():
    s, _, _ = _problem(300, 4, seed=5)
    counts = np.array([150.0, 90.0, 45.0, 15.0])  # a prior on cluster sizes, not normalised
    res = sinkhorn(_t(s), b=_t(counts), eps=0.1, tol=1e-10)
    np.testing.assert_allclose(res.plan.numpy().sum(0), counts / counts.sum(), atol=1e-10)
    labels, _ = assign(res.plan)
    sizes = np.bincount(labels.numpy(), minlength=4)
    assert sizes[0] > sizes[1] > sizes[2] > sizes[3]  # hard labels follow the prior


# ------------------------------------------------------------------------------------------
# SwAV codes


def test_codes_equal_swav_reference_and_rows_sum_to_one():
    out = torch.nn.functional.normalize(torch.randn(64, 30, dtype=torch.float64), dim=1)
    for iters in (1, 3, 10):
        codes = sinkhorn_codes(out, eps=0.05, n_iters=iters)
        torch.testing.assert_close(codes, _swav_reference(out, 0.05, iters), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(codes.sum(1), torch.ones(64, dtype=torch.float64))


def test_codes_three_iterations_are_not_balanced_fifty_are():
    torch.manual_seed(0)
    out = torch.nn.functional.normalize(torch.randn(256, 30), dim=1) @ torch.nn.functional.normalize(
        torch.randn(30, 30), dim=1
    ).t()
    share = lambda q: (q.sum(0) / q.sum()).double() * 30  # noqa: E731  (1 = balanced)
    off3 = (share(sinkhorn_codes(out, n_iters=3)) - 1).abs().max()
    off50 = (share(sinkhorn_codes(out, n_iters=50)) - 1).abs().max()
    assert off3 > 0.01 and off50 < 1e-4


def test_codes_do_not_overflow_where_swav_does():
    torch.manual_seed(1)
    out = torch.randn(32, 10) * 10.0  # unnormalised prototypes: exp(out / 0.05) overflows float32
    assert not torch.isfinite(_swav_reference(out, 0.05, 3)).all()
    codes = sinkhorn_codes(out, eps=0.05, n_iters=3)
    assert codes.dtype == torch.float32 and torch.isfinite(codes).all()
    ref = _swav_reference(out.double() - out.double().max(), 0.05, 3)  # float64, shifted: exact
    torch.testing.assert_close(codes.double(), ref, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------
# unbalanced


@pytest.mark.parametrize("reg_type", ["kl", "entropy"])
@pytest.mark.parametrize("reg_m", [1.0, 0.3, (float("inf"), 0.5)])
def test_unbalanced_matches_pot(reg_type, reg_m):
    s, a, b = _problem(80, 11, seed=6)
    ref = _pot(ot.sinkhorn_unbalanced, a, b, -s, 0.4, reg_m, reg_type=reg_type, numItermax=20_000, stopThr=1e-13)
    res = sinkhorn_unbalanced(_t(s), _t(a), _t(b), eps=0.4, reg_m=reg_m, reg_type=reg_type, tol=1e-13)
    assert res.converged
    np.testing.assert_allclose(res.plan.numpy(), ref, rtol=1e-8, atol=1e-14)
    assert res.marginal_err == pytest.approx(np.linalg.norm(ref.sum(0) - b), rel=1e-6)
    if reg_m == (float("inf"), 0.5):  # semi-relaxed: rows exact
        np.testing.assert_allclose(res.plan.numpy().sum(1), a, atol=1e-12)


def test_unbalanced_fixed_iterations_match_pot():
    s, a, b = _problem(40, 7, seed=7)
    ref = _pot(ot.sinkhorn_unbalanced, a, b, -s, 0.4, 2.0, numItermax=5, stopThr=0.0)
    res = sinkhorn_unbalanced(_t(s), _t(a), _t(b), eps=0.4, reg_m=2.0, n_iters=5)
    np.testing.assert_allclose(res.plan.numpy(), ref, rtol=1e-10)


def test_unbalanced_with_huge_reg_m_is_balanced():
    s, a, b = _problem(50, 6, seed=8)
    bal = sinkhorn(_t(s), _t(a), _t(b), eps=0.5, tol=1e-12).plan
    unb = sinkhorn_unbalanced(_t(s), _t(a), _t(b), eps=0.5, reg_m=float("inf"), tol=1e-13).plan
    np.testing.assert_allclose(unb.numpy(), bal.numpy(), rtol=1e-8, atol=1e-14)


# ------------------------------------------------------------------------------------------
# extreme values, shapes, dtypes


def test_peaked_logits_use_log_domain_and_match_pot_log():
    s, a, b = _problem(120, 8, seed=9, scale=50.0)  # scores / eps up to ~1e4
    eps = 0.05
    res = sinkhorn(_t(s, torch.float32), _t(a), _t(b), eps=eps, n_iters=200)
    assert res.log_domain and torch.isfinite(res.plan).all()
    ref = _pot(ot.bregman.sinkhorn_log, a, b, -s.astype(np.float32).astype(np.float64), eps, numItermax=200,
               stopThr=0.0)
    np.testing.assert_allclose(res.plan.double().numpy(), ref, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(res.plan.double().numpy().sum(1), a, rtol=1e-6)


def test_kernel_form_falls_back_to_log_domain(caplog):
    s, a, b = _problem(100, 6, seed=10, scale=30.0)
    ref = sinkhorn(_t(s), _t(a), _t(b), eps=0.05, n_iters=30, log_domain=True)
    with caplog.at_level(logging.WARNING, logger="selflabel.ot"):
        res = sinkhorn(_t(s, torch.float32), _t(a), _t(b), eps=0.05, n_iters=30, log_domain=False)
    assert torch.isfinite(res.plan).all() and res.log_domain
    assert "log domain" in caplog.text
    np.testing.assert_allclose(res.plan.double().numpy(), ref.plan.numpy(), rtol=1e-4, atol=1e-9)


def test_runtime_fallback_continues_from_the_exact_potentials(monkeypatch, caplog):
    """Let the kernel form start on a problem it cannot represent: u, v overflow while iterating,
    and the log domain must take over from the float64 potentials, not from the rounded vectors."""
    s, a, b = _problem(100, 6, seed=10, scale=30.0)
    ref = sinkhorn(_t(s), _t(a), _t(b), eps=0.05, n_iters=30, log_domain=True)
    monkeypatch.setattr(ot_backend, "log_threshold", lambda dtype: 1e9)  # disable the up-front checks
    with caplog.at_level(logging.INFO, logger="selflabel.ot"):
        res = sinkhorn(_t(s, torch.float32), _t(a), _t(b), eps=0.05, n_iters=30)
    assert "left the torch.float32 range" in caplog.text and res.log_domain and res.n_iters == 30
    np.testing.assert_allclose(res.plan.double().numpy(), ref.plan.numpy(), rtol=1e-4, atol=1e-8)


def test_n_equals_k_gives_a_permutation():
    rng = np.random.default_rng(11)
    n = 12
    perm = rng.permutation(n)
    s = rng.standard_normal((n, n)) * 0.1
    s[np.arange(n), perm] += 1.0
    s[:, 0] += 1.5  # every row's argmax is cluster 0; any permutation pays this bonus exactly once
    assert (s.argmax(1) == 0).all()
    res = sinkhorn(_t(s, torch.float32), eps=0.01, tol=1e-7)
    assert res.converged
    labels, conf = assign(res.plan)
    np.testing.assert_array_equal(labels.numpy(), perm)  # one per cluster: the optimal assignment
    np.testing.assert_allclose(res.plan.double().numpy() * n, np.eye(n)[perm], atol=1e-4)
    assert conf.min() > 0.999


def test_more_clusters_than_samples():
    s, a, b = _problem(7, 50, seed=12)
    res = sinkhorn(_t(s), _t(a), _t(b), eps=0.2, tol=1e-12)
    ref = ot.sinkhorn(a, b, -s, 0.2, numItermax=10_000, stopThr=1e-13)
    np.testing.assert_allclose(res.plan.numpy(), ref, rtol=1e-7, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_scores(dtype):
    s, _, _ = _problem(200, 10, seed=13)
    h = torch.from_numpy(s).to(dtype)
    res = sinkhorn(h, eps=0.05, tol=1e-7)
    assert res.plan.dtype == torch.float32 and res.converged
    ref = sinkhorn(h.double(), eps=0.05, tol=1e-12).plan  # the same problem: the rounded scores
    np.testing.assert_allclose(res.plan.double().numpy(), ref.numpy(), rtol=1e-4, atol=1e-10)
    codes = sinkhorn_codes(h * 10)  # exp(10 / 0.05) is inf in float16: must stay finite
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(1), torch.ones(200))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 40),
    log_scale=st.floats(-3, 3.5),
    eps=st.sampled_from([0.01, 0.05, 1.0]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_property_finite_nonnegative_rows_exact(n, k, log_scale, eps, dtype, seed):
    s, a, b = _problem(n, k, seed=seed, scale=10.0**log_scale)
    res = sinkhorn(_t(s, dtype), _t(a), _t(b), eps=eps, n_iters=25)
    p = res.plan.double().numpy()
    assert p.shape == (n, k) and np.isfinite(p).all() and (p >= 0).all()
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(p.sum(1), a, rtol=rtol, atol=1e-12)
    assert res.marginal_err == pytest.approx(np.linalg.norm(p.sum(0) - b), rel=1e-3, abs=1e-6)
    assert np.isfinite(res.log_u.numpy()).all() and np.isfinite(res.log_v.numpy()).all()


def test_forbidden_pairs_get_no_mass():
    s, _, _ = _problem(30, 5, seed=14)
    s[:10, 0] = -np.inf
    res = sinkhorn(_t(s), eps=0.3, tol=1e-10)
    assert (res.plan[:10, 0] == 0).all()
    np.testing.assert_allclose(res.plan.numpy().sum(0), 0.2, atol=1e-10)


# ------------------------------------------------------------------------------------------
# chunking, memory modes, assignment


def test_row_chunks_and_streamed_kernel_do_not_change_the_result(monkeypatch):
    s, a, b = _problem(257, 13, seed=15)
    peaked = _t(_problem(257, 13, seed=15, scale=40.0)[0], torch.float32)
    full_log = sinkhorn(peaked, eps=0.05, n_iters=30)
    full = sinkhorn(_t(s, torch.float32), _t(a), _t(b), eps=0.1, n_iters=30)
    monkeypatch.setattr(ot_rows, "PASS_BYTES", 13 * 4 * 10)  # 10 rows per chunk
    monkeypatch.setattr(ot_rows, "GROUP_CHUNKS", 2)  # 13 reduction groups
    monkeypatch.setattr(ot_rows, "cpu_workers", lambda: 3)  # in 3 threads
    chunked = sinkhorn(_t(s, torch.float32), _t(a), _t(b), eps=0.1, n_iters=30)
    streamed = sinkhorn(_t(s, torch.float32), _t(a), _t(b), eps=0.1, n_iters=30, return_plan=False)
    logd = sinkhorn(_t(s, torch.float32), _t(a), _t(b), eps=0.1, n_iters=30, log_domain=True)
    assert streamed.plan is None
    for r in (chunked, logd):
        np.testing.assert_allclose(r.plan.numpy(), full.plan.numpy(), rtol=1e-5, atol=1e-9)
    chunked_log = sinkhorn(peaked, eps=0.05, n_iters=30)
    assert chunked_log.log_domain
    np.testing.assert_allclose(chunked_log.plan.numpy(), full_log.plan.numpy(), rtol=1e-5, atol=1e-9)
    for r in (chunked, streamed, logd):
        np.testing.assert_allclose(r.log_v.numpy() - r.log_v.numpy().max(),
                                   full.log_v.numpy() - full.log_v.numpy().max(), atol=1e-5)
        assert r.marginal_err == pytest.approx(full.marginal_err, rel=1e-3)


def test_result_does_not_depend_on_the_number_of_threads(monkeypatch):
    """The worker count follows the machine's load; the float sums must not (bitwise equal)."""
    s, a, b = _problem(300, 7, seed=20)
    monkeypatch.setattr(ot_rows, "PASS_BYTES", 7 * 4 * 8)
    monkeypatch.setattr(ot_rows, "GROUP_CHUNKS", 3)
    peaked = _t(s * 40, torch.float32)
    runs = []
    for workers in (1, 2, 5):
        monkeypatch.setattr(ot_rows, "cpu_workers", lambda w=workers: w)
        runs.append([sinkhorn(_t(s, torch.float32), _t(a), _t(b), eps=0.1, tol=1e-7).plan,
                     sinkhorn(peaked, eps=0.05, n_iters=15).plan,
                     sinkhorn_codes(_t(s, torch.float32))])
    for other in runs[1:]:
        for x, y in zip(runs[0], other):
            assert torch.equal(x, y)


def test_assign_and_assign_from_potentials_agree():
    s, _, _ = _problem(500, 20, seed=16)
    res = sinkhorn(_t(s, torch.float32), eps=0.1, tol=1e-8)
    labels, conf = assign(res.plan)
    labels2, conf2 = assign_from_potentials(_t(s, torch.float32), res.log_v, eps=0.1)
    assert labels.dtype == torch.int64 and conf.dtype == torch.float32
    assert (labels == labels2).float().mean() > 0.999  # float32 ties aside
    torch.testing.assert_close(conf, conf2, rtol=1e-4, atol=1e-6)
    p = res.plan.double().numpy()
    np.testing.assert_allclose(conf.numpy(), p.max(1) / p.sum(1), rtol=1e-6)
    assert ((conf > 0) & (conf <= 1)).all()


def test_not_converged_is_reported_and_logged(caplog):
    s, _, _ = _problem(100, 10, seed=17, scale=3.0)
    with caplog.at_level(logging.WARNING, logger="selflabel.ot"):
        res = sinkhorn(_t(s), eps=0.01, tol=1e-12, max_iters=5)
    assert not res.converged and res.n_iters == 5 and res.marginal_err > 1e-12
    assert "did not converge" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="selflabel.ot"):
        fixed = sinkhorn(_t(s), eps=0.01, n_iters=5)  # fixed iterations: reported, not warned
    assert not fixed.converged and "did not converge" not in caplog.text


def test_input_untouched_and_no_grad():
    s = torch.randn(20, 4, requires_grad=True)
    before = s.detach().clone()
    res = sinkhorn(s, eps=0.1)
    assert not res.plan.requires_grad
    assert torch.equal(s.detach(), before)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scores=torch.full((3, 2), float("nan"))), "NaN"),
        (dict(scores=torch.zeros(3)), "2-D"),
        (dict(scores=torch.zeros(3, 2), b=torch.tensor([1.0, -1.0])), "positive"),
        (dict(scores=torch.zeros(3, 2), a=torch.ones(4)), "entries"),
        (dict(scores=torch.zeros(3, 2), eps=0.0), "eps"),
        (dict(scores=torch.tensor([[0.0, -float("inf")], [1.0, -float("inf")]])), "-inf everywhere"),
    ],
)
def test_invalid_inputs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn(**kwargs)


def test_torch_code_path_matches_numpy_path(monkeypatch):
    """The passes run as numpy on CPU and as torch ops elsewhere; run the torch branch (what CUDA
    executes) on CPU tensors and require the same answers."""
    s, a, b = _problem(300, 11, seed=18)
    s32 = _t(s, torch.float32)
    peaked = _t(_problem(80, 6, seed=19, scale=40.0)[0], torch.float32)

    def run():
        return [
            sinkhorn(s32, _t(a), _t(b), eps=0.1, n_iters=20).plan,
            sinkhorn(s32, _t(a), _t(b), eps=0.1, tol=1e-7).plan,
            sinkhorn(s32, eps=0.1, n_iters=20, log_domain=True).plan,
            sinkhorn(peaked, eps=0.05, n_iters=20).plan,
            sinkhorn(s32, eps=0.1, n_iters=20, return_plan=False).log_v,
            sinkhorn_codes(s32.to(torch.bfloat16)),
            sinkhorn_unbalanced(_t(s), _t(a), _t(b), eps=0.3, reg_m=0.5, n_iters=20).plan,
        ]

    expected = run()
    monkeypatch.setattr(ot_backend, "numpy_path", lambda device: False)
    for got, want in zip(run(), expected):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-9)
    # and as on a GPU: range flags and errors read every 10th iteration only
    monkeypatch.setattr(ot_problem, "lazy_checks", lambda device: True)
    for got, want in zip(run()[:1] + run()[2:], expected[:1] + expected[2:]):  # [1] stops at a multiple of 10
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("lazy", [False, True])
def test_runtime_fallback_with_lazy_checks_goes_back_to_the_last_good_state(monkeypatch, caplog, lazy):
    """On a GPU the range flags are read every 10th iteration: when u, v overflowed in between, the
    log domain takes over from the last checked state, and the answer is the same as checking always."""
    s, a, b = _problem(100, 6, seed=10, scale=30.0)
    ref = sinkhorn(_t(s), _t(a), _t(b), eps=0.05, n_iters=30, log_domain=True)
    monkeypatch.setattr(ot_backend, "log_threshold", lambda dtype: 1e9)
    monkeypatch.setattr(ot_backend, "numpy_path", lambda device: False)
    monkeypatch.setattr(ot_problem, "lazy_checks", lambda device: lazy)
    with caplog.at_level(logging.INFO, logger="selflabel.ot"):
        res = sinkhorn(_t(s, torch.float32), _t(a), _t(b), eps=0.05, n_iters=30)
    assert "left the torch.float32 range" in caplog.text and res.log_domain and res.n_iters == 30
    np.testing.assert_allclose(res.plan.double().numpy(), ref.plan.numpy(), rtol=1e-4, atol=1e-8)


_MEMORY_SCRIPT = """
import resource, numpy as np, torch
from selflabel.ot import sinkhorn
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
arr = np.random.default_rng(0).standard_normal((10_000, 1_000), dtype=np.float32)
s = torch.from_numpy(arr)
base = peak()
growth = []
for scale, plan in ((150.0, False), (1 / 750, False), (1.0, True)):  # log domain, then kernel form
    arr *= scale
    r = sinkhorn(s, eps=0.05, n_iters=3, return_plan=plan)
    growth += [peak() - base, int(r.log_domain)]
print(*growth)
"""


def test_no_n_by_k_temporaries():
    """Peak memory over the 40 MB input (fresh process): chunk-sized without the plan, in the log
    domain and in the kernel form; the kernel form with the plan adds just the plan."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, check=True)
    log_no, log_flag, kernel_no, kernel_flag, with_plan, _ = map(float, out.stdout.split())
    assert (log_flag, kernel_flag) == (1, 0)
    plan_mib = 10_000 * 1_000 * 4 / 2**20
    assert max(log_no, kernel_no) < 0.3 * plan_mib, (log_no, kernel_no)
    assert with_plan < 1.3 * plan_mib, with_plan
