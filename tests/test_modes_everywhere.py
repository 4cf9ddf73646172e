"""Every documented mode works everywhere (hostile test): solve-trace on a baseline and on an
explicit twin, trained or from the recipe; solve-trace RECIPE names the user code it
imports; generate at temperatures that underflow, into a pipe its reader closes, and to a
terminal that cannot show every character."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deqctl import recipe as recipes
from deqctl.cli import app
from deqctl.data import DataInfo
from deqctl.implicit import SolveSpec
from deqctl.inspect import spectral_radius, trace_model
from deqctl.inspect.gradaudit import audit_gradient
from deqctl.models import build_model
from deqctl.predict.generate import Sampler
from deqctl.tasks import task_for

from cli_helpers import CONFIGS, RECIPE, runner, tiny, train
from test_hostile import one_line_exit_2
from test_open import readme_model

pytestmark = pytest.mark.usefixtures("one_thread")
MODES = {"baseline": ["deq.baseline.width=8"], "unrolled": ["deq.unrolled.depth=4"]}
# the recipe form: an untrained model on a few samples
FROM_RECIPE = ["model.channels=8", "model.inner_channels=16", "data.limit_train=64",
               "data.limit_eval=64", "runtime.threads=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A 2-step tiny run of the default recipe in each explicit mode."""
    out = {}
    for mode, extra in MODES.items():
        path = tmp_path_factory.mktemp(mode) / "run"
        result = train(RECIPE, *tiny(), "train.max_steps=2", f"deq.mode={mode}", *extra,
                       "--out", str(path))
        assert result.exit_code == 0, result.output
        out[mode] = path
    return out


def source(runs: dict[str, Path], mode: str, form: str) -> list[str]:
    """solve-trace's arguments for `mode` as a trained run or as an untrained recipe."""
    if form == "run":
        return [str(runs[mode])]
    return [RECIPE, *FROM_RECIPE, f"deq.mode={mode}", *MODES[mode]]


def solve_trace(*args: str):
    return runner.invoke(app, ["solve-trace", *map(str, args), "--batch", "8"])


# --- solve-trace on an explicit baseline -------------------------------------------------


@pytest.mark.parametrize("form", ["run", "recipe"])
def test_solve_trace_on_a_baseline_says_what_applies_in_one_line(runs, form, tmp_path):
    out = tmp_path / "t.json"
    result = solve_trace(*source(runs, "baseline", form), "--json", out)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    said = [line for line in lines if "explicit baseline" in line]
    assert len(said) == 1, result.stdout
    for words in ("explicit baseline CNNBaseline", "one evaluation", "8 samples",
                  "no fixed point", "no spectral radius"):
        assert words in said[0], said[0]
    assert "spectral radius of df/dz" not in result.stdout and "Traceback" not in result.output
    got = json.loads(out.read_text())
    assert got["mode"] == "baseline" and got["nfe"] == 1 and got["batch"] == 8
    assert got["solvers"] == {} and got["spectral_radius"] is None
    assert got["untrained"] is (form == "recipe")


@pytest.mark.parametrize("args, option", [
    (["--solvers", "anderson"], "--solvers"), (["--starts", "3"], "--starts"),
    (["--grad"], "--grad"), (["--min-cos", "0.9"], "--min-cos"),
    (["--backward"], "--backward"), (["--plot", "{tmp}/p.png"], "--plot"),
    (["--max-iter", "5"], "--max-iter"), (["--tol", "1e-3"], "--tol"),
    (["--power-iters", "10"], "--power-iters"),
])
def test_a_baseline_refuses_in_one_line_what_only_a_solve_has(runs, args, option, tmp_path):
    args = [a.format(tmp=tmp_path) for a in args]
    error = one_line_exit_2(solve_trace(runs["baseline"], *args))
    assert option in error and "deq.mode=baseline" in error and "no fixed point" in error
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("form", ["run", "recipe"])
def test_a_baseline_refuses_every_solve_option_it_was_given_at_once(runs, form):
    error = one_line_exit_2(solve_trace(*source(runs, "baseline", form), "--starts", "2",
                                        "--grad", "--solvers", "anderson"))
    assert "--solvers, --starts, --grad:" in error and "deq.mode=baseline" in error


def test_the_spectral_radius_of_a_map_that_ignores_z_is_zero():
    u = torch.randn(3, 5)
    for f in (lambda z: u, lambda z: u * 2 + 0 * z.sum(), lambda z: u.requires_grad_()):
        assert torch.equal(spectral_radius(f, torch.zeros(3, 5)), torch.zeros(3))
    for mode in ("vjp", "jvp"):
        assert torch.equal(spectral_radius(lambda z: u, torch.zeros(3, 5), mode=mode),
                           torch.zeros(3))


def test_the_library_traces_a_baseline_as_one_evaluation_at_radius_zero():
    info = DataInfo(name="i", task="classify", inputs="image", shape=(1, 8, 8), num_classes=3,
                    mean=(0.5,), std=(0.25,))
    recipe = recipes.validate({"deq": {"mode": "baseline", "baseline": {"width": 6}}})
    torch.manual_seed(0)
    model, task = build_model(recipe, info), task_for(info)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    specs = [SolveSpec(s, max_iter=10, tol=1e-3) for s in ("anderson", "fixed_point")]
    report = trace_model(model, task, x, y, specs, power_iters=4)
    assert {t.nfe for t in report.forward.values()} == {1}
    assert torch.equal(report.spectral_radius, torch.zeros(4))
    with pytest.raises(ValueError, match="deq.mode=baseline: .* no implicit gradient"):
        audit_gradient(model, task, x, y)


# --- solve-trace on the explicit twin ----------------------------------------------------


@pytest.mark.parametrize("form", ["run", "recipe"])
def test_the_twin_says_what_answers_and_traces_its_cell_with_every_option(runs, form,
                                                                          tmp_path):
    plot, out = tmp_path / "t.png", tmp_path / "t.json"
    result = solve_trace(*source(runs, "unrolled", form), "--starts", "2", "--grad",
                         "--backward", "--solvers", "anderson,fixed_point", "--plot", plot,
                         "--json", out)
    assert result.exit_code == 0, result.output
    assert ("explicit twin, depth 4: it answers with 4 applications of its cell; the traces "
            "solve that cell to its fixed point") in result.stdout
    assert "spectral radius of df/dz" in result.stdout and "unrolled (4 steps)" in result.stdout
    got = json.loads(out.read_text())
    assert got["mode"] == "unrolled" and set(got["solvers"]) == {"anderson", "fixed_point"}
    assert got["spectral_radius"] > 0 and got["starts"]["starts"] == 2
    for name in ("t.png", "t-backward.png", "t-starts.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


# --- solve-trace RECIPE names the user code it imports -----------------------------------


def test_solve_trace_of_a_recipe_says_the_user_code_it_imported(tmp_path):
    model = tmp_path / "tanh_deq.py"
    model.write_text(readme_model())
    result = solve_trace(RECIPE, f"model.name={model}:TanhDEQ", "model.width=16",
                         "data.limit_train=64", "data.limit_eval=64", "--solvers", "anderson")
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"user code: model.name={model}:TanhDEQ imported from {model} "
                            f"(sha256 "), result.stdout
    trained = train(RECIPE, f"model.name={model}:TanhDEQ", "model.width=16",
                    "data.limit_train=32", "data.limit_eval=32", "data.batch_size=32",
                    "runtime.threads=1", "train.max_steps=1", "--out", str(tmp_path / "run"))
    assert trained.output.splitlines()[0] == first          # the very line train says


# --- generate: underflowing temperatures, closed pipes, narrow encodings -------------------


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    """A byte-level language model trained 2 steps: its text is full of bytes >= 128."""
    out = tmp_path_factory.mktemp("lm") / "run"
    result = train(str(CONFIGS / "shakespeare-deq.yaml"), "train.max_steps=2",
                   "data.seq_len=16", "data.tokenizer=byte", "data.limit_train=64",
                   "data.limit_eval=16", "data.batch_size=32", "data.eval_batch_size=16",
                   "runtime.threads=1", "runtime.precision=fp32",
                   "model={name: transformer_deq, d_model: 16, heads: 2, d_ff: 32}",
                   "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def generated(lm: Path, *args: str) -> list[int]:
    result = runner.invoke(app, ["generate", str(lm), "--prompt", "ROMEO:", "--tokens", "24",
                                 "--json", *args])
    assert result.exit_code == 0, result.output
    return [t["id"] for t in json.loads(result.stdout)["tokens"]]


@pytest.mark.parametrize("temperature", ["1e-39", "5e-324", "1e-30"])
def test_a_temperature_that_underflows_is_greedy(lm, temperature):
    assert generated(lm, "--temperature", temperature) == generated(lm, "--greedy")


def test_a_sampler_at_an_underflowing_temperature_takes_the_most_likely_token():
    logits = torch.tensor([-3.0, 2.5, 2.0, -1.0])
    for t in (1e-39, 1e-45, 5e-324):
        assert Sampler(temperature=t)(logits) == 1
        assert Sampler(temperature=t, top_k=2)(logits) == 1
    assert Sampler(temperature=1e-39)(-logits.abs() - 1) == 3      # every logit negative


def deqctl(*args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deqctl", *args], env=env or ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_generate_into_a_pipe_its_reader_closes_ends_quietly(lm):
    """`deqctl generate RUN | head -c 10`: no error, no traceback, exit 0."""
    proc = deqctl("generate", str(lm), "--prompt", "ROMEO: hello", "--tokens", "5000")
    assert proc.stdout.read(10) == b"ROMEO: hel"
    proc.stdout.close()                              # head has what it wanted
    try:
        code = proc.wait(timeout=60)                  # not the 5000 tokens: it stops
    finally:
        proc.kill()
    err = proc.stderr.read().decode()
    assert code == 0, err
    assert "Error" not in err and "Traceback" not in err and "Exception" not in err, err


@pytest.mark.parametrize("encoding", ["ascii", None])
def test_generate_to_a_terminal_that_cannot_show_every_character(lm, encoding):
    """LC_ALL=C, with stdout ascii (PYTHONIOENCODING=ascii) or left to Python: characters
    the stream cannot encode are replaced, never an error."""
    env = {k: v for k, v in ENV.items() if k not in ("PYTHONIOENCODING", "PYTHONUTF8")}
    env.update(LC_ALL="C", LANG="C", **({"PYTHONIOENCODING": encoding} if encoding else {}))
    proc = deqctl("generate", str(lm), "--prompt", "Ωmega ROMEO:", "--tokens", "40",
                  "--temperature", "2", env=env)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert b"Error" not in err and b"Traceback" not in err, err.decode()
    text = out.decode("ascii" if encoding else "utf-8")    # strict: nothing half-written
    assert text.startswith("?mega ROMEO:" if encoding else "Ωmega ROMEO:"), text
    assert len(text) > len("Ωmega ROMEO:") + 10 and text.endswith("\n")
    if encoding:
        assert text.count("?") > 1                  # the model's own bytes >= 128 too
