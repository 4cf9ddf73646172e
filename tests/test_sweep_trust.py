"""`deqctl sweep` against a folder it did not fill itself (the hostile-test issue): a point
folder holding someone else's run is neither imported, resumed nor counted; the user code a
sweep imports is its own recipe's (or --trust-code); --print-commands keeps stdout to the
commands; values that fold to one folder name still get a folder each; a FIFO or device
named as the recipe, and --out inside a run, are refused at once; a half-written point is
moved aside once, never while a live process still writes it."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deqctl.cli import app
from deqctl.sweep import make_plan

from cli_helpers import RECIPE, rows, runner, tiny

TINY = [o for o in tiny() if not o.startswith("runtime.threads")]
DATA = [o for o in TINY if not o.startswith("model.")]       # for a user model
STEPS = ["train.max_steps=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
MODEL = '''
import math

import torch
from torch import nn

import deqctl


class TanhDEQ(deqctl.DEQModel):
    inputs, tasks = ("image",), ("classify",)

    def __init__(self, info: deqctl.DataInfo, deq: deqctl.DEQ, width: int = 16):
        super().__init__(info, deq)
        self.U = nn.Linear(math.prod(info.shape), width)
        self.W = nn.utils.parametrizations.spectral_norm(nn.Linear(width, width, bias=False))
        self.head = nn.Linear(width, info.num_classes)

    def inject(self, x):
        return self.U(x.flatten(1))

    def cell(self, z, u):
        return torch.tanh(self.W(z) + u)

    def decode(self, z, x):
        return self.head(z)
'''
MARK = "\nopen(__file__ + '.imported', 'w').close()\n"       # proof of an import


def sweep(*args: str, base: list[str] = TINY):
    return runner.invoke(app, ["sweep", RECIPE, *base, *STEPS, *map(str, args), "--plain"])


def train(*args: str, base: list[str] = TINY):
    return runner.invoke(app, ["train", RECIPE, *base, *STEPS, *map(str, args), "--plain"])


def one_error_exit_2(result) -> str:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return result.stderr


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its content's hash: what 'left alone' means."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def unfinish(run: Path) -> None:
    """Make a finished run one interrupted during its final evaluation: resuming it runs
    only that evaluation (a resume of a few seconds)."""
    final = run / "checkpoints" / "final"
    meta = json.loads((final / "meta.json").read_text())
    del meta["metrics"]
    (final / "meta.json").write_text(json.dumps(meta))
    trainer = json.loads((final / "trainer.json").read_text())
    trainer["state"]["logged"].remove("test")
    (final / "trainer.json").write_text(json.dumps(trainer))
    kept = [line for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] != "test"]
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))


def rename_code(run: Path, old: Path, new: Path) -> None:
    """Make `run` name `new` wherever it named `old`: its recipes and code records."""
    for path in [run / "recipe.yaml", *run.glob("checkpoints/*/recipe.yaml"),
                 *run.glob("checkpoints/*/meta.json")]:
        path.write_text(path.read_text().replace(old.name, new.name))


# --- 1. trust: a point folder holding another run ------------------------------------------


def test_a_received_point_naming_other_user_code_is_refused_and_not_imported(tmp_path):
    """Someone's interrupted run in a point folder, naming evil.py: not imported, not
    resumed, not counted, nothing run, the folder left as it was; --trust-code does not
    make it the planned point either."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "good.py").write_text(MODEL)
    (user / "evil.py").write_text(MODEL + MARK)
    out = tmp_path / "s"
    assert sweep("optim.lr=1e-3,2e-3", "--out", out, "--print-commands").exit_code == 0
    point = out / "lr=1e-3"
    done = train(f"model.name={user / 'good.py'}:TanhDEQ", "optim.lr=1e-3", "--out", point,
                 base=DATA)
    assert done.exit_code == 0, done.output
    rename_code(point, user / "good.py", user / "evil.py")
    unfinish(point)
    before = snapshot(out)
    for extra in ([], ["--trust-code"]):
        result = sweep("optim.lr=1e-3,2e-3", "--out", out, *extra)
        err = one_error_exit_2(result)
        assert "lr=1e-3: " in err and "evil.py:TanhDEQ" in err and "user code" in err, err
        assert "lr=2e-3" not in err and "nothing was run" in err
        assert not (user / "evil.py.imported").exists()
        assert snapshot(out) == before and not (out / "lr=2e-3").exists()
        assert "resuming" not in result.output and "finished" not in result.stdout


def test_a_point_holding_another_recipe_is_not_counted_finished(tmp_path):
    """A finished run of other settings in a point folder is not that point: refused,
    naming what differs (not log.group: the sweep's label, which a renamed sweep folder
    changes); not counted, nothing run, nothing moved."""
    out = tmp_path / "s"
    assert sweep("--out", out, "--print-commands").exit_code == 0       # one point: run
    done = train("optim.lr=5e-3", 'log.group="elsewhere"', "--out", out / "run")
    assert done.exit_code == 0, done.output
    before = snapshot(out)
    err = one_error_exit_2(sweep("--out", out))
    assert "run: " in err and "(optim.lr differ)" in err and "nothing was run" in err, err
    assert snapshot(out) == before
    assert json.loads((out / "sweep.json").read_text())["points"][0]["status"] == "pending"


def test_the_sweeps_own_user_code_resumes_without_trust_code(tmp_path):
    """A point of the sweep's own recipe naming user code: resumed (its code is the one
    the user chose) without --trust-code, and only then is --trust-code passed on."""
    (tmp_path / "good.py").write_text(MODEL)
    model = f"model.name={tmp_path / 'good.py'}:TanhDEQ"
    out = tmp_path / "s"
    result = sweep(model, "--out", out, "--print-commands", base=DATA)
    assert result.exit_code == 0, result.output
    done = runner.invoke(app, [*shlex.split(result.stdout.splitlines()[0])[1:], "--plain"])
    assert done.exit_code == 0, done.output
    unfinish(out / "run")
    again = sweep(model, "--out", out, base=DATA)
    assert again.exit_code == 0, again.output
    assert "resuming" in again.output and "1 finished" in again.output
    log = (out / "logs" / "run.log").read_text()
    assert f"deqctl train --resume {out / 'run'} --trust-code" in log
    # a sweep naming no user code resumes without it
    plain = tmp_path / "p"
    assert sweep("--out", plain, "--print-commands").exit_code == 0
    assert train('log.group="p"', "--out", plain / "run").exit_code == 0
    unfinish(plain / "run")
    assert sweep("--out", plain).exit_code == 0
    log = (plain / "logs" / "run.log").read_text()
    assert "--resume" in log and "--trust-code" not in log


def test_user_code_recorded_elsewhere_needs_trust_code(tmp_path, monkeypatch):
    """A point run with the planned recipe but whose checkpoint recorded its user code
    elsewhere (a sweep folder from another machine): a resume looks for good.py there
    first and would import that file, so only with --trust-code."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.py").write_text(MODEL)
    elsewhere = tmp_path / "theirs"
    elsewhere.mkdir()
    (elsewhere / "good.py").write_text(MODEL + MARK)
    model = "model.name=good.py:TanhDEQ"
    out = tmp_path / "s"
    result = sweep(model, "--out", out, "--print-commands", base=DATA)
    assert runner.invoke(app, [*shlex.split(result.stdout.splitlines()[0])[1:],
                               "--plain"]).exit_code == 0
    unfinish(out / "run")
    meta_path = out / "run" / "checkpoints" / "final" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["code"]["model.name"]["path"] = str(elsewhere / "good.py")
    meta_path.write_text(json.dumps(meta))
    before = snapshot(out)
    err = one_error_exit_2(sweep(model, "--out", out, base=DATA))
    assert "run: " in err and "user code model.name from '" in err, err
    assert "--trust-code" in err and "nothing was run" in err
    assert snapshot(out) == before and not (elsewhere / "good.py.imported").exists()
    trusted = sweep(model, "--out", out, "--trust-code", base=DATA)
    assert trusted.exit_code == 0 and "1 finished" in trusted.output, trusted.output
    assert (elsewhere / "good.py.imported").exists()        # what --trust-code accepted


# --- 1b. --print-commands: stdout is the commands ----------------------------------------


def test_print_commands_says_user_code_on_stderr_and_nothing_else_on_stdout(tmp_path):
    loud = tmp_path / "loud.py"
    loud.write_text(MODEL + "\nprint('hello from loud.py')\n")
    result = sweep(f"model.name={loud}:TanhDEQ", "model.width=8,16", "--out", tmp_path / "s",
                   "--print-commands", base=DATA)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("deqctl train ") for line in lines), lines
    said = [line for line in result.stderr.splitlines() if line.startswith("user code: ")]
    assert said == [f"user code: model.name={loud}:TanhDEQ imported from {loud} (sha256 "
                    f"{hashlib.sha256(loud.read_bytes()).hexdigest()[:12]})"]
    assert "hello from loud.py" in result.stderr


# --- 2. one folder per point ------------------------------------------------------------


@pytest.mark.parametrize("values", ["a/b,a:b", "\u00e9,\u00fc", "..,.", "A,a",
                                    "x" * 250 + "1," + "x" * 250 + "2"])
def test_values_folding_to_one_name_still_get_a_folder_each(tmp_path, values):
    out = tmp_path / "s"
    result = sweep(f"log.group={values}", "--out", out, "--print-commands")
    assert result.exit_code == 0, result.output
    folders = [shlex.split(line)[-1] for line in result.stdout.splitlines()]
    assert len(folders) == 2 and len({f.lower() for f in folders}) == 2, folders
    assert all(len(Path(f).name) <= 200 and Path(f).parent == out for f in folders)
    names = [p["name"] for p in json.loads((out / "sweep.json").read_text())["points"]]
    assert [str(out / n) for n in names] == folders
    again = sweep(f"log.group={values}", "--out", out, "--print-commands")
    assert again.stdout == result.stdout                   # stable: the same sweep again


def test_names_that_were_safe_and_unique_stay_as_they_were():
    plan = make_plan(RECIPE, ["optim.lr=1e-3,3e-3", "data.columns=[a,b],[c]"], [0])
    assert [p.name for p in plan.points] == [
        "lr=1e-3_columns=-a-b-_seed=0", "lr=1e-3_columns=-c-_seed=0",
        "lr=3e-3_columns=-a-b-_seed=0", "lr=3e-3_columns=-c-_seed=0"]
    clash = make_plan(RECIPE, ["log.group=a/b,a:b,c"], None)
    assert clash.points[2].name == "log.group=c"         # unique: as before
    assert clash.points[0].name != clash.points[1].name
    assert all(p.name.startswith("log.group=a-b-") for p in clash.points[:2])


# --- 3. a recipe that is no regular file -----------------------------------------------


def test_a_fifo_or_device_named_as_the_recipe_is_refused_at_once(tmp_path):
    """Refused by the recipe files' one rule, at once: a hang on the FIFO or a runaway read
    of /dev/zero would be the timeout."""
    fifo = tmp_path / "FIFO.yaml"
    os.mkfifo(fifo)
    for recipe in (str(fifo), "/dev/zero"):
        done = subprocess.run([sys.executable, "-m", "deqctl", "sweep", recipe, "optim.lr=1,2",
                               "--out", str(tmp_path / "s"), "--plain"], capture_output=True,
                              text=True, env=ENV, timeout=60)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines() == [
            f"error: {recipe}: not a regular file (a FIFO, device or socket)"], done.stderr
        assert not (tmp_path / "s").exists()


# --- 4. --out inside a run --------------------------------------------------------------


def test_out_inside_a_run_is_refused(run):
    before = snapshot(run)
    for out in (run / "sub", run, run / "checkpoints" / "final" / "x"):
        err = one_error_exit_2(sweep("optim.lr=1e-3,2e-3", "--out", out, "--print-commands"))
        assert f"--out {out}: inside the run {run};" in err, err
    assert snapshot(run) == before and not (run / "sub").exists()


# --- 5. a half-written point -----------------------------------------------------------

HOLDER = """
import os, sys, time
from pathlib import Path
from deqctl.engine.rundir import claim_new
run, said = Path(sys.argv[1]), Path(sys.argv[2])
lock = claim_new(run, "deq")
(run / "recipe.yaml").write_text("name: half\\n")      # begun: not yet a checkpoint
said.write_text("claimed")
time.sleep(3)
said.write_text("intact" if (run / ".lock").is_file() else "moved while held")
lock.release()
"""


def test_a_half_written_point_is_moved_aside_once_and_never_while_held(tmp_path):
    """A point folder with no checkpoint yet, still held by a live writer (a point of a
    sweep just killed): the sweep waits for it (saying so once), then moves it aside
    (saying so once) and trains the point afresh."""
    out = tmp_path / "s"
    assert sweep("--out", out, "--print-commands").exit_code == 0
    said = tmp_path / "holder.txt"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / "run"), str(said)],
                              env=ENV)
    try:
        deadline = time.time() + 60
        while not said.exists() and time.time() < deadline:
            time.sleep(0.05)
        result = sweep("--out", out)
    finally:
        holder.wait(timeout=60)
    assert said.read_text() == "intact"
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert sum("held no checkpoint; moved to" in n for n in notes) == 1, notes
    assert sum("waiting for" in n for n in notes) == 1, notes
    assert (out / "run.aborted").is_dir() and rows(out / "run")[-1]["split"] == "test"
