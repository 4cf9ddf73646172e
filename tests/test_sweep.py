"""`deqctl sweep`: a grid of ordinary runs, validated before anything runs, resumable after
a signal or a SIGKILL, failures kept apart, and one command per point for a job array."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deqctl.cli import app
from deqctl.sweep import SweepError, make_plan
from deqctl.sweep.plan import split_values

from cli_helpers import RECIPE, rows, runner, tiny

TINY = [o for o in tiny() if not o.startswith("runtime.threads")]
LONG = ["train.max_steps=40", "train.save_every=5", "optim.lr=1e-3,2e-3"]   # ~10 s a point


def sweep(*args: str, steps: list[str] = ("train.max_steps=2",)):
    return runner.invoke(app, ["sweep", RECIPE, *TINY, *steps, *map(str, args), "--plain"])


def plan_of(out: Path) -> dict:
    return {p["name"]: p for p in json.loads((out / "sweep.json").read_text())["points"]}


def one_row_per_step(run: Path) -> None:
    keys = [(r["split"], r["step"]) for r in rows(run)]
    assert len(keys) == len(set(keys)), keys


def test_axes_split_on_top_level_commas_only():
    assert split_values("1e-3,3e-3") == ["1e-3", "3e-3"]
    assert split_values("[a,b],[c]") == ["[a,b]", "[c]"]
    assert split_values("'x,y',z") == ["'x,y'", "z"]
    assert split_values("{m: 5, lam: 1e-4},{m: 3}") == ["{m: 5, lam: 1e-4}", "{m: 3}"]


def test_a_plan_is_the_product_of_its_axes_named_by_their_settings():
    plan = make_plan(RECIPE, ["optim.lr=1e-3,3e-3", "deq.mode=implicit,unrolled",
                              "train.max_steps=5"], [0, 1])
    assert len(plan.points) == 8
    assert plan.points[0].name == "lr=1e-3_mode=implicit_seed=0"
    assert plan.points[0].overrides == ["train.max_steps=5", "optim.lr=1e-3",
                                        "deq.mode=implicit", "seed=0"]
    assert len({p.name for p in plan.points}) == 8
    # two keys ending alike keep their whole names
    both = make_plan(RECIPE, ["deq.forward.tol=1e-3,1e-4", "deq.eval.tol=1e-3,1e-2"], None)
    assert both.points[0].name == "deq.forward.tol=1e-3_deq.eval.tol=1e-3"
    for bad, words in ((["optim.lr"], "expected key.sub=value"),
                       (["seed=1,2"], "given twice"),
                       (["optim.lr=1e-3,"], "empty value")):
        with pytest.raises(SweepError, match=words):
            make_plan(RECIPE, bad, [0] if bad == ["seed=1,2"] else None)


def test_a_bad_point_is_named_and_nothing_runs(tmp_path):
    out = tmp_path / "s"
    result = sweep("optim.lr=1e-3,fast", "--out", out)
    assert result.exit_code == 2
    assert "lr=fast: optim.lr" in result.stderr and "nothing was run" in result.stderr
    assert not out.exists()


def test_a_sweep_runs_every_point_and_the_same_command_runs_none_again(tmp_path):
    out = tmp_path / "s"
    result = sweep("optim.lr=1e-3,3e-3", "--seeds", "0,1", "--out", out, "--jobs", "2")
    assert result.exit_code == 0, result.output
    points = plan_of(out)
    assert sorted(points) == ["lr=1e-3_seed=0", "lr=1e-3_seed=1", "lr=3e-3_seed=0",
                              "lr=3e-3_seed=1"]
    assert all(p["status"] == "finished" and p["attempts"] == 1 for p in points.values())
    for name in points:
        recipe = (out / name / "recipe.yaml").read_text()
        assert f"seed: {name[-1]}" in recipe and rows(out / name)[-1]["split"] == "test"
    again = sweep("optim.lr=1e-3,3e-3", "--seeds", "0,1", "--out", out)
    assert again.exit_code == 0 and "4 finished before" in again.output
    assert all(p["attempts"] == 1 for p in plan_of(out).values())
    changed = sweep("optim.lr=1e-3,1e-2", "--seeds", "0,1", "--out", out)
    assert changed.exit_code == 2 and "holds another sweep (axes changed" in changed.stderr
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    taken = sweep("optim.lr=1e-3,3e-3", "--out", other)
    assert taken.exit_code == 2 and "no sweep.json" in taken.stderr


def test_a_failing_point_leaves_the_others_and_is_retried_only_when_asked(tmp_path):
    out = tmp_path / "s"
    args = ("optim.lr=1e-3,1e30", "--out", out)        # 1e30: the loss turns NaN at once
    result = sweep(*args)
    assert result.exit_code == 1
    points = plan_of(out)
    assert points["lr=1e-3"]["status"] == "finished"
    failed = points["lr=1e30"]
    assert failed["status"] == "failed" and failed["exit_code"] == 1
    assert "non-finite" in failed["message"] and "failed lr=1e30" in result.output
    again = sweep(*args)
    assert again.exit_code == 1 and plan_of(out)["lr=1e30"]["attempts"] == 1
    retried = sweep(*args, "--retry-failed")
    assert retried.exit_code == 1 and plan_of(out)["lr=1e30"]["attempts"] == 2


def _sweep_process(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-m", "deqctl", "sweep", RECIPE, *TINY, *LONG,
                             "--out", str(out), "--plain", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_rows(run: Path, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "metrics.jsonl").is_file() and len(rows(run)) >= n and \
                (run / "checkpoints").is_dir():
            return
        time.sleep(0.1)
    raise AssertionError(f"{run}: fewer than {n} rows after {timeout} s")


def test_sigterm_stops_every_point_with_a_checkpoint_and_the_sweep_resumes(tmp_path):
    out = tmp_path / "s"
    proc = _sweep_process(out, "--jobs", "2")
    _wait_for_rows(out / "lr=1e-3", 6)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    points = plan_of(out)
    assert {p["status"] for p in points.values()} == {"interrupted"}
    assert (out / "lr=1e-3" / "checkpoints" / "interrupted").is_dir()
    again = sweep("--out", out, steps=LONG)
    assert again.exit_code == 0, again.output
    for name in points:
        one_row_per_step(out / name)
        assert [r["step"] for r in rows(out / name) if r["split"] == "train"] == \
            list(range(1, 41))


def test_a_sweep_killed_at_any_moment_finishes_when_run_again(tmp_path):
    out = tmp_path / "s"
    proc = _sweep_process(out)
    _wait_for_rows(out / "lr=1e-3", 3)
    time.sleep(0.7)
    proc.kill()                       # the points die with it (and save what they can)
    proc.wait(timeout=60)
    again = sweep("--out", out, steps=LONG)
    assert again.exit_code == 0, again.output
    assert {p["status"] for p in plan_of(out).values()} == {"finished"}
    for name in plan_of(out):
        one_row_per_step(out / name)
        assert max(r["step"] for r in rows(out / name)) == 40


def test_print_commands_gives_one_train_command_per_point(tmp_path):
    out = tmp_path / "s"
    result = sweep("optim.lr=1e-3,3e-3", "--seeds", "0,1", "--out", out, "--print-commands")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("deqctl train ") for line in lines)
    assert lines[0].endswith(f"""optim.lr=1e-3 seed=0 'log.group="s"' --out {out / 'lr=1e-3_seed=0'}""")
    assert not any((out / n).exists() for n in plan_of(out))       # nothing was run
    # a job array ran one of them: the sweep takes that run as finished
    done = runner.invoke(app, [*shlex.split(lines[0])[1:], "--plain"])
    assert done.exit_code == 0, done.output
    rest = sweep("optim.lr=1e-3,3e-3", "--seeds", "0,1", "--out", out)
    assert rest.exit_code == 0 and "1 finished before" in rest.output
