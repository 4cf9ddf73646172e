"""No lost run under any signal or fault, and strict input (issue 10): SIGTERM and SIGINT at
a step, during the final evaluation and twice; divergence of the total loss; checkpoint
choice by step; resume rules; one-line errors for bad recipes, overrides and checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rich.console import Console

from deqctl import recipe as recipes
from deqctl.cli import app
from deqctl.engine import checkpoint, train as engine
from deqctl.engine.signals import StopOnSignal
from deqctl.ui import TrainView

from cli_helpers import RECIPE, rows, run_trials, runner, tiny, train, wait_for_rows

TINY = [*tiny(train=192, eval=64, iters=8), "data.eval_batch_size=32"]

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 8-step run (checkpoints at 3 and 6) to compare resumed runs with."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = train(RECIPE, *TINY, "train.max_steps=8", "train.save_every=3", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def one_row_per_split_and_step(run: Path) -> bool:
    keys = [(r["split"], r["step"]) for r in rows(run)]
    return len(keys) == len(set(keys))


# --- signals -----------------------------------------------------------------------------


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_step_saves_and_resumes_bit_exactly(reference, tmp_path, sig, code):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deqctl", "train", RECIPE, *TINY,
                             "train.max_steps=8", "train.save_every=3", "--out", str(out),
                             "--plain"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    wait_for_rows(proc, out)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, output
    assert "resume with: deqctl train --resume" in output and "Traceback" not in output
    stopped = checkpoint.step_of(out / "checkpoints" / "interrupted")
    assert 2 <= stopped < 8

    result = train("--resume", str(out))
    assert result.exit_code == 0, result.output
    assert one_row_per_split_and_step(out)
    ref = {(r["split"], r["step"]): r["loss"] for r in rows(reference)}
    got = {(r["split"], r["step"]): r["loss"] for r in rows(out)}
    assert got == {k: ref[k] for k in got} and ("test", 8) in got


class SignalAt:
    """A trainer callback (the loop's public seam) that sends `sig` to this process at the
    first evaluation batch of step `step` (None: any)."""

    def __init__(self, sig: int, step: int | None = None):
        self.sig, self.step, self.sent = sig, step, False

    def on_eval_batch(self, trainer, done, total):
        if not self.sent and self.step in (None, trainer.state.step):
            self.sent = True
            os.kill(os.getpid(), self.sig)


def run_trainer(out: Path, *overrides: str, callbacks=()):
    """Train the tiny recipe in this process through the Trainer, with `callbacks`."""
    recipe = recipes.load(RECIPE, [*TINY, *overrides])
    view = TrainView(None, fwd_tol=1e-3, bwd_tol=1e-3, plain=True, console=Console(quiet=True))
    return engine.Trainer(recipe, out, view, callbacks=callbacks).run()


def test_a_signal_during_the_final_evaluation_leaves_a_finished_resumable_run(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(engine.Interrupted, match="interrupted during the final evaluation") as err:
        run_trainer(out, "train.max_steps=2", "train.eval_every_epoch=false",
                    callbacks=[SignalAt(signal.SIGTERM)])
    assert err.value.code == 143
    final = out / "checkpoints" / "final"
    assert checkpoint.step_of(final) == 2
    assert json.loads((final / "meta.json").read_text())["metrics"] is None

    result = train("--resume", str(out))          # runs only the evaluation
    assert result.exit_code == 0, result.output
    assert [(r["split"], r["step"]) for r in rows(out)] == [("train", 1), ("train", 2), ("test", 2)]
    assert json.loads((final / "meta.json").read_text())["metrics"]["step"] == 2

    before = snapshot(out)
    result = train("--resume", str(out))          # finished: says so, changes nothing
    assert result.exit_code == 0 and "nothing to do" in result.output
    assert snapshot(out) == before


def test_a_second_signal_aborts_at_once():
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# --- divergence --------------------------------------------------------------------------


def test_a_nonfinite_total_loss_with_a_finite_task_loss_stops_and_saves_nothing(tmp_path):
    out = tmp_path / "run"        # a Jacobian weight beyond float32: the total loss is inf
    result = train(RECIPE, *TINY, "train.max_steps=4", "train.save_every=1",
                   "deq.jacobian_reg.weight=1e39", "--out", str(out))
    assert result.exit_code == 1 and "non-finite" in result.output
    assert "Traceback" not in result.output
    assert not (out / "checkpoints").exists() or not checkpoint.checkpoints(out)


def test_eval_refuses_nonfinite_weights(reference, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(reference / "checkpoints" / "final", bad)
    state = load_file(bad / "model.safetensors")
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, bad / "model.safetensors")
    result = runner.invoke(app, ["eval", str(bad)])
    assert result.exit_code == 2 and "NaN or inf" in result.output
    assert "Traceback" not in result.output


# --- checkpoint choice -------------------------------------------------------------------


def test_checkpoints_are_chosen_by_the_step_inside_them(reference, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(reference, run)                   # a copy: every file time is new
    ckpts = run / "checkpoints"
    os.utime(ckpts / "step-000003", (time.time() + 100, time.time() + 100))
    assert [checkpoint.step_of(c) for c in checkpoint.checkpoints(run)] == [3, 6, 8]
    assert checkpoint.resolve(run).name == "final"
    # a finished run extended and interrupted: the later step wins over `final`
    shutil.copytree(ckpts / "final", ckpts / "interrupted")
    meta = json.loads((ckpts / "interrupted" / "meta.json").read_text())
    (ckpts / "interrupted" / "meta.json").write_text(json.dumps({**meta, "step": 10}))
    assert checkpoint.resolve(run).name == "interrupted"
    # a crash between the two renames of a save: NAME.old stands in for NAME
    shutil.rmtree(ckpts / "interrupted")
    os.replace(ckpts / "final", ckpts / "final.old")
    assert checkpoint.resolve(run).name == "final.old"


# --- resume rules ------------------------------------------------------------------------


def test_resume_after_a_crash_keeps_one_row_per_step(reference, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / "final")     # crashed after step 8's rows
    shutil.rmtree(run / "checkpoints" / "step-000006")
    result = train("--resume", str(run))
    assert result.exit_code == 0, result.output
    assert one_row_per_split_and_step(run)
    def key(r): return r["split"], r["step"], r["loss"]   # noqa: E704 (timings differ)
    assert list(map(key, rows(run))) == list(map(key, rows(reference)))


@pytest.mark.parametrize("override, key", [("model.channels=16", "model.channels"),
                                           ("optim.name=sgd", "optim.name"),
                                           ("data.batch_size=16", "data.batch_size")])
def test_resume_refuses_settings_that_break_the_run(reference, override, key):
    before = snapshot(reference)
    result = train("--resume", str(reference / "checkpoints" / "step-000003"), override)
    assert result.exit_code == 2 and key in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert snapshot(reference) == before


def test_resume_accepts_a_longer_schedule_with_a_warning(reference, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(reference, run)
    result = train("--resume", str(run), "train.max_steps=9")
    assert result.exit_code == 0, result.output
    assert "warning: train.max_steps changed from 8 to 9" in result.output
    assert max(r["step"] for r in rows(run)) == 9 and one_row_per_split_and_step(run)


def test_resume_writes_only_into_its_own_run(reference, tmp_path):
    loose = tmp_path / "loose"
    shutil.copytree(reference / "checkpoints" / "step-000003", loose)
    result = train("--resume", str(loose))
    assert result.exit_code == 2 and "give --out" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loose"]
    result = train("--resume", str(loose), "--out", str(tmp_path / "new"))
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in rows(tmp_path / "new") if r["split"] == "train"] == [4, 5, 6, 7, 8]


def test_out_never_overwrites_a_file_the_user_wrote(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "recipe.yaml").write_text("my notes\n")
    result = train(RECIPE, *TINY, "train.max_steps=1", "--out", str(out))
    assert result.exit_code == 2 and "not empty" in result.output
    assert (out / "recipe.yaml").read_text() == "my notes\n"


# --- strict input ------------------------------------------------------------------------


@pytest.mark.parametrize("override, says", [
    ("deq.forward.max_iter=on", "deq.forward.max_iter: expected an integer, got true"),
    ("data.batch_size=true", "data.batch_size: expected an integer, got true"),
    ("deq.forward.tol=.inf", "deq.forward.tol: Input should be a finite number"),
    ("optim.lr=.nan", "optim.lr: Input should be a finite number"),
    ("data.batch_size=1000000000000", "data.batch_size: 1000000000000 is too large"),
    ("deq.forward.max_iter=20000", "deq.forward.max_iter: Input should be less than or equal to 10000"),
    ("deq.forward.compact=1", "deq.forward.compact: expected true or false, got 1"),
])
def test_strict_scalars(override, says):
    with pytest.raises(recipes.RecipeError, match=says.replace(".", r"\.")):
        recipes.load(RECIPE, [override])


def test_binary_recipe_is_one_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\xff\xfe\x00binary\x89PNG")
    result = train(str(path))
    assert result.exit_code == 2 and "not a text (UTF-8) file" in result.output
    assert "Traceback" not in result.output


def test_a_path_with_an_equals_sign_is_a_path(reference, tmp_path):
    run = tmp_path / "lr=1e-3"
    shutil.copytree(reference, run)
    result = runner.invoke(app, ["eval", str(run), "--json"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("damage", ["shape", "dtype", "meta-empty", "meta-list", "meta-step"])
def test_damaged_checkpoints_are_one_line(reference, tmp_path, damage):
    bad = tmp_path / "bad"
    shutil.copytree(reference / "checkpoints" / "final", bad)
    state = load_file(bad / "model.safetensors")
    name = next(k for k, v in state.items() if v.dim() >= 2)
    if damage == "shape":
        state[name] = state[name][:1]
    elif damage == "dtype":
        state[name] = state[name].double()
    elif damage == "meta-empty":
        (bad / "meta.json").write_text("{}")
    elif damage == "meta-list":
        (bad / "meta.json").write_text("[1, 2]")
    else:
        meta = json.loads((bad / "meta.json").read_text())
        (bad / "meta.json").write_text(json.dumps({**meta, "step": "three"}))
    save_file(state, bad / "model.safetensors")
    for command in (["eval", str(bad)], ["train", "--resume", str(bad), "--out",
                                         str(tmp_path / "r")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in result.output
        assert not (tmp_path / "r").exists()


def test_a_full_disk_stops_with_one_line_and_leaves_no_debris(reference, tmp_path):
    """Files may grow no larger than the weights: the trainer state (Adam's moments are
    twice the weights) no longer fits, as on a disk that fills during a save."""
    run = tmp_path / "copy"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / "final")
    before = snapshot(run / "checkpoints")
    ckpt = reference / "checkpoints" / "final"
    limit = ((ckpt / "model.safetensors").stat().st_size
             + (ckpt / "trainer.safetensors").stat().st_size) // 2
    output = tmp_path / "out.txt"
    status = run_trials(tmp_path, [{"argv": ["train", "--resume", str(run), "--plain"],
                                    "kill_at": 0, "fsize": limit, "output": str(output)}])
    text = output.read_text()
    assert status == [1] and "File too large" in text, text
    assert "earlier checkpoints are intact" in text and "Traceback" not in text
    assert snapshot(run / "checkpoints") == before      # no .tmp left, nothing replaced


def test_a_disk_too_small_for_two_checkpoints_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "run"
    result = train(RECIPE, *TINY, "train.max_steps=1", "--out", str(out))
    assert result.exit_code == 1 and "MB free" in result.output and not out.exists()


def signal_at_write(tmp_path: Path, out: Path, sig: str, write: str, *overrides: str):
    """Train the tiny recipe in a child process that receives `sig` just before its first
    write whose path ends with `write`; returns (exit status, output)."""
    argv = ["train", RECIPE, *TINY, *overrides, "--out", str(out), "--plain"]
    log = tmp_path / "writes.log"
    assert run_trials(tmp_path, [{"argv": argv, "kill_at": 0, "log": str(log)}]) == [0]
    k = next(i for i, line in enumerate(log.read_text().splitlines(), 1) if line.endswith(write))
    shutil.rmtree(out)
    output = tmp_path / "out.txt"
    status = run_trials(tmp_path, [{"argv": argv, "kill_at": k, "signal": sig,
                                    "output": str(output)}])
    return status[0], output.read_text()


def test_a_signal_during_a_checkpoint_write_finishes_the_write_then_stops(reference, tmp_path):
    out = tmp_path / "run"
    code, output = signal_at_write(tmp_path, out, "SIGINT", "step-000003.tmp/model.safetensors",
                                   "train.max_steps=8", "train.save_every=3")
    assert code == 130, output
    assert checkpoint.step_of(out / "checkpoints" / "step-000003") == 3      # completed
    assert checkpoint.step_of(out / "checkpoints" / "interrupted") == 3
    assert not list((out / "checkpoints").glob("*.tmp"))
    result = train("--resume", str(out))
    assert result.exit_code == 0, result.output
    ref = {(r["split"], r["step"]): r["loss"] for r in rows(reference)}
    assert {(r["split"], r["step"]): r["loss"] for r in rows(out)} == ref


def test_a_signal_during_a_mid_training_evaluation_redoes_it_on_resume(reference, tmp_path):
    out = tmp_path / "run"                  # the epoch evaluation at step 6
    with pytest.raises(engine.Interrupted) as err:
        run_trainer(out, "train.max_steps=8", "train.save_every=3",
                    callbacks=[SignalAt(signal.SIGTERM, step=6)])
    assert err.value.code == 143
    assert checkpoint.step_of(out / "checkpoints" / "interrupted") == 6
    assert ("test", 6) not in {(r["split"], r["step"]) for r in rows(out)}
    result = train("--resume", str(out))
    assert result.exit_code == 0, result.output
    ref = {(r["split"], r["step"]): r["loss"] for r in rows(reference)}
    assert {(r["split"], r["step"]): r["loss"] for r in rows(out)} == ref   # bit-exact, eval at 6 too


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(reference, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(reference, run)
    result = train("--resume", str(run / "checkpoints" / "step-000003"), "train.max_steps=5")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["final", "final.superseded", "step-000003", "step-000006.superseded"]
    assert checkpoint.step_of(checkpoint.resolve(run)) == 5
    assert max(r["step"] for r in rows(run)) == 5 and one_row_per_split_and_step(run)


def test_a_stopped_run_keeps_the_steps_since_the_last_row_for_its_resumption(tmp_path):
    """With log_every > 1, a signal during a checkpoint write stops at that step; the steps
    since the last row go into the `interrupted` checkpoint, not into a row of their own,
    so the resumed run's rows are an unstopped run's, value for value but the clock's."""
    args = ("train.max_steps=8", "train.save_every=3", "train.log_every=5")
    out = tmp_path / "run"
    code, output = signal_at_write(tmp_path, out, "SIGINT", "step-000003.tmp/model.safetensors",
                                   *args)
    assert code == 130, output
    assert not (out / "metrics.jsonl").exists()          # no row is due before step 5
    assert train("--resume", str(out)).exit_code == 0
    whole = tmp_path / "whole"
    assert train(RECIPE, *TINY, *args, "--out", str(whole)).exit_code == 0
    clock = {"wall_s", "step_time_s", "samples_per_s", "eval_time_s", "peak_mem_mb"}
    strip = [[{k: v for k, v in r.items() if k not in clock} for r in rows(run)]
             for run in (out, whole)]
    assert strip[0] == strip[1]
    assert [r["step"] for r in strip[0] if r["split"] == "train"] == [5, 8]


