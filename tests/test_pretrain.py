"""Shallow pretraining (deq.pretrain_steps): the first N training steps are the unrolled
twin's, gradient for gradient; step N + 1 on is implicit; the switch is a function of the
saved step count, so a run resumed across it is the run never stopped."""

from __future__ import annotations

import signal

import pytest
import torch
from rich.console import Console

from deqctl import recipe as recipes
from deqctl.engine import train as engine
from deqctl.implicit import DEQ
from deqctl.ui import TrainView

from cli_helpers import RECIPE, rows, tiny, train
from test_faults import SignalAt
from test_implicit import EXACT_FORWARD, deq_layer, loss_of, small_problem, unrolled_grads

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_first_steps_train_the_twin_then_the_fixed_point():
    W, x, target, cell = small_problem()
    layer = deq_layer("ift", unrolled={"depth": 5}, pretrain_steps=2)
    twin = DEQ(mode="unrolled", unrolled={"depth": 5}).train()
    for step in range(4):
        z, info = layer(cell, x, torch.zeros_like(x))
        (got,) = torch.autograd.grad(loss_of(z, target), W)
        if step < 2:                                    # the twin's gradient, exactly
            zt, _ = twin(cell, x, torch.zeros_like(x))
            (want,) = torch.autograd.grad(loss_of(zt, target), W)
            assert torch.equal(got, want) and info.forward.nfe == 5 and info.backward is None
        else:                                           # the implicit gradient
            want, _ = unrolled_grads(W, x, target, cell)
            assert torch.allclose(got, want, rtol=1e-7, atol=1e-9)
            assert info.backward is not None and info.backward.converged.all()
    assert layer.step == 4
    # evaluation solves for the fixed point even while pretraining
    fresh = DEQ(forward=EXACT_FORWARD, pretrain_steps=10).eval()
    with torch.no_grad():
        _, info = fresh(cell, x, torch.zeros_like(x))
    assert info.forward.nfe > 5 and info.forward.converged.all()


def test_pretraining_is_for_implicit_models():
    with pytest.raises(ValueError, match="pretrain_steps must be 0 with mode=unrolled"):
        DEQ(mode="unrolled", pretrain_steps=3)


SCHEDULE = [*tiny(iters=6), "deq.pretrain_steps=2", "deq.unrolled.depth=3",
            "train.max_steps=4", "train.eval_every=3", "train.eval_every_epoch=false"]


def test_a_run_resumed_across_the_switch_is_the_run_never_stopped(tmp_path):
    whole = tmp_path / "whole"
    result = train(RECIPE, *SCHEDULE, "--out", str(whole))
    assert result.exit_code == 0
    assert "shallow pretraining: steps 1 to 2 train the cell unrolled (depth 3)" in result.output
    assert "step 3: shallow pretraining done; training implicitly from here" in result.output
    trained = [r for r in rows(whole) if r["split"] == "train"]
    assert [r["fwd_nfe"] for r in trained[:2]] == [3, 3]          # the twin's depth
    assert all(r.get("bwd_nfe") for r in trained[2:])             # an adjoint solve

    out = tmp_path / "run"              # stopped at the step-3 evaluation, after the switch
    recipe = recipes.load(RECIPE, SCHEDULE)
    view = TrainView(None, fwd_tol=1e-3, bwd_tol=1e-3, plain=True, console=Console(quiet=True))
    with pytest.raises(engine.Interrupted):
        engine.Trainer(recipe, out, view, callbacks=[SignalAt(signal.SIGTERM, step=3)]).run()
    assert train("--resume", str(out)).exit_code == 0
    timing = {"wall_s", "step_time_s", "samples_per_s", "peak_mem_mb", "eval_time_s"}
    untimed = (lambda run: [{k: v for k, v in r.items() if k not in timing} for r in rows(run)])
    assert untimed(out) == untimed(whole)
