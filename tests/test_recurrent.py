"""Recurrent-depth training (deq.mode=recurrent, issue 32 item 1): the cell applied a number
of times drawn per step, gradients through the last k applications only. With a fixed depth
and backprop through all of it, it is the unrolled twin gradient for gradient; the draw is a
pure function of (seed, step), so a resumed run is the run never stopped."""

from __future__ import annotations

import json
import signal
import statistics

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from deqctl import recipe as recipes
from deqctl.cli import app
from deqctl.data import DataInfo
from deqctl.engine import train as engine
from deqctl.implicit import DEQ
from deqctl.implicit.settings import deq_settings
from deqctl.keys import KEYS, K
from deqctl.models import build_model
from deqctl.tasks import task_for
from deqctl.ui import TrainView

from cli_helpers import RECIPE, rows, runner, tiny, train
from test_implicit import loss_of, small_problem

pytestmark = pytest.mark.usefixtures("one_thread")


def recurrent(**block) -> DEQ:
    return DEQ(mode="recurrent", recurrent=block).train()


def grads(layer: DEQ, cell, x, target, params):
    z, info = layer(cell, x, torch.zeros_like(x))
    return torch.autograd.grad(loss_of(z, target), params), info


# --- gradients ---------------------------------------------------------------------------


def test_backprop_through_the_whole_fixed_depth_is_the_twins_gradient():
    W, x, target, cell = small_problem()
    got, info = grads(recurrent(depth=5), cell, x, target, (W, x))
    want, _ = grads(DEQ(mode="unrolled", unrolled={"depth": 5}).train(), cell, x, target, (W, x))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-12, atol=1e-14)
    assert (info.depth, info.forward.nfe, info.backward_steps) == (5, 5, 5)


def test_the_last_k_applications_carry_the_gradient_and_the_first_ones_none():
    W, x, target, cell = small_problem()
    got, info = grads(recurrent(depth=6, backprop=2), cell, x, target, (W, x))
    z = torch.zeros_like(x)                 # the reference: detached after 6 - 2 applications
    for _ in range(4):
        z = cell(z, x)
    z = z.detach()
    for _ in range(2):
        z = cell(z, x)
    want = torch.autograd.grad(loss_of(z, target), (W, x))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-12, atol=1e-14)
    full, _ = grads(recurrent(depth=6), cell, x, target, (W, x))
    assert not torch.allclose(got[0], full[0], rtol=1e-3)     # the detach is real
    assert (info.forward.nfe, info.backward_steps) == (6, 2)


def model_pair(depth: int):
    """A tiny default-recipe model in recurrent mode and its twin, with the same weights."""
    info = DataInfo(name="i", task="classify", inputs="image", shape=(1, 28, 28),
                    num_classes=10, mean=(0.5,), std=(0.25,))
    tiny_model = {"name": "resnet_deq", "channels": 8, "inner_channels": 16}
    torch.manual_seed(0)
    models = [build_model(recipes.validate({"model": tiny_model, "deq": deq}), info).train()
              for deq in ({"mode": "recurrent", "recurrent": {"depth": depth}},
                          {"mode": "unrolled", "unrolled": {"depth": depth}})]
    models[1].load_state_dict(models[0].state_dict())
    return (*models, task_for(info))


def test_a_model_in_recurrent_mode_has_its_twins_gradient_on_the_same_batch():
    rec, twin, task = model_pair(depth=4)
    x, y = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 5])
    got = []
    for model in (rec, twin):
        task.loss(model.run(x).out, y).backward()
        got.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert got[0].keys() == got[1].keys()
    for name in got[0]:
        assert torch.allclose(got[0][name], got[1][name], rtol=1e-5, atol=1e-7), name


# --- the draw ------------------------------------------------------------------------------


def test_the_depth_is_a_pure_function_of_seed_and_step_with_the_mean_asked_for():
    s = deq_settings({"mode": "recurrent",
                      "recurrent": {"depth": 16, "distribution": "poisson-lognormal"}})
    draws = [s.recurrent_depth(7, step) for step in range(4000)]
    assert draws[:50] == [s.recurrent_depth(7, step) for step in range(50)]    # replayed
    assert len(set(draws[:50])) > 10                                # steps differ
    assert draws[:50] != [s.recurrent_depth(8, step) for step in range(50)]    # seeds too
    assert min(draws) >= 1
    assert statistics.fmean(draws) == pytest.approx(16, rel=0.05)
    capped = deq_settings({"mode": "recurrent", "recurrent": {
        "depth": 16, "distribution": "poisson-lognormal", "max_depth": 20}})
    assert max(capped.recurrent_depth(7, step) for step in range(500)) == 20
    fixed = deq_settings({"mode": "recurrent", "recurrent": {"depth": 9}})
    assert {fixed.recurrent_depth(7, step) for step in range(20)} == {9}


def test_training_calls_apply_the_drawn_depth_and_evaluation_the_mean():
    W, x, target, cell = small_problem()
    layer = recurrent(depth=5, distribution="poisson-lognormal", sigma=1.0, backprop=3)
    layer.seed = 11
    for step in range(6):
        z, info = layer(cell, x, torch.zeros_like(x))
        depth = layer.settings.recurrent_depth(11, step)
        assert info.depth == info.forward.nfe == depth and info.backward_steps == min(3, depth)
    assert layer.step == 6
    with torch.no_grad():
        _, info = layer.eval()(cell, x, torch.zeros_like(x))
    assert info.forward.nfe == 5 and layer.step == 6       # the mean, and no draw spent
    later = DEQ(mode="recurrent", recurrent={"depth": 5}, eval={"max_iter": 12}).eval()
    with torch.no_grad():
        assert later(cell, x, torch.zeros_like(x))[1].forward.nfe == 12


# --- runs: rows, resume, eval, compare -------------------------------------------------------

RECURRENT = ["deq.mode=recurrent", "deq.recurrent.depth=4",
             "deq.recurrent.distribution=poisson-lognormal", "deq.recurrent.backprop=2",
             "deq.eval.max_iter=null"]
SCHEDULE = [*tiny(), *RECURRENT, "train.max_steps=6", "train.log_every=2",
            "train.eval_every_epoch=false"]


class StopAfter:
    """A trainer callback that sends SIGTERM to this process after step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer) -> None:
        if trainer.state.step == self.step:
            signal.raise_signal(signal.SIGTERM)


def untimed(run) -> list[dict]:
    timing = {K.wall_s, K.step_time_s, K.samples_per_s, K.peak_mem_mb, K.eval_time_s}
    return [{k: v for k, v in r.items() if k not in timing} for r in rows(run)]


def test_a_resumed_run_draws_the_same_depths_and_ends_with_the_same_weights(tmp_path):
    whole = tmp_path / "whole"
    result = train(RECIPE, *SCHEDULE, "--out", str(whole))
    assert result.exit_code == 0, result.output
    trained = [r for r in rows(whole) if r[K.split] == "train"]
    assert len(trained) == 3 and all(set(r) <= set(KEYS) | {"accuracy"} for r in trained)
    recipe = recipes.load(RECIPE, SCHEDULE)
    drawn = [recipe.deq.recurrent_depth(recipe.seed, step) for step in range(6)]
    assert [r[K.depth] for r in trained] == [statistics.fmean(drawn[i:i + 2])
                                             for i in (0, 2, 4)]
    assert all(r[K.fwd_nfe] == r[K.depth] for r in trained)
    assert [r[K.fwd_nfe_max] for r in trained] == [max(drawn[i:i + 2]) for i in (0, 2, 4)]
    assert len(set(drawn)) > 1, drawn                       # the draw did vary the depth

    # stopped after step 3, inside a logging interval: its pending rows hold the explicit
    # modes' bwd_rel_residual NaN (no equation solved), which the trainer state refused
    out = tmp_path / "run"
    view = TrainView(None, fwd_tol=1e-3, bwd_tol=1e-3, plain=True, console=Console(quiet=True))
    with pytest.raises(engine.Interrupted):
        engine.Trainer(recipe, out, view, callbacks=[StopAfter(3)]).run()
    assert train("--resume", str(out)).exit_code == 0
    assert untimed(out) == untimed(whole)
    final = [load_file(run / "checkpoints" / "final" / "model.safetensors") for run in (out, whole)]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


@pytest.fixture(scope="module")
def recurrent_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("recurrent") / "run"
    result = train(RECIPE, *tiny(), *RECURRENT, "train.max_steps=2", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "fwd nfe" in result.output and "bwd nfe 2.0" in result.output    # the plain line
    return out


def test_eval_applies_the_mean_depth_and_sweep_iters_sweeps_it(recurrent_run):
    plain = runner.invoke(app, ["eval", str(recurrent_run), "--json"])
    assert plain.exit_code == 0, plain.output
    assert json.loads(plain.stdout)["fwd_nfe"] == 4
    result = runner.invoke(app, ["eval", str(recurrent_run), "--sweep-iters", "1,3,8", "--json"])
    assert result.exit_code == 0, result.output
    sweep = json.loads(result.stdout)["sweep"]
    assert [(r["max_iter"], r["fwd_nfe"], r["fwd_nfe_max"]) for r in sweep] == \
        [(1, 1, 1), (3, 3, 3), (8, 8, 8)]
    assert len({r["fwd_rel_residual"] for r in sweep}) == 3
    human = runner.invoke(app, ["eval", str(recurrent_run), "--sweep-iters", "1,2"])
    assert human.exit_code == 0 and "recurrent depth, 4 applications" in human.stdout
    assert "anytime inference: recurrent depth" in human.stdout


def test_compare_sets_an_implicit_and_a_recurrent_run_side_by_side(run, recurrent_run):
    result = runner.invoke(app, ["compare", str(run), str(recurrent_run), "--json"])
    assert result.exit_code == 0, result.output
    implicit, rec = json.loads(result.stdout)["runs"]
    assert (implicit["mode"], rec["mode"]) == ("implicit", "recurrent")
    assert rec["steps"] == 2 and rec["final"] == rows(recurrent_run)[-1]["accuracy"]
    table = runner.invoke(app, ["compare", str(run), str(recurrent_run)])
    assert table.exit_code == 0 and "recurrent" in table.stdout


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("args, key, words", [
    (["deq.recurrent.depth=.nan"], "deq.recurrent.depth", "finite"),
    (["deq.recurrent.depth=.inf"], "deq.recurrent.depth", "finite"),
    (["deq.recurrent.depth=0"], "deq.recurrent.depth", "greater than 0"),
    (["deq.recurrent.depth=-4"], "deq.recurrent.depth", "greater than 0"),
    (["deq.recurrent.depth=2.5"], "recurrent.depth", "whole number"),
    (["deq.recurrent.depth=4", "deq.recurrent.backprop=5"], "recurrent.backprop",
     "at most recurrent.depth (4)"),
    (["deq.recurrent.backprop=21"], "recurrent.backprop", "deq.forward.max_iter=20"),
    (["deq.recurrent.backprop=0"], "deq.recurrent.backprop", "greater than or equal to 1"),
    (["deq.recurrent.sigma=0"], "deq.recurrent.sigma", "greater than 0"),
    (["deq.recurrent.sigma=-1"], "deq.recurrent.sigma", "greater than 0"),
    (["deq.recurrent.depth=8", "deq.recurrent.max_depth=6"], "recurrent.max_depth",
     "at least recurrent.depth (8)"),
    (["deq.recurrent.distribution=poisson-lognormal", "deq.recurrent.depth=8",
      "deq.recurrent.max_depth=12", "deq.recurrent.backprop=13"], "recurrent.backprop",
     "at most recurrent.max_depth (12)"),
    (["deq.recurrent.distribution=gamma"], "deq.recurrent.distribution", "poisson-lognormal"),
    (["deq.pretrain_steps=2"], "pretrain_steps", "mode=recurrent"),
    (["deq.fp_correction.states=2"], "fp_correction.states", "mode=recurrent"),
])
def test_bad_recurrent_settings_are_one_line_naming_the_key(args, key, words, tmp_path):
    out = tmp_path / "run"
    result = train(RECIPE, "deq.mode=recurrent", *args, "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "1 error(s)" in result.output
    said = [line for line in result.output.splitlines() if key in line]
    assert len(said) == 1 and words in said[0], result.output
    assert not out.exists()


def test_a_poisson_draw_may_exceed_backprop_and_an_unused_block_is_not_judged():
    s = deq_settings({"mode": "recurrent", "recurrent": {
        "depth": 3, "distribution": "poisson-lognormal", "backprop": 5}})
    assert s.recurrent.backprop == 5          # a short draw back-propagates through all of it
    assert deq_settings({"recurrent": {"depth": 3, "backprop": 5}}).mode == "implicit"


def test_solve_trace_says_a_recurrent_model_answers_at_its_depth_and_audits_its_rule(
        recurrent_run, tmp_path):
    result = runner.invoke(app, ["solve-trace", str(recurrent_run), "--solvers", "anderson",
                                 "--grad", "--json", str(tmp_path / "t.json")])
    assert result.exit_code == 0, result.output
    assert ("recurrent depth, 4 applications of its cell: it answers with 4 applications of "
            "its cell") in result.output
    rule = json.loads((tmp_path / "t.json").read_text())["grad"]["rule"]
    assert rule == "recurrent (poisson-lognormal depth 4, backprop 2)"
