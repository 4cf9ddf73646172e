"""deq.mode=baseline: the data's classic explicit network (GRU, linear forecaster, CNN)
built in the DEQ's place, its gradient that of the plain network (finite differences in
float64), one evaluation at residual 0 in the solver statistics, causality of the GRU
language model, and a baseline trained, evaluated and compared beside a DEQ by the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from deqctl import recipe as recipes
from deqctl.cli import app
from deqctl.data import DataInfo
from deqctl.models import build_model
from deqctl.models.baselines import CNNBaseline, GRUBaseline, LinearForecaster
from deqctl.tasks import task_for

from cli_helpers import RECIPE, runner, tiny
from test_models import INFOS, L, inputs

pytestmark = pytest.mark.usefixtures("one_thread")
IMAGE = DataInfo(name="i", task="classify", inputs="image", shape=(1, 8, 8), num_classes=3,
                 mean=(0.5,), std=(0.25,))
KINDS = {"lm": GRUBaseline, "classify": GRUBaseline, "forecast": LinearForecaster}


def make(info: DataInfo, **baseline):
    r = recipes.validate({"deq": {"mode": "baseline", "baseline": {"width": 6, **baseline}}})
    torch.manual_seed(0)
    return build_model(r, info)


@pytest.mark.parametrize("task", KINDS)
def test_the_data_chooses_the_baseline_and_its_solve_is_one_evaluation(task):
    m = make(INFOS[task])
    assert type(m) is KINDS[task]
    x, y = inputs(task)
    out = m.train().run(x)
    assert out.info.forward.nfe == 1 and out.info.forward.converged.all()
    assert float(out.info.forward.rel_residual.max()) == 0.0
    assert torch.equal(out.out, m.decode(m.inject(x), x))     # the network, nothing else
    assert task_for(INFOS[task]).loss(out.out, y).ndim == 0


def test_an_image_baseline_is_a_cnn_of_deq_baseline_layers_blocks():
    m = make(IMAGE, layers=3)
    assert type(m) is CNNBaseline
    assert sum(isinstance(b, torch.nn.MaxPool2d) for b in m.body) == 3
    assert m.run(torch.rand(2, 1, 8, 8)).out.shape == (2, 3)


@pytest.mark.parametrize("info", [INFOS["classify"], INFOS["forecast"], IMAGE],
                         ids=["gru", "linear", "cnn"])
def test_baseline_gradient_matches_finite_differences(info):
    m = make(info).double()
    x = (torch.rand(2, *info.shape) if info.inputs == "image" else
         inputs("classify" if info.task == "classify" else "forecast", n=2)[0]).double()
    names = [n for n, _ in m.named_parameters()]

    def loss(*ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,)).square().sum()
    torch.autograd.gradcheck(loss, tuple(p.detach().requires_grad_() for p in m.parameters()),
                             eps=1e-6, atol=1e-5)


def test_a_forecast_baseline_is_linear_in_the_window_read_from_its_last_value():
    m = make(INFOS["forecast"]).eval()
    x, _ = inputs("forecast")
    with torch.no_grad():
        shifted = x + torch.tensor([3.0, -2.0])     # every channel moved by a constant
        assert torch.allclose(m(shifted), m(x) + torch.tensor([3.0, -2.0]), atol=1e-5)


def test_the_gru_language_model_is_causal():
    m = make(INFOS["lm"]).eval()
    x, _ = inputs("lm")
    changed = x.clone()
    changed[:, -1] = (x[:, -1] + 1) % 5
    with torch.no_grad():
        assert torch.equal(m(x)[:, :L - 1], m(changed)[:, :L - 1])


def test_baseline_trains_evaluates_and_compares_beside_the_deq(tmp_path):
    out = tmp_path / "s"
    done = runner.invoke(app, ["sweep", RECIPE, *tiny(), "train.max_steps=2",
                               "deq.mode=implicit,baseline", "--out", str(out), "--plain"])
    assert done.exit_code == 0, done.output
    assert "baseline CNNBaseline" in (out / "logs" / "mode=baseline.log").read_text()
    ev = runner.invoke(app, ["eval", str(out / "mode=baseline"), "--json"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["fwd_nfe"] == 1
    # the status line names what answers: no solver for a baseline, the solver for a DEQ
    said = {m: runner.invoke(app, ["eval", str(out / f"mode={m}")]) for m in ("baseline",
                                                                              "implicit")}
    assert "explicit baseline, no solve" in said["baseline"].output, said["baseline"].output
    assert "eval solver" not in said["baseline"].output
    assert "eval solver anderson" in said["implicit"].output, said["implicit"].output
    cmp = runner.invoke(app, ["compare", str(out), "--json"])
    assert cmp.exit_code == 0, cmp.output
    assert {g["settings"]["deq.mode"] for g in json.loads(cmp.stdout)["groups"]} == \
        {"implicit", "baseline"}


def test_baseline_refuses_what_only_a_solve_has():
    with pytest.raises(recipes.RecipeError, match="fp_correction.states must be 0 with "
                       "mode=baseline"):
        recipes.validate({"deq": {"mode": "baseline", "fp_correction": {"states": 2}}})
