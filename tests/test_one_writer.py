"""One writer per run, and no file overwritten (issue 15): parallel trains, live resumes,
stale locks, readers of a run in progress, and every output path a user names."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from deqctl.cli import app
from deqctl.engine import checkpoint

from cli_helpers import RECIPE, rows, runner, tiny, train, wait_for_rows

TINY = tiny(train=96, eval=32, iters=6)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")


def deqctl(*args, cwd=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deqctl", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def one_row_per_split_and_step(run: Path) -> bool:
    keys = [(r["split"], r["step"]) for r in rows(run)]
    return len(keys) == len(set(keys))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("done") / "run"
    result = train(RECIPE, *TINY, "train.max_steps=6", "train.save_every=2", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


# --- claiming a run directory ---------------------------------------------------------


def test_four_parallel_trains_with_default_names_get_four_runs(tmp_path):
    lrs = ["1e-3", "2e-3", "3e-3", "4e-3"]
    procs = [deqctl("train", RECIPE, *TINY, "train.max_steps=2", f"optim.lr={lr}", "--plain",
                    cwd=tmp_path) for lr in lrs]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 4 and len({r.name for r in runs}) == 4
    seen = set()
    for run in runs:
        lr = yaml.safe_load((run / "recipe.yaml").read_text())["optim"]["lr"]
        seen.add(lr)
        assert checkpoint.step_of(run / "checkpoints" / "final") == 2
        assert [(r["split"], r["step"]) for r in rows(run)] == [("train", 1), ("train", 2),
                                                                 ("test", 2)]
        assert not (run / ".lock").exists()
    assert seen == {float(lr) for lr in lrs}


def test_two_trains_with_the_same_out_one_is_refused(tmp_path):
    out = tmp_path / "run"
    procs = [deqctl("train", RECIPE, *TINY, "train.max_steps=3", f"seed={s}", "--out", str(out),
                    "--plain") for s in (1, 2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outputs
    refused = outputs[[p.returncode for p in procs].index(2)]
    assert "error:" in refused and "Traceback" not in refused
    assert one_row_per_split_and_step(out)
    assert yaml.safe_load((out / "recipe.yaml").read_text())["seed"] in (1, 2)


def test_a_recipe_name_is_a_plain_name_never_a_path(tmp_path):
    for name in ("../../escaped", "/tmp/abs", "''", ".hidden", "a b"):
        result = runner.invoke(app, ["train", RECIPE, f"name={name}", "--plain"])
        assert result.exit_code == 2, (name, result.output)
        assert "name: expected a plain name" in result.output
    assert not (tmp_path.parent / "escaped").exists()


# --- a run in progress ------------------------------------------------------------------


@pytest.fixture
def training(tmp_path):
    """A run training in another process (long enough to be caught), killed at the end."""
    out = tmp_path / "live"
    proc = deqctl("train", RECIPE, *TINY, "train.max_steps=400", "train.save_every=2",
                  "--out", str(out), "--plain")
    wait_for_rows(proc, out, n=3)
    deadline = time.time() + 60
    while not checkpoint.checkpoints(out) and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    yield out, proc
    proc.kill()
    proc.wait()


def test_resuming_a_run_that_is_training_is_refused_and_changes_nothing(training):
    out, proc = training
    for args in (["--resume", str(out)], ["--resume", str(out / "checkpoints" / "step-000002")]):
        result = train(*args)
        assert result.exit_code == 2, result.output
        assert f"is being written by pid {proc.pid} on {socket.gethostname()}" in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not list((out / "checkpoints").glob("*.superseded*"))
    assert one_row_per_split_and_step(out)
    result = train(RECIPE, *TINY, "--out", str(out))
    assert result.exit_code == 2 and "is being written by" in result.output


def test_readers_of_a_run_in_progress_use_its_last_complete_checkpoint(training, tmp_path):
    out, proc = training
    result = runner.invoke(app, ["eval", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert "still being trained" in result.stderr and "last complete checkpoint" in result.stderr
    json.loads(result.stdout)
    result = runner.invoke(app, ["compare", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert "still being trained" in result.stderr
    result = runner.invoke(app, ["export", str(out), "--format", "safetensors", "--out",
                                 str(tmp_path / "m.safetensors")])
    assert result.exit_code == 0, result.output
    assert "still being trained" in result.stderr


def test_a_killed_run_s_lock_is_stale_and_the_run_resumes(training):
    out, proc = training
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    holder = json.loads((out / ".lock").read_text())
    assert holder["pid"] == proc.pid
    result = train("--resume", str(out), "train.max_steps=8")
    assert result.exit_code == 0, result.output
    assert f"locked by pid {proc.pid}" in result.output and "no longer running" in result.output
    assert one_row_per_split_and_step(out) and not (out / ".lock").exists()


def test_two_concurrent_resumes_one_is_refused(finished, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "checkpoints" / "final")
    procs = [deqctl("train", "--resume", str(run), "train.max_steps=60", "--plain")
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 2], outputs
    assert one_row_per_split_and_step(run)


def test_a_lock_names_its_holder_and_a_dead_or_reused_pid_is_stale(tmp_path):
    from deqctl.engine import rundir
    from deqctl.engine.rundir import Holder, RunDirError, RunLock

    run = tmp_path / "run"
    run.mkdir()
    with RunLock.acquire(run) as lock:
        holder = rundir.read_holder(run)
        assert holder.pid == os.getpid() and holder.host == socket.gethostname()
        assert rundir.live_holder(run) == holder and lock.stale is None
        with pytest.raises(RunDirError, match="being written by pid"):
            RunLock.acquire(run)          # another open file: refused, as another process
    assert not (run / ".lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for left in (Holder(dead.pid, socket.gethostname(), time.time()),
                 Holder(os.getpid(), socket.gethostname(), time.time(), proc_start=1)):
        (run / ".lock").write_text(json.dumps(left.__dict__))
        assert rundir.live_holder(run) is None       # gone, or a reused pid
        with RunLock.acquire(run) as lock:
            assert lock.stale == left
    remote = Holder(1, "another-host", time.time())
    (run / ".lock").write_text(json.dumps(remote.__dict__))
    assert rundir.live_holder(run) == remote          # another host: assumed alive


# --- never overwrite ----------------------------------------------------------------------


def test_export_never_replaces_a_file_without_force(finished, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    result = runner.invoke(app, ["export", str(finished), "--format", "safetensors",
                                 "--out", str(notes)])
    assert result.exit_code == 2 and "exists; pass --force" in result.output
    assert notes.read_text() == "mine\n"
    result = runner.invoke(app, ["export", str(finished), "--format", "safetensors",
                                 "--out", str(notes), "--force"])
    assert result.exit_code == 0, result.output
    assert notes.read_bytes()[:8] != b"mine\n" and not list(tmp_path.glob(".notes*"))


@pytest.mark.parametrize("target", ["recipe.yaml", "metrics.jsonl",
                                    "checkpoints/final/model.safetensors",
                                    "checkpoints/final/new.onnx", ".lock"])
def test_a_run_s_own_files_are_never_an_output(finished, target):
    path = finished / target
    before = path.read_bytes() if path.exists() else None
    for force in ([], ["--force"]):
        result = runner.invoke(app, ["export", str(finished), "--format", "safetensors",
                                     "--out", str(path), *force])
        assert result.exit_code == 2 and "belongs to" in result.output, result.output
    assert (path.read_bytes() if path.exists() else None) == before


def test_an_export_s_own_input_is_never_its_output(finished, tmp_path):
    bundle = tmp_path / "m.safetensors"
    assert runner.invoke(app, ["export", str(finished), "--format", "safetensors", "--out",
                               str(bundle)]).exit_code == 0
    before = bundle.read_bytes()
    result = runner.invoke(app, ["export", str(bundle), "--format", "safetensors", "--out",
                                 str(bundle), "--force"])
    assert result.exit_code == 2 and "belongs to" in result.output
    assert bundle.read_bytes() == before


def test_a_failed_parity_check_writes_nothing(finished, tmp_path):
    out = tmp_path / "m.pt2"
    result = runner.invoke(app, ["export", str(finished), "--format", "pt2", "--out", str(out),
                                 "--iters", "1", "--max-diff", "1e-6"])
    assert result.exit_code == 1 and "was not written" in result.output
    assert list(tmp_path.iterdir()) == []


def test_plot_and_json_outputs_are_checked_before_any_work(finished, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    cases = [["compare", str(finished), "--plot", str(notes)],
             ["compare", str(finished), "--plot", str(folder)],
             ["solve-trace", str(finished), "--plot", str(notes)],
             ["solve-trace", str(finished), "--json", str(notes)],
             ["solve-trace", str(finished), "--plot", str(folder)],
             ["solve-trace", str(finished), "--json", str(finished / "recipe.yaml"), "--force"],
             ["export", str(finished), "--format", "pt2", "--out", str(folder)],
             ["export", str(finished), "--format", "pt2", "--out", str(notes / "x.pt2")]]
    for args in cases:
        started = time.perf_counter()
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
        assert time.perf_counter() - started < 5, args     # refused before solving anything
    assert notes.read_text() == "mine\n" and list(folder.iterdir()) == []
    result = runner.invoke(app, ["compare", str(finished), "--plot", str(notes), "--force"])
    assert result.exit_code == 0 and notes.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_output_in_a_folder_without_write_permission_is_one_line(finished, tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    result = runner.invoke(app, ["compare", str(finished), "--plot", str(locked / "p.png")])
    assert result.exit_code == 2 and "permission denied" in result.output


def test_a_second_set_aside_gets_a_new_name(finished, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(finished, run)
    early = str(run / "checkpoints" / "step-000002")
    for _ in range(2):
        result = train("--resume", early, "train.max_steps=3")
        assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["final", "final.superseded", "final.superseded-2", "step-000002",
                     "step-000004.superseded", "step-000006.superseded"]
    assert checkpoint.step_of(run / "checkpoints" / "final.superseded") == 6   # the original
    assert checkpoint.step_of(run / "checkpoints" / "final.superseded-2") == 3


def test_a_hand_edited_recipe_is_named_and_kept_on_resume(finished, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "checkpoints" / "final")
    edited = (run / "recipe.yaml").read_text().replace("lr: 0.002", "lr: 0.5")
    (run / "recipe.yaml").write_text(edited)
    result = train("--resume", str(run))
    assert result.exit_code == 0, result.output
    assert "sets optim.lr" in result.output and "ignored" in result.output
    assert (run / "recipe.edited.yaml").read_text() == edited
    assert yaml.safe_load((run / "recipe.yaml").read_text())["optim"]["lr"] == 0.002
