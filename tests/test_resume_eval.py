"""Resume after any stop, for every task: a run stopped by SIGTERM inside a mid-training
evaluation and resumed (which redoes that evaluation first, under inference mode, then
trains on) ends with the rows and the bit-identical weights of a run never stopped.

Nothing an evaluation builds under `torch.inference_mode` may reach training: a forecaster
once cached its loss scale lazily, so a resume that evaluated first failed at its next
step with "Inference tensors cannot be saved for backward", on every rerun."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from deqctl import recipe as recipes
from deqctl.data import DataInfo
from deqctl.engine import checkpoint, train as engine
from deqctl.tasks import task_for
from deqctl.ui import TrainView

from cli_helpers import CONFIGS, rows, tiny, train
from test_faults import SignalAt

pytestmark = pytest.mark.usefixtures("one_thread")

# Each task's shipped recipe made a run of seconds; every evaluation takes several batches,
# so the signal at the first one lands inside it.
TASKS = {
    "classify": ("mnist-deq.yaml", [*tiny(train=96, eval=64, iters=8),
                                    "data.eval_batch_size=16"]),
    "lm": ("shakespeare-deq.yaml", [
        "model.d_model=16", "model.heads=2", "model.d_ff=32", "data.seq_len=32",
        "data.limit_train=96", "data.limit_eval=32", "data.batch_size=32",
        "data.eval_batch_size=8", "train.log_every=1", "runtime.threads=1"]),
    "forecast": ("co2-forecast-deq.yaml", [
        "model.d_model=8", "model.heads=2", "model.d_ff=16", "data.limit_train=96",
        "data.limit_eval=16", "data.batch_size=32", "data.eval_batch_size=4",
        "train.log_every=1", "runtime.threads=1"]),
}
# four steps, the evaluation at step 2 the one stopped
SCHEDULE = ["train.max_steps=4", "train.eval_every=2", "train.eval_every_epoch=false"]
TIMING = {"wall_s", "step_time_s", "samples_per_s", "peak_mem_mb", "eval_time_s"}


def untimed(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows(run)]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / "final" / "model.safetensors")


def stopped_in_evaluation(out: Path, recipe: str, overrides: list[str]) -> None:
    """Train in this process until SIGTERM, sent at the first batch of the step-2
    evaluation, stops it; check it stopped there, with that evaluation still to do."""
    r = recipes.load(str(CONFIGS / recipe), [*overrides, *SCHEDULE])
    view = TrainView(None, fwd_tol=1e-3, bwd_tol=1e-3, plain=True, console=Console(quiet=True))
    with pytest.raises(engine.Interrupted) as err:
        engine.Trainer(r, out, view, callbacks=[SignalAt(signal.SIGTERM, step=2)]).run()
    assert err.value.code == 143
    folder = out / "checkpoints" / "interrupted"
    assert checkpoint.step_of(folder) == 2
    assert checkpoint.load_trainer(folder)[1]["state"]["eval_pending"] is True
    assert [(r["split"], r["step"]) for r in rows(out)] == [("train", 1), ("train", 2)]


@pytest.mark.parametrize("task", ["forecast", "classify", "lm"])
def test_a_run_stopped_inside_an_evaluation_resumes_to_the_uninterrupted_result(task, tmp_path):
    recipe, overrides = TASKS[task]
    whole = tmp_path / "whole"
    result = train(str(CONFIGS / recipe), *overrides, *SCHEDULE, "--out", str(whole))
    assert result.exit_code == 0, result.output

    out = tmp_path / "run"
    stopped_in_evaluation(out, recipe, overrides)
    result = train("--resume", str(out))        # redoes the evaluation, then trains on
    assert result.exit_code == 0, result.output
    again = train("--resume", str(out))         # a finished run: nothing left to do
    assert again.exit_code == 0 and "nothing to do" in again.output, again.output

    assert [(r["split"], r["step"]) for r in rows(out)] == [
        ("train", 1), ("train", 2), ("test", 2), ("train", 3), ("train", 4), ("test", 4)]
    assert untimed(out) == untimed(whole)
    got, want = weights(out), weights(whole)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


INFOS = {
    "classify": DataInfo("d", "classify", "image", (1, 2, 2), num_classes=3),
    "lm": DataInfo("d", "lm", "tokens", (5,), tokenizer="byte"),
    "forecast": DataInfo("d", "forecast", "sequence", (8, 1), target_shape=(4, 1),
                         mean=(0.0,), std=(1.0,), target_mean=(0.0,), target_std=(2.0,),
                         target_channels=(0,), season=4),
}


def batch(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input, output, target) of two samples for task `name` (its own generator: the
    global RNG other tests seed stays untouched)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 1, generator=g)
    if name == "classify":
        return x, torch.randn(2, 3, generator=g), torch.tensor([0, 2])
    if name == "lm":
        return x, torch.randn(2, 5, 256, generator=g), torch.randint(0, 256, (2, 5), generator=g)
    return x, torch.randn(2, 4, 1, generator=g), torch.randn(2, 4, 1, generator=g)


@pytest.mark.parametrize("name", list(INFOS))
def test_a_task_evaluated_first_under_inference_mode_still_trains(name):
    task, (x, out, y) = task_for(INFOS[name]), batch(name)
    with torch.inference_mode():                 # what an evaluation does first
        task.loss(out, y)
        task.stats(out, x, y)
    weight = torch.ones((), requires_grad=True)
    task.loss(out * weight, y).backward()        # what training does next
    assert weight.grad is not None and torch.isfinite(weight.grad)
