"""Gradients of the DEQ layer against finite differences and an unrolled reference."""

import pytest
import torch

from deqctl.implicit import DEQ, hutchinson_jacobian_sq

DT = torch.float64


def small_problem(seed=0, dim=6, batch=4):
    g = torch.Generator().manual_seed(seed)
    W = (0.4 * torch.randn(dim, dim, generator=g, dtype=DT)).requires_grad_()
    x = torch.randn(batch, dim, generator=g, dtype=DT).requires_grad_()
    target = torch.randn(batch, dim, generator=g, dtype=DT)

    def cell(z, u):
        return torch.tanh(z @ W.T + u)
    return W, x, target, cell


EXACT_FORWARD = dict(solver="anderson", tol=1e-13, max_iter=300)


def deq_layer(mode="ift", solver="anderson", backward=None, **kw):
    """The layer solved to float64 precision, with backward mode `mode` (and its solver)."""
    return DEQ(forward=EXACT_FORWARD, backward={"mode": mode, "solver": solver, "tol": 1e-11,
                                                "max_iter": 300, **(backward or {})},
               **kw).train()


def loss_of(z, target):
    return ((z - target) ** 2).sum()


def deq_loss(layer, cell, x, target):
    z, info = layer(cell, x, torch.zeros_like(x))
    return loss_of(z, target), info


def unrolled_grads(W, x, target, cell, steps=400):
    z = torch.zeros_like(x)
    for _ in range(steps):
        z = cell(z, x)
    return torch.autograd.grad(loss_of(z, target), (W, x))


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_ift_matches_unrolled_reference(solver):
    W, x, target, cell = small_problem()
    loss, info = deq_loss(deq_layer("ift", solver), cell, x, target)
    gW, gx = torch.autograd.grad(loss, (W, x))
    rW, rx = unrolled_grads(W, x, target, cell)
    cos = torch.nn.functional.cosine_similarity
    assert cos(gW.flatten(), rW.flatten(), dim=0) >= 0.999
    assert cos(gx.flatten(), rx.flatten(), dim=0) >= 0.999
    assert torch.allclose(gW, rW, rtol=1e-7, atol=1e-9)
    assert info.backward is not None and info.backward.converged.all()


def test_mixed_precision_forward_keeps_the_implicit_gradient():
    """With bf16_until the solve starts in bf16 (the matmul below runs in bf16 under
    autocast) but ends in float32 at the same tolerance, so the gradient at z* is the
    same; the eval solve inherits it only while it is above the eval tolerance."""
    g = torch.Generator().manual_seed(0)
    W = (0.2 * torch.randn(16, 16, generator=g)).requires_grad_()     # a contraction
    x, target = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)

    def cell(z, u):
        return torch.tanh(z @ W.T + u)
    grads = []
    for until in (None, 1e-2):
        layer = DEQ(forward=dict(solver="anderson", tol=1e-6, max_iter=200, bf16_until=until),
                    backward=dict(tol=1e-7, max_iter=200)).train()
        z, info = layer(cell, x, torch.zeros_like(x))
        grads.append(torch.autograd.grad(loss_of(z, target), W)[0])
        assert info.forward.converged.all() and (info.forward.bf16_nfe > 0) == bool(until)
    assert (grads[0] - grads[1]).norm() <= 1e-5 * grads[0].norm()    # bf16 alone: ~1e-3
    mixed = dict(tol=1e-4, bf16_until=1e-2)
    assert DEQ(forward=mixed, eval=dict(stop_mode="abs")).eval_spec.bf16_until is None
    assert DEQ(forward=mixed, eval=dict(tol=1e-3)).eval_spec.bf16_until == 1e-2
    with pytest.raises(ValueError, match=r"forward.bf16_until: must be above deq.eval.tol"):
        DEQ(forward=mixed, eval=dict(tol=1e-2))
    with pytest.raises(ValueError, match=r"forward.bf16_until: must be above deq.forward.tol \(0.01\)"):
        DEQ(forward=dict(tol=1e-2, bf16_until=1e-3))


def test_ift_matches_finite_differences():
    W, x, target, cell = small_problem(seed=1)
    layer = deq_layer("ift")
    loss, _ = deq_loss(layer, cell, x, target)
    (gW,) = torch.autograd.grad(loss, W)
    eps = 1e-6
    fd = torch.zeros_like(W)
    with torch.no_grad():
        for i in range(W.shape[0]):
            for j in range(W.shape[1]):
                W[i, j] += eps
                up = deq_loss(layer, cell, x, target)[0]
                W[i, j] -= 2 * eps
                down = deq_loss(layer, cell, x, target)[0]
                W[i, j] += eps
                fd[i, j] = (up - down) / (2 * eps)
    rel = (gW - fd).norm() / fd.norm()
    assert rel <= 1e-5


@pytest.mark.parametrize("mode", ["phantom", "jfb"])
def test_inexact_gradients_are_finite_and_descend(mode):
    W, x, target, cell = small_problem(seed=2)
    layer = deq_layer(mode, backward=dict(phantom_steps=5, phantom_tau=0.5))
    loss, _ = deq_loss(layer, cell, x, target)
    gW, = torch.autograd.grad(loss, W)
    exact, _ = unrolled_grads(W, x, target, cell)
    assert torch.isfinite(gW).all()
    assert torch.dot(gW.flatten(), exact.flatten()) > 0          # a descent direction
    with torch.no_grad():
        W -= 1e-3 * gW / gW.norm()
        after, _ = deq_loss(layer, cell, x, target)
    assert after < loss


def test_eval_mode_output_still_differentiable():
    W, x, target, cell = small_problem()
    layer = deq_layer("ift").eval()
    z, _ = layer(cell, x, torch.zeros_like(x))
    assert z.requires_grad
    with torch.no_grad():
        z2, info = layer(cell, x, torch.zeros_like(x))
    assert not z2.requires_grad and info.backward is None


def test_hutchinson_estimate_is_unbiased():
    torch.manual_seed(0)
    dim = 5
    J = torch.randn(dim, dim, dtype=DT)
    z = torch.randn(3, dim, dtype=DT, requires_grad=True)
    out = z @ J.T
    est = hutchinson_jacobian_sq(out, z, samples=4000, create_graph=False)
    exact = (J ** 2).sum()
    # per-sample estimator variance is 2||J^T J||_F^2 / n: allow 4 standard errors
    se = (2 * (J.T @ J).pow(2).sum() / 4000).sqrt()
    assert ((est - exact).abs() <= 4 * se).all()


def test_fixed_point_correction_and_jacobian_loss_are_produced():
    W, x, target, cell = small_problem()
    layer = DEQ(forward=dict(solver="fixed_point", tol=1e-12, max_iter=30),
                fp_correction=dict(states=2, gamma=0.8), jacobian_reg=dict(weight=1.0)).train()
    z, info = layer(cell, x, torch.zeros_like(x))
    assert len(info.corrections) == 2
    assert [w for w, _ in info.corrections] == pytest.approx([0.8 ** 2, 0.8])
    assert info.jac_loss is not None and info.jac_loss.requires_grad
    (gW,) = torch.autograd.grad(info.jac_loss, W)
    assert torch.isfinite(gW).all() and gW.abs().sum() > 0


def test_jacobian_reg_leaves_the_ift_gradient_of_the_task_loss_alone():
    W, x, target, cell = small_problem(seed=1)
    plain = deq_layer()
    regularised = deq_layer(jacobian_reg=dict(weight=1.0))
    loss, _ = deq_loss(plain, cell, x, target)
    (expected,) = torch.autograd.grad(loss, W)
    loss, info = deq_loss(regularised, cell, x, target)
    assert info.jac_loss is not None and info.backward is None   # no solve before backward
    (got,) = torch.autograd.grad(loss, W, retain_graph=True)
    assert torch.allclose(got, expected, rtol=1e-8, atol=1e-10)
    assert info.backward is not None and info.backward.converged.all()
    (total,) = torch.autograd.grad(loss + info.jac_loss, W)   # both terms reach the weights
    assert not torch.allclose(total, expected)


def test_gradient_checker_reports():
    from deqctl.implicit.gradcheck import compare_to_unrolled, ift_vs_finite_differences
    W, x, _, cell = small_problem(seed=3)
    settings = dict(forward=dict(solver="anderson", tol=1e-13, max_iter=300),
                    backward=dict(solver="anderson", tol=1e-12, max_iter=300))
    reports = compare_to_unrolled(cell, x, torch.zeros_like(x), [W, x], settings)
    assert reports["ift"].cosine >= 0.999 and reports["ift"].rel_error < 1e-4
    assert 0 < reports["jfb"].cosine < reports["ift"].cosine
    assert reports["phantom"].cosine > 0
    fd = ift_vs_finite_differences(cell, x, torch.zeros_like(x), [W], settings)
    assert fd.rel_error <= 1e-5


def test_dropout_mask_is_fixed_within_a_forward_pass():
    from deqctl import recipe as recipes
    from deqctl.models import ModelError, build_model
    from deqctl.data import DataInfo
    info = DataInfo(name="t", task="classify", inputs="image", shape=(1, 8, 8), num_classes=3,
                    mean=(0.5,), std=(0.5,))
    r = recipes.validate({"model": {"channels": 4, "inner_channels": 8, "dropout": 0.5,
                                    "stem_stride": 1, "head_pool": 2, "init_std": 0.01},
                          "deq": {"forward": {"solver": "fixed_point", "max_iter": 40,
                                              "tol": 1e-5}}})
    torch.manual_seed(0)
    model = build_model(r, info).train()
    x = torch.rand(2, 1, 8, 8)
    out = model.run(x)
    # the same map on every call: the solve converges as it would without dropout
    assert out.info.forward.converged.all()
    mask = model.body.mask
    assert mask is not None and set(mask.unique().tolist()) <= {0.0, 2.0}
    model.run(x)
    assert not torch.equal(mask, model.body.mask)      # a new mask for the next pass
    model.eval()
    model.run(x)
    assert model.body.mask is None
    r.deq.forward.compact = True
    with pytest.raises(ModelError, match="compact"):
        build_model(r, info)


@pytest.mark.parametrize("activation", [torch.tanh, torch.sigmoid, torch.nn.functional.silu])
def test_jacobian_reg_with_ift_is_exact_on_cells_that_save_their_output(activation):
    """d(task + w * JR)/dW = IFT gradient of the task loss + the gradient of the same
    Hutchinson estimate taken at z* held fixed (the JR paper's definition), computed here
    independently. tanh and sigmoid save their output for backward; silu does not."""
    W, x, target, _ = small_problem(seed=4)

    def cell(z, u):
        return activation(z @ W.T + u)

    layer = deq_layer(jacobian_reg=dict(weight=2.0))
    torch.manual_seed(7)
    z, info = layer(cell, x, torch.zeros_like(x))
    (got,) = torch.autograd.grad(loss_of(z, target) + 2.0 * info.jac_loss, W)

    (task_grad,) = torch.autograd.grad(deq_loss(deq_layer(), cell, x, target)[0], W)
    z_star = info.forward.z.detach().requires_grad_()
    torch.manual_seed(7)
    v = torch.randn_like(z_star)
    (vjp,) = torch.autograd.grad(cell(z_star, x), z_star, v, create_graph=True)
    jac = vjp.pow(2).sum(dim=1).mean() / z_star[0].numel()
    (jac_grad,) = torch.autograd.grad(2.0 * jac, W)
    assert torch.allclose(info.jac_loss, jac)
    assert torch.allclose(got, task_grad + jac_grad, rtol=1e-9, atol=1e-12)


def test_a_second_backward_through_a_retained_graph_is_still_implicit():
    W, x, target, cell = small_problem(seed=5)
    loss, info = deq_loss(deq_layer(), cell, x, target)
    (first,) = torch.autograd.grad(loss, W, retain_graph=True)
    (second,) = torch.autograd.grad(loss, W)
    assert torch.allclose(first, second, rtol=1e-10, atol=1e-12)
    rW, _ = unrolled_grads(W, x, target, cell)
    assert torch.allclose(second, rW, rtol=1e-7, atol=1e-9)


def test_plain_keyword_errors_name_the_key_and_list_the_valid_choices():
    with pytest.raises(ValueError, match=r"DEQ: forward.solver: unknown solver 'newton' "
                                         r"\(valid: anderson, broyden, fixed_point"):
        DEQ(forward=dict(solver="newton"))
    with pytest.raises(ValueError, match="backward.mode: Input should be 'ift', 'phantom' or 'jfb'"):
        DEQ(backward=dict(mode="exact"))
    with pytest.raises(ValueError, match=r"forward.anderson.history: unknown key \(valid: m, lam, beta\)"):
        DEQ(forward=dict(anderson={"history": 3}))
    with pytest.raises(ValueError, match="forward.tol: Input should be a finite number"):
        DEQ(forward=dict(tol=float("inf")))
    with pytest.raises(ValueError, match="backward.max_iter: expected an integer, got true"):
        DEQ(backward=dict(max_iter=True))
    with pytest.raises(ValueError, match=r"unknown key \(valid: mode, unrolled, baseline, forward"):
        DEQ(solver="anderson")


def test_unrolled_twin_is_autograd_through_the_same_cell():
    W, x, target, cell = small_problem(seed=6)
    twin = DEQ(mode="unrolled", unrolled=dict(depth=7), forward=dict(tol=1e-3)).train()
    z, info = twin(cell, x, torch.zeros_like(x))
    (got,) = torch.autograd.grad(loss_of(z, target), W)
    ref = torch.zeros_like(x)
    prev = ref
    for _ in range(7):
        prev, ref = ref, cell(ref, x)
    (want,) = torch.autograd.grad(loss_of(ref, target), W)
    assert torch.equal(z, ref) and torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    res = info.forward
    assert res.nfe == 7 and info.backward_steps == 7 and info.backward is None
    step = (ref - prev).norm(dim=1)
    assert torch.allclose(res.abs_residual, step.float())
    assert torch.equal(res.converged, res.rel_residual <= 1e-3)
    # the depth is fixed: evaluation settings do not change it
    with torch.no_grad():
        z_eval, info = twin.eval()(cell, x, torch.zeros_like(x))
    assert torch.equal(z_eval, ref.detach()) and info.forward.nfe == 7
    with pytest.raises(ValueError, match="fp_correction.states must be 0 with mode=unrolled"):
        DEQ(mode="unrolled", fp_correction=dict(states=2))


@pytest.mark.parametrize("mode", ["ift", "phantom", "jfb"])
def test_a_finished_step_leaves_nothing_alive(mode):
    """Once the step's tensors are dropped, its graph and statistics must be freed: an IFT
    hook whose closure held its own output kept every step alive (a leak of megabytes a
    step that Python's collector cannot see through the C++ graph)."""
    import gc
    import weakref

    W, x, target, cell = small_problem()
    layer = deq_layer(mode, jacobian_reg=dict(weight=1.0))
    loss, info = deq_loss(layer, cell, x, target)
    loss = loss + info.jac_loss
    loss.backward()
    alive = weakref.ref(info)
    del loss, info
    gc.collect()
    assert alive() is None


def test_fixed_point_cache_keeps_finite_states_by_example_index():
    from deqctl.implicit.cache import FixedPointCache
    cache = FixedPointCache(5)
    z0 = (torch.zeros(2, 3), torch.zeros(2, 1, 2))
    assert cache.start(torch.tensor([0, 1]), z0) is z0            # empty: the default start
    z = (torch.tensor([[1., 2, 3], [float("nan"), 0, 0]]), torch.ones(2, 1, 2))
    cache.store(torch.tensor([4, 2]), z)
    start = cache.start(torch.tensor([2, 4, 0]), (torch.zeros(3, 3), torch.zeros(3, 1, 2)))
    assert torch.equal(start[0], torch.tensor([[0., 0, 0], [1, 2, 3], [0, 0, 0]]))  # NaN row not kept
    assert torch.equal(start[1][:, 0, 0], torch.tensor([0., 1, 0]))
    again = FixedPointCache(5)
    again.load(cache.tensors())                 # as a checkpoint restores it
    restored = again.start(torch.tensor([2, 4, 0]), (torch.zeros(3, 3), torch.zeros(3, 1, 2)))
    assert all(torch.equal(a, b) for a, b in zip(start, restored))
    with pytest.raises(ValueError):             # a state of another structure
        again.start(torch.tensor([4]), torch.zeros(1, 3))


def test_shine_starts_the_adjoint_nearer_its_solution_and_keeps_it_exact():
    """SHINE: -Binv^T g from the forward Broyden's inverse estimate must be closer to the
    exact adjoint (I - J)^-T g than g itself (a wrong sign or a missing transpose is not),
    and the refined gradient must still be the exact implicit gradient."""
    from deqctl.solvers import shine_adjoint, solve
    W, x, target, cell = small_problem(seed=3, dim=8, batch=3)
    with torch.no_grad():
        res = solve(lambda z: cell(z, x), torch.zeros_like(x), "broyden", tol=1e-12,
                    max_iter=60, history=60)
    grad = torch.randn_like(x)
    start = shine_adjoint(res.inverse, grad)
    for b in range(x.shape[0]):
        J = torch.autograd.functional.jacobian(lambda z: cell(z[None], x[b:b + 1])[0],
                                               res.z[b])
        exact = torch.linalg.solve(torch.eye(8, dtype=DT) - J.T, grad[b])
        assert (start[b] - exact).norm() < (grad[b] - exact).norm()

    layer = DEQ(forward={**EXACT_FORWARD, "solver": "broyden", "broyden": {"history": 256}},
                backward=dict(tol=1e-11, max_iter=300, shine=True)).train()
    loss, info = deq_loss(layer, cell, x, target)
    gW, gx = torch.autograd.grad(loss, (W, x))
    rW, rx = unrolled_grads(W, x, target, cell)
    assert torch.allclose(gW, rW, rtol=1e-7, atol=1e-9) and torch.allclose(gx, rx, rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="shine"):
        DEQ(forward=dict(solver="anderson"), backward=dict(shine=True))
