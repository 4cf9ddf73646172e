"""A SIGKILL at any instant, then `--resume`, loses nothing (issue 15): one metrics row per
(split, step), the same rows and the same final weights as a run that was never killed.
The kill comes just before each file-system write a run makes, in turn (tests/crash_points.py
counts writes at the level of the calls Python makes to the operating system)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from deqctl.engine import checkpoint

from cli_helpers import RECIPE, rows, run_trials, tiny

TINY = [*tiny(train=160, eval=32, iters=6), "--plain"]
# Checkpoints at 2 and 4 with rows at 3 and 5: a checkpoint holds steps a train row has
# not reported yet; an evaluation at 3; the final save before and after the last one.
SCHEDULE = ["train.max_steps=5", "train.save_every=2", "train.log_every=3",
            "train.eval_every=3"]
TIMING = {"step_time_s", "samples_per_s", "wall_s", "peak_mem_mb", "eval_time_s"}


def content(run: Path) -> list[tuple]:
    """The rows without their timings, which no two runs share."""
    return [tuple((k, v) for k, v in r.items() if k not in TIMING) for r in rows(run)]


def weights(run: Path) -> dict:
    return load_file(run / "checkpoints" / "final" / "model.safetensors")


def writes(log: Path) -> list[str]:
    return log.read_text().splitlines()


def check_resumed(run: Path, reference: Path, status, where: str) -> None:
    keys = [(r["split"], r["step"]) for r in rows(run)]
    assert len(keys) == len(set(keys)), (where, keys)
    assert content(run) == content(reference), where
    got, want = weights(run), weights(reference)
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got), where


def kill_everywhere(tmp_path: Path, argv, reference: Path, log: Path, every: int = 1):
    """Kill a copy of `argv` before its k-th write, for each k (every `every`-th), resume
    each, and compare with `reference`; returns how many points were tried."""
    points = range(1, len(writes(log)) + 1, every)
    trials = [{"argv": [*argv, "--out", str(tmp_path / f"k{k}")], "kill_at": k}
              for k in points]
    assert set(run_trials(tmp_path, trials)) == {"killed"}
    resumed = run_trials(tmp_path, [{"argv": ["train", "--resume", str(tmp_path / f"k{k}"),
                                              "--plain"], "kill_at": 0,
                                     "output": str(tmp_path / f"r{k}.out")} for k in points])
    for k, status in zip(points, resumed):
        run, where = tmp_path / f"k{k}", f"killed before write {writes(log)[k - 1]}"
        if not checkpoint.checkpoints(run):  # before the first checkpoint: one line, exit 2
            assert status == 2, where
            continue
        assert status == 0, (where, (tmp_path / f"r{k}.out").read_text())
        check_resumed(run, reference, status, where)
    return len(points)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted run, with the log of every write it made."""
    folder = tmp_path_factory.mktemp("crash")
    log = folder / "writes.log"
    argv = ["train", RECIPE, *TINY, *SCHEDULE, "--out", str(folder / "reference")]
    assert run_trials(folder, [{"argv": argv, "kill_at": 0, "log": str(log)}]) == [0]
    return folder / "reference", log


def test_the_write_log_covers_every_kind_of_write(reference):
    run, log = reference
    kinds = " ".join(writes(log))
    for what in ("metrics.jsonl", "model.safetensors", "trainer.json", "recipe.yaml",
                 "replace", ".lock"):
        assert what in kinds, what
    assert len(writes(log)) > 30


@pytest.mark.slow
def test_a_kill_before_any_write_then_resume_loses_nothing(reference, tmp_path):
    run, log = reference
    kill_everywhere(tmp_path, ["train", RECIPE, *TINY, *SCHEDULE], run, log)


def test_a_kill_at_every_fifth_write_then_resume_loses_nothing(reference, tmp_path):
    """The default suite's share of the test above (which tries every write): a fifth of
    the points, spread over the whole run."""
    run, log = reference
    tried = kill_everywhere(tmp_path, ["train", RECIPE, *TINY, *SCHEDULE], run, log, every=5)
    assert tried >= 8


def killed_then_resumed(tmp_path: Path, trials: list[dict], points: list[int], run: Path,
                        lines: list[str]) -> None:
    """Each trial (one per write k in `points`, its run in tmp_path/kK) is killed at its
    write; `--resume` of each then ends with the uninterrupted run's rows and weights."""
    assert set(run_trials(tmp_path, trials)) == {"killed"}
    resumed = run_trials(tmp_path, [{"argv": ["train", "--resume", str(tmp_path / f"k{k}"),
                                              "--plain"], "kill_at": 0} for k in points])
    for k, status in zip(points, resumed):
        assert status == 0, lines[k - 1]
        check_resumed(tmp_path / f"k{k}", run, status, lines[k - 1])


def test_a_kill_during_the_final_save_and_evaluation(reference, tmp_path):
    """The window the probe hit 3 times in 3: after the final test row, before the
    second save of `final`."""
    run, log = reference
    lines = writes(log)
    last_row = max(i for i, line in enumerate(lines, 1) if "metrics.jsonl" in line)
    swaps = [i for i, line in enumerate(lines, 1) if i > last_row and " replace " in f" {line}"]
    points = [last_row - 1, last_row, last_row + 1, *swaps]
    trials = [{"argv": ["train", RECIPE, *TINY, *SCHEDULE, "--out", str(tmp_path / f"k{k}")],
               "kill_at": k} for k in points]
    killed_then_resumed(tmp_path, trials, points, run, lines)


def _kill_a_resume(reference, tmp_path, every_write: bool) -> None:
    """A resume rewrites the run before it trains (later checkpoints set aside, rows
    dropped, recipe rewritten): killed at those writes, `--resume RUN` still ends with
    the uninterrupted run's rows and weights."""
    run, _ = reference
    log = tmp_path / "resume.log"
    first = tmp_path / "counted"
    shutil.copytree(run, first)
    again = ["train", "--resume", str(first / "checkpoints" / "step-000002"), "--plain"]
    assert run_trials(tmp_path, [{"argv": again, "kill_at": 0, "log": str(log)}]) == [0]
    check_resumed(first, run, 0, "uninterrupted resume")
    lines = writes(log)
    first_save = next(k for k, line in enumerate(lines, 1) if "step-000004.tmp" in line)
    points = [k for k in range(1, first_save + 1)   # every write up to its first new save
              if every_write or " replace " in f" {lines[k - 1]} "]
    for k in points:
        shutil.copytree(run, tmp_path / f"k{k}")
    trials = [{"argv": ["train", "--resume",
                        str(tmp_path / f"k{k}" / "checkpoints" / "step-000002"), "--plain"],
               "kill_at": k} for k in points]
    killed_then_resumed(tmp_path, trials, points, run, lines)


def test_a_kill_at_a_resume_s_renames(reference, tmp_path):
    _kill_a_resume(reference, tmp_path, every_write=False)


@pytest.mark.slow
def test_a_kill_at_any_write_of_a_resume(reference, tmp_path):
    _kill_a_resume(reference, tmp_path, every_write=True)
