"""The sequence models (transformer_deq, tcn_deq) on tiny shapes: outputs per task, the
IFT gradient against an unrolled reference, every solver and gradient mode, Jacobian
regularisation and fixed-point correction, one training step, and a checkpoint round trip."""

from __future__ import annotations


import pytest
import torch

from deqctl import recipe as recipes
from deqctl.data import DataInfo
from deqctl.implicit.gradcheck import compare_to_unrolled
from deqctl.models import ModelError, build_model
from deqctl.tasks import task_for

pytestmark = pytest.mark.usefixtures("one_thread")

L = 6
INFOS = {
    "lm": DataInfo(name="t", task="lm", inputs="tokens", shape=(L,), tokenizer="char", vocab="abcd"),
    "classify": DataInfo(name="t", task="classify", inputs="sequence", shape=(L, 3), num_classes=4,
                         mean=(0.0, 1.0, -1.0), std=(1.0, 2.0, 0.5)),
    "forecast": DataInfo(name="t", task="forecast", inputs="sequence", shape=(L, 2),
                         target_shape=(3, 2), mean=(5.0, -5.0), std=(2.0, 1.0),
                         target_mean=(5.0, -5.0), target_std=(2.0, 1.0),
                         target_channels=(0, 1), season=2),
}
MODELS = {
    "transformer_deq": {"name": "transformer_deq", "d_model": 8, "heads": 2, "d_ff": 16},
    "tcn_deq": {"name": "tcn_deq", "channels": 6},
}


def make(model: str, task: str, deq: dict | None = None, **model_kw):
    r = recipes.validate({"model": {**MODELS[model], **model_kw}, "deq": deq or {}})
    torch.manual_seed(0)
    return build_model(r, INFOS[task]), r


def inputs(task: str, n: int = 3, length: int = L) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if task == "lm":
        x = torch.randint(0, 5, (n, length), generator=g)
        return x, torch.randint(0, 5, (n, length), generator=g)
    info = INFOS[task]
    x = torch.randn(n, length, info.channels, generator=g) * torch.tensor(info.std) + torch.tensor(info.mean)
    if task == "classify":
        return x, torch.randint(0, 4, (n,), generator=g)
    return x, torch.randn(n, *info.target_shape, generator=g)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("task, shape", [("lm", (3, L, 5)), ("classify", (3, 4)),
                                         ("forecast", (3, 3, 2))])
def test_outputs_per_task(model, task, shape):
    m, _ = make(model, task)
    x, y = inputs(task)
    out = m.eval().run(x)
    assert out.out.shape == shape and torch.isfinite(out.out).all()
    assert out.info.forward.converged.all()
    assert task_for(INFOS[task]).loss(out.out, y).ndim == 0


@pytest.mark.parametrize("model", MODELS)
def test_lm_is_causal(model):
    """Changing a later token never changes an earlier position's prediction."""
    m, _ = make(model, "lm", deq={"forward": {"tol": 1e-6, "max_iter": 100}})
    x, _ = inputs("lm")
    x2 = x.clone()
    x2[:, 4] = (x2[:, 4] + 1) % 5
    with torch.no_grad():
        a, b = m.eval()(x), m(x2)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-5)
    assert not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-5)


def test_bidirectional_classifier_sees_the_future():
    m, _ = make("transformer_deq", "classify", causal=False)
    assert not m.body.causal and make("transformer_deq", "forecast")[0].body.causal
    with pytest.raises(ModelError, match="must not see the tokens it predicts"):
        make("transformer_deq", "lm", causal=False)


def test_forecast_reads_levels_relative_to_the_last_value():
    """window_norm=last: shifting a whole window by a constant shifts the forecast by it;
    last_std: scaling the window about its last value scales the forecast's change too."""
    m, _ = make("tcn_deq", "forecast")
    x, _ = inputs("forecast")
    with torch.no_grad():
        a, b = m.eval()(x), m(x + torch.tensor([3.0, -7.0]))
    assert torch.allclose(b - a, torch.tensor([3.0, -7.0]).expand_as(a), atol=1e-4)
    plain, _ = make("tcn_deq", "forecast", head={"window_norm": "none"})
    with torch.no_grad():
        c, d = plain.eval()(x), plain(x + torch.tensor([3.0, -7.0]))
    assert not torch.allclose(d - c, torch.tensor([3.0, -7.0]).expand_as(c), atol=1e-2)
    revin, _ = make("tcn_deq", "forecast", head={"window_norm": "last_std"})
    last = x[:, -1:]
    with torch.no_grad():
        e, f = revin.eval()(x), revin(last + 2.5 * (x - last))
    assert torch.allclose(f - last, 2.5 * (e - last), atol=1e-3)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("task", ["lm", "forecast"])
def test_ift_gradient_matches_the_unrolled_reference(model, task):
    m, _ = make(model, task, init_std=0.05)
    m = m.double().train()
    x, _ = inputs(task)
    x = x if task == "lm" else x.double()
    u = m.inject(x)
    params = [p for n, p in m.named_parameters() if n.startswith("body.")]
    settings = dict(forward=dict(solver="anderson", tol=1e-12, max_iter=200),
                    backward=dict(solver="anderson", tol=1e-12, max_iter=200))
    reports = compare_to_unrolled(m.cell, u, m.init_state(u), params, settings)
    assert reports["ift"].cosine > 0.99999 and reports["ift"].rel_error < 1e-5
    assert reports["jfb"].cosine < reports["ift"].cosine


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
@pytest.mark.parametrize("mode", ["ift", "phantom", "jfb"])
def test_every_solver_and_gradient_mode_trains_a_step(model, solver, mode):
    deq = {"forward": {"solver": solver, "max_iter": 30, "tol": 1e-4},
           "backward": {"mode": mode, "solver": solver, "max_iter": 30, "tol": 1e-4},
           "jacobian_reg": {"weight": 0.5}, "fp_correction": {"states": 2}}
    m, r = make(model, "forecast", deq=deq, dropout=0.1)
    task = task_for(INFOS["forecast"])
    x, y = inputs("forecast", n=4)
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    m.train()
    out = m.run(x)
    loss = task.loss(out.out, y) + 0.5 * out.info.jac_loss + sum(
        w * task.loss(o, y) for w, o in out.corrections)
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert 1 <= len(out.corrections) <= 2 and out.info.jac_loss > 0   # states the solve reached
    if mode == "ift":
        assert out.info.backward is not None and out.info.backward.nfe >= 1
    else:
        assert out.info.backward_steps == (5 if mode == "phantom" else 1)
    before = [p.detach().clone() for p in m.parameters()]
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, m.parameters()))


@pytest.mark.parametrize("model", MODELS)
def test_dropout_mask_is_fixed_within_a_pass(model):
    m, _ = make(model, "lm", dropout=0.5, deq={"forward": {"solver": "fixed_point",
                                                           "max_iter": 200, "tol": 1e-5}},
                init_std=0.05)
    x, _ = inputs("lm")
    m.train()
    out = m.run(x)
    assert out.info.forward.converged.all()      # one map per pass: the solve still converges
    m.eval()
    masks = m.body.masks if model == "transformer_deq" else (m.body.mask,)
    m.run(x)
    masks = m.body.masks if model == "transformer_deq" else (m.body.mask,)
    assert all(mk is None for mk in masks)


def test_models_refuse_data_they_cannot_read():
    image = DataInfo(name="img", task="classify", inputs="image", shape=(1, 4, 4), num_classes=2)
    r = recipes.validate({"model": MODELS["tcn_deq"]})
    with pytest.raises(ModelError, match=r"tcn_deq takes tokens/sequence inputs.*use (\w+ or )*resnet_deq"):
        build_model(r, image)
    with pytest.raises(ModelError, match="resnet_deq takes image inputs.*tcn_deq or transformer_deq"):
        build_model(recipes.validate({}), INFOS["lm"])
    with pytest.raises(ModelError, match="d_model=8 is not divisible by model.heads=3"):
        make("transformer_deq", "lm", heads=3)


@pytest.mark.parametrize("model", MODELS)
def test_token_models_take_any_length(model):
    m, _ = make(model, "lm")
    assert m.dynamic_length
    x, _ = inputs("lm", length=11)
    with torch.no_grad():
        assert m.eval()(x).shape == (3, 11, 5)
    assert not make(model, "forecast")[0].dynamic_length


def test_pre_and_post_norm_cells_both_solve():
    for placement in ("pre", "post"):
        m, _ = make("transformer_deq", "classify", norm_placement=placement, init_std=0.05)
        out = m.eval().run(inputs("classify")[0])
        assert out.info.forward.converged.all(), placement
        assert torch.isfinite(out.out).all()


# --- mdeq: a state of several tensors -------------------------------------------------

IMAGES = DataInfo(name="t", task="classify", inputs="image", shape=(3, 12, 12), num_classes=4,
                  mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def make_mdeq(**kw):
    r = recipes.validate({"model": {"name": "mdeq", "channels": [4, 6, 8], "init_std": 0.01,
                                    **kw}})
    torch.manual_seed(0)
    return build_model(r, IMAGES)


def test_mdeq_branches_are_solved_jointly_at_their_resolutions():
    m = make_mdeq()
    x = torch.rand(3, 3, 12, 12)
    out = m.eval().run(x)
    z = out.info.forward.z
    assert [tuple(t.shape) for t in z] == [(3, 4, 12, 12), (3, 6, 6, 6), (3, 8, 3, 3)]
    assert out.out.shape == (3, 4) and out.info.forward.converged.all()
    for a, b in zip(m.cell(z, m.inject(x)), z):      # every branch at its fixed point
        assert (a - b).norm() <= 2e-3 * a.norm()


def test_mdeq_ift_gradient_matches_the_unrolled_reference():
    m = make_mdeq(channels=[3, 5]).double().train()
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64)
    u = m.inject(x)
    params = [p for n, p in m.named_parameters() if n.startswith(("branches", "fusion", "injections"))]

    def loss(z):
        return sum(((t - 0.1) ** 2).sum() for t in z)

    settings = dict(forward=dict(tol=1e-12, max_iter=300),
                    backward=dict(solver="anderson", tol=1e-12, max_iter=300))
    reports = compare_to_unrolled(m.cell, u, m.init_state(u), params, settings, loss=loss)
    assert reports["ift"].cosine > 0.99999 and reports["ift"].rel_error < 1e-5


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_mdeq_trains_a_step_with_every_solver(solver):
    r = recipes.validate({"model": {"name": "mdeq", "channels": [4, 6], "init_std": 0.01,
                                    "dropout": 0.1},
                          "deq": {"forward": {"solver": solver, "max_iter": 40},
                                  "jacobian_reg": {"weight": 0.5}, "fp_correction": {"states": 1}}})
    torch.manual_seed(0)
    m = build_model(r, IMAGES).train()
    out = m.run(torch.rand(4, 3, 12, 12))
    task = task_for(IMAGES)
    y = torch.tensor([0, 1, 2, 3])
    loss = task.loss(out.out, y) + 0.5 * out.info.jac_loss + sum(w * task.loss(o, y) for w, o in out.corrections)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in m.parameters() if p.requires_grad)
    assert out.info.backward is not None and out.info.backward.nfe >= 1


def test_patches_read_value_sequences_of_any_length_in_fewer_tokens():
    """patch p: ceil(L / p) tokens, from a convolution over time; the classifier still
    takes any length, and the stem's gradient is exact (float64, finite differences)."""
    m, _ = make("transformer_deq", "classify", patch=4)
    assert isinstance(m.reader.embed, torch.nn.Conv1d) and m.reader.embed.kernel_size == (15,)
    for length, tokens in [(L, 2), (11, 3), (12, 3)]:
        x, _ = inputs("classify", length=length)
        assert m.inject(x).shape == (3, tokens, 8)
        with torch.no_grad():
            assert m.eval()(x).shape == (3, 4)
    reader = m.reader.double()
    x, _ = inputs("classify", length=11)
    assert torch.autograd.gradcheck(reader, (x.double().requires_grad_(),))
    flat, _ = make("transformer_deq", "classify", patch=4, head={"pool": "flatten"})
    assert flat.head.out.in_features == 8 * 2


def test_auto_patch_keeps_at_most_32_tokens_and_one_step_per_token_up_to_32():
    def built(length: int, task: str = "classify", **kw):
        info = DataInfo(name="t", task=task, inputs="sequence", shape=(length, 1),
                        num_classes=2, mean=(0.0,), std=(1.0,), target_shape=(2,),
                        target_mean=(0.0,), target_std=(1.0,), target_channels=(0,))
        r = recipes.validate({"model": {**MODELS["transformer_deq"], "patch": "auto", **kw}})
        return build_model(r, info)
    assert built(128).reader.patch == 4 and built(60).reader.patch == 2
    assert built(100, "forecast").reader.patch == 4
    short = built(28)                               # sequential MNIST: the per-step model
    assert short.reader.patch == 1 and isinstance(short.reader.embed, torch.nn.Linear)
    assert make("transformer_deq", "lm", patch="auto")[0].reader.patch == 1
    with pytest.raises(ModelError, match="model.patch=2: transformer_deq reads token ids"):
        make("transformer_deq", "lm", patch=2)


def test_a_patched_classifier_trains_the_stem_with_the_exact_implicit_gradient():
    """End to end in float64: the IFT gradient of the loss for every parameter, the
    convolution stem included, equals back-propagation through 200 applications."""
    tight = {"forward": {"solver": "anderson", "tol": 1e-12, "max_iter": 200},
             "backward": {"solver": "anderson", "tol": 1e-12, "max_iter": 200}}
    grads = {}
    for mode in ("implicit", "unrolled"):
        m, _ = make("transformer_deq", "classify", deq={**tight, "mode": mode,
                                                        "unrolled": {"depth": 200}},
                    patch=4, init_std=0.05)
        m = m.double().train()
        x, y = inputs("classify", length=11)
        task_for(INFOS["classify"]).loss(m(x.double()), y).backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in m.parameters()])
    assert torch.allclose(grads["implicit"], grads["unrolled"], rtol=1e-6, atol=1e-9)
