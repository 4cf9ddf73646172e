"""Your own model, solver and data by import path or entry point (issue 16): the README's
model through every command, a user solver and data function, option errors, trust, and
the changed-source warning."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import deqctl
from deqctl import recipe as recipes
from deqctl.cli import app

from cli_helpers import RECIPE, rows, runner, train, wait_for_rows

README = Path(__file__).parents[1] / "README.md"
SMALL = ["train.max_steps=4", "data.limit_train=96", "data.limit_eval=64", "data.batch_size=32",
         "data.eval_batch_size=64", "train.log_every=1", "runtime.threads=1"]
PICARD = '''
def picard(tr, z, *, alpha: float = 0.5):
    """Damped iteration, written against the tracker contract."""
    while True:
        fz, g = tr.evaluate(z)
        if tr.finished():
            return
        z = tr.freeze(z + alpha * g, z)
        (z,) = tr.compact_state(z)
'''
DATA = '''
import numpy as np


def blobs(n: int = 96, dim: int = 6, seed: int = 0):
    """Two Gaussian blobs as sequences of length 4: the arrays an npz would hold."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 2 * n)
    x = rng.normal(size=(2 * n, 4, dim)).astype(np.float32) + 2.0 * y[:, None, None]
    return {"x": x[:n], "y": y[:n], "x_test": x[n:], "y_test": y[n:]}
'''
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")


def readme_model() -> str:
    section = README.read_text().split("## Your own model, solver and data", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    """A folder with the README's model, a solver and a data function in it."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "tanh_deq.py").write_text(readme_model())
    (folder / "picard.py").write_text(PICARD)
    (folder / "blobs.py").write_text(DATA)
    return folder


@pytest.fixture(scope="module")
def trained(user) -> Path:
    out = user / "runs" / "tanh"
    result = train(RECIPE, f"model.name={user / 'tanh_deq.py'}:TanhDEQ", "model.width=32",
                   *SMALL, "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_the_readme_model_is_at_most_30_lines():
    lines = [line for line in readme_model().strip().splitlines()]
    assert len(lines) <= 30


def test_the_readme_model_trains_and_says_it_imported_user_code(trained, user):
    first = train(RECIPE, f"model.name={user / 'tanh_deq.py'}:TanhDEQ", *SMALL,
                  "--out", str(user / "runs" / "again"))
    assert first.output.splitlines()[0].startswith(
        f"user code: model.name={user / 'tanh_deq.py'}:TanhDEQ imported from "
        f"{user / 'tanh_deq.py'} (sha256 ")
    meta = json.loads((trained / "checkpoints" / "final" / "meta.json").read_text())
    record = meta["code"]["model.name"]
    assert record["path"] == str(user / "tanh_deq.py") and len(record["sha256"]) == 64
    assert [r["step"] for r in rows(trained) if r["split"] == "train"] == [1, 2, 3, 4]


def test_opening_a_run_of_user_code_needs_trust(trained, user):
    """Without --trust-code nothing is imported: the file below would leave a mark."""
    marked = user / "marked.py"
    marked.write_text(readme_model() + "\nopen(__file__ + '.imported', 'w').close()\n")
    run = user / "runs" / "marked"
    shutil.copytree(trained, run)
    for ckpt in (run / "checkpoints").iterdir():
        recipe = (ckpt / "recipe.yaml").read_text().replace("tanh_deq.py", "marked.py")
        (ckpt / "recipe.yaml").write_text(recipe)
    for command in (["eval", str(run)], ["solve-trace", str(run)],
                    ["export", str(run), "--format", "pt2", "--out", str(user / "m.pt2")],
                    ["train", "--resume", str(run), "train.max_steps=6"]):
        done = subprocess.run([sys.executable, "-m", "deqctl", *command], capture_output=True,
                              text=True, env=ENV, timeout=120)
        assert done.returncode == 2, (command, done.stderr)
        assert "is user code" in done.stderr and "--trust-code" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert not (user / "marked.py.imported").exists(), command
    with pytest.raises(deqctl.CheckpointError, match="trust_code=True"):
        deqctl.load(run)
    assert not (user / "marked.py.imported").exists()
    assert runner.invoke(app, ["compare", str(run), "--json"]).exit_code == 0   # reads only


def test_a_trusted_user_model_evaluates_traces_exports_and_loads(trained, user):
    result = runner.invoke(app, ["eval", str(trained), "--trust-code", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] > 0.1
    result = runner.invoke(app, ["solve-trace", str(trained), "--trust-code", "--batch", "8"])
    assert result.exit_code == 0 and "spectral radius of df/dz" in result.output
    out = user / "tanh.pt2"
    result = runner.invoke(app, ["export", str(trained), "--format", "pt2", "--out", str(out),
                                 "--trust-code"])
    assert result.exit_code == 0 and "parity ok" in result.output, result.output
    exported = torch.export.load(str(out)).module()       # runs without the user's code
    model = deqctl.load(trained, trust_code=True)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert (exported(x).argmax(1) == model(x).argmax(1)).all()


def test_the_unrolled_twin_of_a_user_model(user):
    out = user / "runs" / "twin"
    result = train(RECIPE, f"model.name={user / 'tanh_deq.py'}:TanhDEQ", "deq.mode=unrolled",
                   "deq.unrolled.depth=5", *SMALL, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert {r["fwd_nfe"] for r in rows(out) if r["split"] == "train"} == {5.0}


def test_a_relative_path_is_found_beside_the_recipe_first(user, tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(user / "tanh_deq.py", folder / "cell.py")
    recipe = folder / "r.yaml"
    recipe.write_text("model: {name: ./cell.py:TanhDEQ, width: 16}\n")
    monkeypatch.chdir(tmp_path)                     # elsewhere: found beside the recipe
    r = recipes.load(recipe)
    assert r.part("model").path == (folder / "cell.py").resolve() and r.model.width == 16


def test_a_user_solver_and_data_function_train_like_built_ins(user):
    out = user / "runs" / "picard"
    seq = str(Path(RECIPE).parent / "sequential-mnist-deq.yaml")
    result = train(seq, f"data.name={user / 'blobs.py'}:blobs", "data.n=64",
                   f"deq.forward.solver={user / 'picard.py'}:picard",
                   "deq.forward.picard.alpha=0.7", "model.d_model=16", "model.d_ff=16",
                   "model.heads=2", "deq.forward.max_iter=8", *SMALL, "--out", str(out))
    assert result.exit_code == 0, result.output
    train_rows = [r for r in rows(out) if r["split"] == "train"]
    assert all(1 <= r["fwd_nfe"] <= 8 and r["fwd_nfe_max"] <= 8 for r in train_rows)
    assert {"fwd_rel_residual", "fwd_converged", "bwd_nfe"} <= train_rows[-1].keys()
    stored = (out / "recipe.yaml").read_text()
    assert "picard:\n      alpha: 0.7" in stored and "n: 64" in stored
    result = runner.invoke(app, ["eval", str(out), "--trust-code", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["solver"]["solver"].endswith("picard.py:picard")


@pytest.mark.parametrize("override, says", [
    ("model.colour=3", "model.colour: unknown key (valid for model.name={m}: name, width)"),
    ("model.width=many", "model.width: Input should be a valid integer"),
    ("model.width=true", "model.width: expected an integer, got true"),
    ("deq.forward.picard.beta=1", "deq.forward.picard.beta: unknown key (valid: alpha)"),
    ("deq.forward.picard.alpha=fast", "deq.forward.picard.alpha: Input should be a valid number"),
    ("data.seed=x", "data.seed: Input should be a valid integer"),
    ("data.size=3", "data.size: unknown key (valid for data.name={d}: name, batch_size"),
])
def test_option_errors_of_user_parts_name_the_key(user, override, says):
    m, d = f"{user / 'tanh_deq.py'}:TanhDEQ", f"{user / 'blobs.py'}:blobs"
    base = [f"model.name={m}", f"deq.forward.solver={user / 'picard.py'}:picard"]
    if override.startswith("data."):
        base = [f"data.name={d}", f"deq.forward.solver={user / 'picard.py'}:picard"]
    with pytest.raises(recipes.RecipeError) as err:
        recipes.load(RECIPE, [*base, override])
    assert says.format(m=m, d=d) in str(err.value)


def test_a_missing_required_option_is_named(user, tmp_path):
    (tmp_path / "needs.py").write_text(readme_model().replace("width: int = 64", "width: int"))
    with pytest.raises(recipes.RecipeError, match="model.width: required"):
        recipes.load(RECIPE, [f"model.name={tmp_path / 'needs.py'}:TanhDEQ"])
    (tmp_path / "notamodel.py").write_text("class Thing:\n    pass\n")
    with pytest.raises(recipes.RecipeError, match="a model is a subclass of deqctl.DEQModel"):
        recipes.load(RECIPE, [f"model.name={tmp_path / 'notamodel.py'}:Thing"])
    with pytest.raises(recipes.RecipeError, match=r"nope.py: no such file"):
        recipes.load(RECIPE, ["model.name=./nope.py:Thing"])


def test_an_installed_package_registers_a_model_by_name(user, tmp_path, monkeypatch):
    package = tmp_path / "site" / "mycells"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(readme_model())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    real = importlib.metadata.entry_points

    def entry_points(**kw):
        if kw.get("group") == "deqctl.models":
            return [importlib.metadata.EntryPoint("tanh", "mycells:TanhDEQ", "deqctl.models")]
        return real(**kw)
    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    r = recipes.load(RECIPE, ["model.name=tanh", "model.width=8"])
    assert r.part("model").origin == "entry point" and not r.user_code()
    with pytest.raises(recipes.RecipeError, match=r"valid: mdeq, (\w+, )*tcn_deq, "
                                                  r"transformer_deq, tanh"):
        recipes.load(RECIPE, ["model.name=tanhh"])
    out = tmp_path / "run"
    assert train(RECIPE, "model.name=tanh", *SMALL, "--out", str(out)).exit_code == 0
    result = runner.invoke(app, ["eval", str(out), "--json"])        # no --trust-code needed
    assert result.exit_code == 0, result.output


def test_a_changed_source_warns_in_one_line(trained, user, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    original = (user / "tanh_deq.py").read_text()
    try:
        (user / "tanh_deq.py").write_text(original + "\n# edited after training\n")
        result = runner.invoke(app, ["eval", str(copy), "--trust-code", "--json"])
        assert result.exit_code == 0, result.output
        lines = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        assert len(lines) == 1 and "has changed since the run was trained" in lines[0]
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            deqctl.load(copy, trust_code=True)
        assert any("has changed" in str(w.message) for w in seen)
    finally:
        (user / "tanh_deq.py").write_text(original)


def test_a_user_model_resumes_after_sigterm_bit_exactly(trained, user, tmp_path):
    out = tmp_path / "run"
    model = f"model.name={user / 'tanh_deq.py'}:TanhDEQ"
    args = [RECIPE, model, "model.width=32", *SMALL, "train.max_steps=40", "train.save_every=5"]
    proc = subprocess.Popen([sys.executable, "-m", "deqctl", "train", *args, "--out", str(out),
                             "--plain"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)
    wait_for_rows(proc, out, n=8)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output
    result = train("--resume", str(out), "--trust-code")
    assert result.exit_code == 0, result.output
    reference = tmp_path / "reference"
    assert train(*args, "--out", str(reference)).exit_code == 0
    got = {(r["split"], r["step"]): r["loss"] for r in rows(out)}
    assert got == {(r["split"], r["step"]): r["loss"] for r in rows(reference)}


def test_a_user_model_trains_under_torchrun(user, tmp_path):
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"]
    done = subprocess.run([*launcher, "-m", "deqctl", "train", RECIPE,
                           f"model.name={user / 'tanh_deq.py'}:TanhDEQ", "model.width=16",
                           "deq.jacobian_reg.weight=0", *SMALL, "--out", str(out), "--plain"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("done: 4 steps") == 1


def test_a_built_in_s_import_path_is_the_same_model_with_the_same_options():
    r = recipes.load(RECIPE, ["model.name=deqctl.models.image:ResNetDEQ"])
    default = recipes.load(RECIPE)
    assert r.part("model").obj is default.part("model").obj
    from deqctl.models import options_of
    assert options_of(r.model) == options_of(default.model)
    assert options_of(r.model)["init_std"] == 0.01             # the recipe's, not the default
    other = recipes.load(RECIPE, ["model.name=mdeq"])           # a real switch drops them
    assert options_of(other.model).get("init_std") != 0.01
