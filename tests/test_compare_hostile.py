"""Hostile input to `deqctl compare`: one run named several ways counts once, an output
never lands on (or inside) what compare reads, and a --group-by key no run has is one
line with exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from deqctl.cli import app

from cli_helpers import runner
from test_hostile import one_line_exit_2

pytestmark = pytest.mark.usefixtures("one_thread")


def compare(*args) -> object:
    return runner.invoke(app, ["compare", *map(str, args)])


@pytest.fixture
def sweep(run, tmp_path) -> Path:
    """A sweep folder whose one point `a` is the session's tiny run (a symlink), with its
    plan and lock file as `deqctl sweep` leaves them."""
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "a").symlink_to(run, target_is_directory=True)
    (folder / "sweep.json").write_text(json.dumps({"points": [{"name": "a"}]}))
    (folder / ".sweep.lock").write_text("")
    return folder


def test_one_run_named_several_ways_counts_once(run, sweep, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(run, target_is_directory=True)
    for spellings in ([run, run], [run, f"{run}/", link, f"{run}/."], [sweep, sweep / "a"],
                      [sweep, run]):
        result = compare(*spellings, "--json")
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        assert len(doc["runs"]) == 1, spellings
        assert [g["n"] for g in doc["groups"]] == [1], spellings
        assert doc["runs"][0]["path"] == str(spellings[0] if spellings[0] != sweep
                                             else sweep / "a")     # the first spelling
        assert "counted once" in result.stderr


def test_no_output_lands_on_or_inside_what_compare_reads(run, sweep, tmp_path):
    before = {p: p.read_bytes() for p in (run / "metrics.jsonl", run / "recipe.yaml",
                                          sweep / "sweep.json", sweep / ".sweep.lock")}
    final = next((run / "checkpoints").iterdir())
    targets = [("--report", run / "metrics.jsonl", run), ("--plot", run / "recipe.yaml", run),
               ("--plot", final / "model.safetensors", run), ("--plot", run / "notes.png", run),
               ("--report", run / "report.md", run), ("--plot", tmp_path / "link" / "x.png", run),
               ("--report", sweep / "sweep.json", sweep), ("--plot", sweep / ".sweep.lock", sweep),
               ("--plot", sweep / "a" / "metrics.jsonl", sweep),
               ("--report", sweep / "study.md", sweep)]
    (tmp_path / "link").symlink_to(run, target_is_directory=True)
    for option, out, given in targets:
        line = one_line_exit_2(compare(given, option, out, "--force"))
        assert "--force does not apply" in line, (option, out, line)
    assert {p: p.read_bytes() for p in before} == before
    assert not (run / "notes.png").exists() and not (run / "report.md").exists()
    assert not (sweep / "study.md").exists()
    assert not list(run.glob("*curves.png")) and not list(sweep.glob("*curves.png"))
    # beside the runs, not inside them: written
    fine = compare(sweep, "--report", tmp_path / "study.md")
    assert fine.exit_code == 0, fine.output
    assert (tmp_path / "study.md").is_file() and (tmp_path / "study-curves.png").is_file()


def test_a_group_by_key_no_run_has_is_one_line(run):
    line = one_line_exit_2(compare(run, "--group-by", "deq.mod"))
    assert "'deq.mod'" in line and "deq.mode" in line       # the key it resembles
    line = one_line_exit_2(compare(run, "--group-by", "deq.mode,nothing.here"))
    assert "'nothing.here'" in line
    fine = compare(run, "--group-by", "deq.mode", "--json")
    assert fine.exit_code == 0, fine.output
    assert json.loads(fine.stdout)["groups"][0]["settings"] == {"deq.mode": "implicit"}
