"""monDEQ (Winston & Kolter, 2020): the operator is the monotone circular convolution it
claims to be, the fixed point is unique (the same from every start, for large weights
too), both splittings reach it, the IFT gradient matches finite differences, and the
recipe trains, evaluates and traces from the command line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from deqctl import recipe as recipes
from deqctl.data import DataInfo
from deqctl.models import build_model
from deqctl.models.mondeq import _per_frequency

from cli_helpers import CONFIGS, runner, train
from deqctl.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {"conv": (1, 6, 6), "fc": (1, 3, 3)}
TIGHT = {"solver": "anderson", "max_iter": 300, "tol": 1e-11}


def make(layout: str, splitting: str = "peaceman_rachford", alpha: float = 1.0,
         scale: float = 1.0, seed: int = 0):
    info = DataInfo(name="t", task="classify", inputs="image", shape=SHAPES[layout],
                    num_classes=3, mean=(0.5,), std=(0.25,))
    r = recipes.validate({"model": {"name": "mondeq", "layout": layout, "channels": 3,
                                    "m": 0.5, "splitting": splitting, "alpha": alpha,
                                    "pool": 2},
                          "deq": {"forward": TIGHT, "backward": TIGHT, "eval": TIGHT}})
    torch.manual_seed(seed)
    model = build_model(r, info).double()
    with torch.no_grad():
        model.W.A.mul_(scale)
        model.W.B.mul_(scale)
    return model.eval()


def images(layout: str, n: int = 4) -> torch.Tensor:
    return torch.rand(n, *SHAPES[layout], generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64)


def equilibrium(model, x: torch.Tensor, z0: torch.Tensor | None = None) -> torch.Tensor:
    """relu(state*) of the model's own solve, from z0 (zeros by default)."""
    u = model.inject(x)
    z, info = model.deq(model.cell, u, model.init_state(u) if z0 is None else z0)
    assert bool(info.forward.converged.all())
    return F.relu(z)


def dense(op, n: int) -> torch.Tensor:
    """The matrix of a linear map on R^n, column by column."""
    return torch.stack([op(e) for e in torch.eye(n, dtype=torch.float64)], dim=1)


def test_the_operator_is_the_monotone_circular_convolution_it_claims():
    model = make("conv", scale=3.0)
    c, (h, w), m = 3, SHAPES["conv"][1:], model.W.m
    n = c * h * w

    def conv(kernel):          # the circular convolution with `kernel`, as a matrix
        return dense(lambda e: F.conv2d(F.pad(e.view(1, c, h, w), (1, 1, 1, 1),
                                              mode="circular"), kernel.flip(-1, -2)).view(-1),
                     n)
    a, b = conv(model.W.A.detach()), conv(model.W.B.detach())
    expected = (1 - m) * torch.eye(n, dtype=torch.float64) - a.T @ a + b - b.T
    got = dense(lambda e: _per_frequency(model.W.matrix().detach(), e.view(1, c, h, w)
                                         ).view(-1), n)
    assert torch.allclose(got, expected, atol=1e-10)
    smallest = torch.linalg.eigvalsh(torch.eye(n, dtype=torch.float64) - (got + got.T) / 2)[0]
    assert smallest >= m - 1e-10          # I - W is m-strongly monotone


@pytest.mark.parametrize("layout", ["conv", "fc"])
@pytest.mark.parametrize("splitting, alpha", [("peaceman_rachford", 1.0),
                                              ("forward_backward", 0.05)])
def test_the_fixed_point_is_unique_from_every_start(layout, splitting, alpha):
    model = make(layout, splitting, alpha, scale=2.0)
    x = images(layout)
    first = equilibrium(model, x)
    u = model.inject(x)
    g = torch.Generator().manual_seed(2)
    for spread in (1.0, 10.0, 100.0):
        z0 = spread * torch.randn(u.shape, generator=g, dtype=u.dtype)
        assert torch.allclose(equilibrium(model, x, z0), first, atol=1e-8)
    w = model.W.matrix()                   # and it is the equilibrium z = relu(Wz + u)
    assert torch.allclose(first, F.relu(_per_frequency(w, first) + u), atol=1e-8)


@pytest.mark.parametrize("layout", ["conv", "fc"])
def test_both_splittings_reach_the_same_fixed_point(layout):
    pr = make(layout, "peaceman_rachford", 1.0)
    fb = make(layout, "forward_backward", 0.05)
    fb.load_state_dict(pr.state_dict())
    x = images(layout)
    assert torch.allclose(equilibrium(pr, x), equilibrium(fb, x), atol=1e-8)


@pytest.mark.parametrize("layout, splitting, alpha", [
    ("conv", "peaceman_rachford", 1.0), ("fc", "peaceman_rachford", 0.5),
    ("conv", "forward_backward", 0.2)])
def test_the_ift_gradient_matches_finite_differences(layout, splitting, alpha):
    """Through the training path: model.run, the IFT backward, every parameter kind."""
    model = make(layout, splitting, alpha)
    x, y = images(layout), torch.tensor([0, 1, 2, 1])

    def loss() -> torch.Tensor:
        return F.cross_entropy(model.run(x).out, y)
    model.train()
    model.zero_grad()
    loss().backward()
    g = torch.Generator().manual_seed(3)
    eps = 1e-5     # FD noise is ~ tol / (1 - contraction) / eps; kinks are ~1e-4 away
    for name, p in model.named_parameters():
        for i in torch.randperm(p.numel(), generator=g)[:3].tolist():
            flat, orig = p.data.view(-1), p.data.view(-1)[i].item()
            with torch.no_grad():
                flat[i] = orig + eps
                up = loss().item()
                flat[i] = orig - eps
                down = loss().item()
                flat[i] = orig
            fd = (up - down) / (2 * eps)
            assert abs(p.grad.view(-1)[i].item() - fd) <= 1e-6 + 1e-5 * abs(fd), (name, i)


def test_the_recipe_trains_evaluates_and_traces(tmp_path):
    out = tmp_path / "run"
    result = train(str(CONFIGS / "mnist-mondeq.yaml"), "model.channels=6", "train.max_steps=3",
                   "data.limit_train=64", "data.limit_eval=64", "data.batch_size=32",
                   "runtime.threads=1", "--out", str(out))
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["fwd_converged"] == 1.0
    result = runner.invoke(app, ["solve-trace", str(out), "--starts", "4", "--grad", "--json",
                                 str(tmp_path / "t.json")])
    assert result.exit_code == 0, result.output
    trace = json.loads((tmp_path / "t.json").read_text())
    starts = trace["starts"]                                          # one fixed point
    assert starts["unique"] == 1.0 and starts["prediction_agreement"] == 1.0
    assert trace["grad"]["cosine"] > 0.99          # the per-pass operator is differentiated
