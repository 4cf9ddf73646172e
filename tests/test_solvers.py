"""Solvers against maps with known fixed points, per-sample behaviour and safeguards."""

import pytest
import torch

from deqctl.solvers import CONVERGED, MAX_ITER, NONFINITE, solve

SOLVERS = ["fixed_point", "anderson", "broyden"]


def linear_problem(batch=6, dim=40, radius=0.9, dtype=torch.float64, seed=0, symmetric=False):
    """Per-sample contractions z = W z + b with exact solutions from linalg.solve."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, dim, dim, generator=g, dtype=dtype)
    if symmetric:
        A = A + A.transpose(1, 2)
    W = radius * A / torch.linalg.matrix_norm(A, ord=2)[:, None, None]
    b = torch.randn(batch, dim, generator=g, dtype=dtype)
    exact = torch.linalg.solve(torch.eye(dim, dtype=dtype) - W, b)
    return (lambda z: torch.bmm(W, z.unsqueeze(-1)).squeeze(-1) + b), exact


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-9)])
def test_reaches_exact_fixed_point_per_sample(method, dtype, tol):
    f, exact = linear_problem(dtype=dtype)
    res = solve(f, torch.zeros_like(exact), method, tol=tol, max_iter=400, stop_mode="rel")
    assert res.converged.all() and res.stop_reason == "converged"
    assert (res.rel_residual <= tol).all()
    # ||z - z*|| <= ||f(z) - z|| / (1 - rho) for a contraction of rate rho = 0.9
    err = torch.linalg.vector_norm(res.z - exact, dim=1)
    assert (err <= 10 * res.abs_residual * 1.01 + 1e-12).all()
    assert res.z.dtype == dtype and res.z.shape == exact.shape


@pytest.mark.parametrize("method", SOLVERS)
def test_nonlinear_map_with_known_solution(method):
    # f(z) = 0.5 * tanh(z - c) + c has the fixed point z = c exactly.
    c = torch.linspace(-1, 1, 24, dtype=torch.float64).view(3, 8)
    res = solve(lambda z: 0.5 * torch.tanh(z - c) + c, torch.zeros_like(c), method,
                tol=1e-10, max_iter=200, stop_mode="abs")
    assert torch.allclose(res.z, c, atol=1e-9)


def test_anderson_beats_fixed_point_on_ill_conditioned_contraction():
    f, exact = linear_problem(radius=0.99, symmetric=True, dim=60)
    z0 = torch.zeros_like(exact)
    fp = solve(f, z0, "fixed_point", tol=1e-6, max_iter=3000)
    aa = solve(f, z0, "anderson", tol=1e-6, max_iter=3000, m=6)
    assert fp.converged.all() and aa.converged.all()
    assert aa.nfe * 3 < fp.nfe


@pytest.mark.parametrize("history", [3, 8])
def test_broyden_limited_memory_outlasts_its_history(history):
    # Needs several times `history` iterations: the memory must restart cleanly when full.
    f, exact = linear_problem(radius=0.95, symmetric=True, dim=60)
    res = solve(f, torch.zeros_like(exact), "broyden", tol=1e-8, max_iter=400, history=history)
    assert res.converged.all() and res.nfe > 3 * history
    assert torch.allclose(res.z, exact, atol=1e-6)


def test_nfe_is_honest_and_trace_not_padded():
    f, exact = linear_problem()
    calls = []
    res = solve(lambda z: calls.append(1) or f(z), torch.zeros_like(exact), "anderson",
                tol=1e-8, max_iter=200, trace=True)
    assert res.nfe == len(calls)
    assert res.trace.shape == (res.nfe, exact.shape[0])
    assert int(res.sample_nfe.max()) == res.nfe
    # once a sample stops, its later trace entries are NaN, never a repeated value
    for i, n in enumerate(res.sample_nfe.tolist()):
        assert torch.isfinite(res.trace[:n, i]).all() and torch.isnan(res.trace[n:, i]).all()


def test_broyden_line_search_evaluations_are_counted():
    f, exact = linear_problem()
    calls = []
    res = solve(lambda z: calls.append(1) or f(z), torch.zeros_like(exact), "broyden",
                tol=1e-8, max_iter=100, line_search=True)
    assert res.nfe == len(calls) and res.converged.all()
    # trials are spent only where a residual grew, not ls_steps times every iteration
    plain = solve(f, torch.zeros_like(exact), "broyden", tol=1e-8, max_iter=100)
    assert res.nfe < 2 * plain.nfe


@pytest.mark.parametrize("method", SOLVERS)
def test_converged_samples_stop_changing(method):
    # sample 0 starts at its fixed point; its iterate must never move
    f, exact = linear_problem()
    z0 = torch.zeros_like(exact)
    z0[0] = exact[0]
    seen = []
    res = solve(lambda z: seen.append(z[0].clone()) or f(z), z0, method, tol=1e-8, max_iter=300)
    assert all(torch.equal(s, exact[0]) for s in seen)
    assert res.sample_nfe[0] == 1 and res.converged.all()


@pytest.mark.parametrize("method", SOLVERS)
def test_compact_evaluates_only_unconverged_samples(method):
    f_full, exact = linear_problem()
    batch_sizes = []

    def f(z, idx):
        batch_sizes.append(z.shape[0])
        full = torch.zeros_like(exact) if idx is None else torch.zeros(len(exact), z.shape[1], dtype=z.dtype)
        if idx is None:
            return f_full(z)
        full[idx] = z
        return f_full(full)[idx]

    z0 = torch.zeros_like(exact)
    z0[:3] = exact[:3]       # half the batch is already converged
    res = solve(f, z0, method, tol=1e-9, max_iter=300, compact=True)
    ref = solve(f_full, z0, method, tol=1e-9, max_iter=300)
    assert res.converged.all()
    assert batch_sizes[:2] == [6, 3]                      # converged half dropped at once
    assert batch_sizes == sorted(batch_sizes, reverse=True)  # and the rest as they finish
    assert torch.allclose(res.z, ref.z, atol=1e-8)


@pytest.mark.parametrize("method", SOLVERS)
def test_nonfinite_sample_keeps_best_iterate_and_is_flagged(method):
    f, exact = linear_problem()

    def poisoned(z):
        out = f(z)
        if len(poisoned.calls) >= 3:
            out[2] = float("nan")
        poisoned.calls.append(1)
        return out
    poisoned.calls = []
    res = solve(poisoned, torch.zeros_like(exact), method, tol=1e-8, max_iter=300)
    assert res.status[2] == NONFINITE and not res.converged[2]
    assert torch.isfinite(res.z).all() and torch.isfinite(res.abs_residual[2])
    others = torch.arange(6) != 2
    assert (res.status[others] == CONVERGED).all()
    assert res.stop_reason == "nonfinite"


def test_anderson_least_squares_failure_falls_back():
    # a map whose f(z) - z is identical for every iterate makes the Gram matrix rank one
    # (singular without ridge): Anderson must fall back, not crash
    b = torch.ones(2, 5, dtype=torch.float64)
    res = solve(lambda z: z + b, torch.zeros_like(b), "anderson", tol=1e-6, max_iter=10, lam=0.0)
    assert res.nfe == 10 and (res.status == MAX_ITER).all()
    assert (res.fallbacks > 0).all()
    assert torch.isfinite(res.z).all()


@pytest.mark.parametrize("method", SOLVERS)
def test_no_improvement_returns_start(method):
    # f(z0) is NaN everywhere: nothing ever improves on z0, and z0 comes back
    z0 = torch.randn(3, 4)
    res = solve(lambda z: z * float("nan"), z0, method, tol=1e-6, max_iter=5)
    assert torch.equal(res.z, z0) and (res.status == NONFINITE).all() and res.nfe == 1


def test_check_every_limits_host_reads_but_not_results():
    f, exact = linear_problem()
    a = solve(f, torch.zeros_like(exact), "anderson", tol=1e-8, max_iter=200, check_every=5)
    b = solve(f, torch.zeros_like(exact), "anderson", tol=1e-8, max_iter=200, check_every=1)
    assert a.nfe % 5 == 0 and a.nfe >= b.nfe
    assert torch.equal(a.z, b.z)        # frozen samples: extra evaluations change nothing


def test_any_layout_and_unknown_options():
    z0 = torch.zeros(2, 3, 4, 5)
    res = solve(lambda z: 0.5 * z + 1, z0, "broyden", tol=1e-8, max_iter=50)
    assert res.z.shape == z0.shape and torch.allclose(res.z, torch.full_like(z0, 2.0))
    with pytest.raises(ValueError, match="valid: damping"):
        solve(lambda z: z, z0, "fixed_point", m=5)
    with pytest.raises(ValueError, match="valid: anderson, broyden, fixed_point"):
        solve(lambda z: z, z0, "newton")


def test_snapshots_are_the_iterates_fed_to_f():
    f, exact = linear_problem()
    fed = []
    res = solve(lambda z: fed.append(z.clone()) or f(z), torch.zeros_like(exact), "fixed_point",
                tol=1e-12, max_iter=8, snapshot_at=(2, 5))
    assert set(res.snapshots) == {2, 5}
    assert torch.equal(res.snapshots[5], fed[4])


def test_state_stays_float32_under_bf16():
    f, exact = linear_problem(dtype=torch.float32)
    seen = []

    def f_bf16(z):                   # what a cell under bf16 autocast hands back
        seen.append(z.dtype)
        return f(z.float()).to(torch.bfloat16)
    res = solve(f_bf16, torch.zeros_like(exact, dtype=torch.bfloat16), "anderson",
                tol=1e-2, max_iter=100)
    assert res.z.dtype == torch.bfloat16 and res.rel_residual.dtype == torch.float32
    assert res.converged.all() and set(seen) == {torch.bfloat16}


@pytest.mark.parametrize("method", ["fixed_point", "anderson", "broyden"])
def test_a_state_of_several_tensors_is_solved_as_one(method):
    """Two coupled parts of different shapes with a known fixed point:
    a = 0.5 a + 0.1 mean(b) + c,  b = 0.3 b + 0.2 sum(a) + d."""
    g = torch.Generator().manual_seed(0)
    c, d = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, 2, generator=g, dtype=torch.float64)

    def f(z):
        a, b = z
        return (0.5 * a + 0.1 * b.mean((1, 2))[:, None] + c,
                0.3 * b + 0.2 * a.sum(1)[:, None, None] + d)

    res = solve(f, (torch.zeros_like(c), torch.zeros_like(d)), method, tol=1e-12, max_iter=300,
                stop_mode="abs")
    a, b = res.z
    assert isinstance(res.z, tuple) and a.shape == (4, 3) and b.shape == (4, 2, 2)
    fa, fb = f(res.z)
    assert torch.allclose(fa, a, atol=1e-10) and torch.allclose(fb, b, atol=1e-10)
    assert res.converged.all() and res.abs_residual.shape == (4,)


def test_implicit_gradient_through_a_state_of_several_tensors():
    from deqctl.implicit import DEQ
    g = torch.Generator().manual_seed(1)
    W = (0.3 * torch.randn(3, 3, generator=g, dtype=torch.float64)).requires_grad_()
    V = (0.3 * torch.randn(4, 3, generator=g, dtype=torch.float64)).requires_grad_()
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)

    def cell(z, u):
        a, b = z
        return torch.tanh(a @ W.T + u), torch.tanh(0.5 * b + (a @ V.T).view(-1, 2, 2))

    z0 = (torch.zeros(5, 3, dtype=torch.float64), torch.zeros(5, 2, 2, dtype=torch.float64))
    layer = DEQ(forward=dict(tol=1e-13, max_iter=300), backward=dict(tol=1e-12, max_iter=300)).train()
    (a, b), info = layer(cell, x, z0)
    loss = (a ** 2).sum() + (b * torch.arange(4.0, dtype=torch.float64).view(2, 2)).sum()
    got = torch.autograd.grad(loss, (W, V))
    z = z0
    for _ in range(300):
        z = cell(z, x)
    want = torch.autograd.grad((z[0] ** 2).sum() + (z[1] * torch.arange(4.0, dtype=torch.float64).view(2, 2)).sum(), (W, V))
    for gw, ww in zip(got, want):
        assert torch.allclose(gw, ww, rtol=1e-8, atol=1e-10)
    assert isinstance(info.forward.z, tuple) and info.backward.converged.all()


def bf16_problem(dtypes, batch=6, dim=40, seed=0, radius=(0.9, 0.9)):
    """Float32 contractions (spectral radius from radius[0] to radius[1] over the batch)
    whose matrix product runs in bf16 under autocast, with W a leaf that requires grad like
    a parameter; `dtypes` records the precision of every product."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, dim, dim, generator=g)
    rho = torch.linspace(*radius, batch)
    W = (rho[:, None, None] * A / torch.linalg.matrix_norm(A, ord=2)[:, None, None])
    W.requires_grad_()
    b = torch.randn(batch, dim, generator=g)

    def f(z, idx=None):
        w = W if idx is None else W[idx]
        wz = torch.bmm(w, z.unsqueeze(-1)).squeeze(-1)
        dtypes.append(wz.dtype)
        return wz.float() + (b if idx is None else b[idx])
    with torch.no_grad():
        return f, torch.linalg.solve(torch.eye(dim) - W, b)


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("compact,check_every", [(False, None), (True, 3)])
def test_mixed_precision_solve_finishes_in_float32(method, compact, check_every):
    # bf16 alone stalls near 1e-3: the solve must leave it at bf16_until and reach 1e-5
    dtypes = []
    f, exact = bf16_problem(dtypes)
    res = solve(f, torch.zeros_like(exact), method, tol=1e-5, max_iter=400, bf16_until=1e-2,
                compact=compact, check_every=check_every)
    assert res.converged.all() and (res.rel_residual <= 1e-5).all()
    assert 0 < res.bf16_nfe < res.nfe == len(dtypes)
    assert set(dtypes[:res.bf16_nfe]) == {torch.bfloat16}
    assert set(dtypes[res.bf16_nfe:]) == {torch.float32}
    assert (torch.linalg.vector_norm(res.z - exact, dim=1) <= 10 * res.abs_residual * 1.01).all()


@pytest.mark.parametrize("method", SOLVERS)
def test_no_sample_converges_on_a_bf16_residual(method):
    # Fast samples pass tol while the slowest keeps the batch in bf16; their convergence
    # and residuals must still be measured in float32.
    dtypes = []
    f, exact = bf16_problem(dtypes, radius=(0.3, 0.995))
    res = solve(f, torch.zeros_like(exact), method, tol=2e-3, max_iter=400, bf16_until=3e-2)
    with torch.no_grad():
        fz = f(res.z)
    true_rel = torch.linalg.vector_norm(fz - res.z, dim=1) / torch.linalg.vector_norm(fz, dim=1)
    assert res.converged.all() and (true_rel <= 2e-3).all()
    assert torch.allclose(true_rel, res.rel_residual, rtol=1e-4)


def test_mixed_precision_solve_leaves_bf16_when_it_stalls_or_at_half_budget():
    # bf16_until below what bf16 can reach: its phase ends after 3 checks without progress
    dtypes = []
    f, exact = bf16_problem(dtypes)
    res = solve(f, torch.zeros_like(exact), "anderson", tol=1e-6, max_iter=200, bf16_until=2e-6)
    assert res.converged.all() and 0 < res.bf16_nfe < res.nfe < 100
    # a slow contraction keeps its worst residual above bf16_until: half the budget at most
    res = solve(f, torch.zeros_like(exact), "fixed_point", tol=1e-6, max_iter=20,
                bf16_until=1e-3)
    assert res.bf16_nfe == 10 and res.nfe == 20


@pytest.mark.parametrize("caller", [torch.bfloat16, torch.float16])
def test_mixed_precision_solve_keeps_the_callers_autocast(caller):
    # after the bf16 phase f runs in the caller's precision (and a bf16 copy of a weight
    # cached in the bf16 phase must not leak into an fp16 caller's products)
    dtypes = []
    f, exact = bf16_problem(dtypes)
    with torch.autocast("cpu", dtype=caller):
        res = solve(f, torch.zeros_like(exact), "anderson", tol=1e-2, max_iter=100,
                    bf16_until=5e-2)
    assert res.converged.all() and 0 < res.bf16_nfe < res.nfe
    assert set(dtypes[:res.bf16_nfe]) == {torch.bfloat16}
    assert set(dtypes[res.bf16_nfe:]) == {caller}


def test_anderson_never_reads_history_it_has_not_written():
    # deterministic mode fills uninitialised memory with NaN: results must not change
    f, exact = linear_problem()
    plain = solve(f, torch.zeros_like(exact), "anderson", tol=1e-8, max_iter=200)
    torch.use_deterministic_algorithms(True)
    try:
        filled = solve(f, torch.zeros_like(exact), "anderson", tol=1e-8, max_iter=200)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(plain.z, filled.z) and plain.nfe == filled.nfe


def test_best_iterate_survives_later_iterations():
    # the tracker keeps a reference to an improving iterate instead of copying it: the
    # solvers must never write into it afterwards (a map that overshoots once tests this)
    c = torch.linspace(-1, 1, 12).view(3, 4)
    fed, out = [], []

    def f(z):
        fz = c + 0.5 * (z - c) * (-1.9 if len(fed) == 5 else 1.0)
        fed.append(z.clone())
        out.append(fz.clone())
        return fz
    for method in SOLVERS:
        fed.clear(), out.clear()
        res = solve(f, torch.zeros_like(c), method, tol=1e-12, max_iter=8)
        rel = torch.stack([(fz - z).norm(dim=1) / fz.norm(dim=1) for z, fz in zip(fed, out)])
        best = rel.argmin(dim=0).tolist()
        assert torch.equal(res.z, torch.stack([fed[i][b] for b, i in enumerate(best)]))
