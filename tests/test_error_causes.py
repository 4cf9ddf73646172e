"""Errors keep their cause (issue 31): an exception raised inside a user's code (a model
constructor, a solver, a data function) is reported as coming from that code, with its
file and line, exit 1, never as a recipe error; and DEQCTL_TRACEBACK=1 shows every
error's chain, input errors included."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import RECIPE, train
from test_open import DATA, PICARD, SMALL, readme_model

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = str(Path(RECIPE).parent / "sequential-mnist-deq.yaml")
SEQ_SMALL = ["model.d_model=16", "model.d_ff=16", "model.heads=2", "deq.forward.max_iter=8",
             "data.n=64"]


def broken(source: str, old: str, new: str) -> tuple[str, int]:
    """`source` with `old` replaced by `new`, and the line number `new` lands on."""
    assert old in source
    text = source.replace(old, new, 1)
    return text, text[: text.index(new)].count("\n") + 1


def one_line_from_user_code(result, file: Path, line: int, raised: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, result.output
    assert f"{file.name}:{line}" in lines[0] and raised in lines[0], lines[0]
    assert "user code" in lines[0] and "recipe" not in lines[0].lower(), lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("bug, raised", [
    ("nn.Linear(width, widht, bias=False)", "NameError"),
    ("nn.Linear(width, width, bias=False, colour=3)", "TypeError"),      # raised inside torch
    ("nn.Linear(int('wide'), width, bias=False)", "ValueError"),
])
def test_a_bug_in_a_user_model_constructor_is_the_users_code_not_the_recipe(tmp_path, bug, raised):
    source, line = broken(readme_model(), "nn.Linear(width, width, bias=False)", bug)
    (tmp_path / "cell.py").write_text(source)
    result = train(RECIPE, f"model.name={tmp_path / 'cell.py'}:TanhDEQ", *SMALL,
                   "--out", str(tmp_path / "run"))
    one_line_from_user_code(result, tmp_path / "cell.py", line, raised)


def test_a_user_data_function_that_raises_is_its_own_error(tmp_path):
    source, line = broken(DATA, "    rng = np.random.default_rng(seed)",
                          "    rng = np.random.default_rng({}['seed'])")
    (tmp_path / "blobs.py").write_text(source)
    result = train(SEQ, f"data.name={tmp_path / 'blobs.py'}:blobs", *SEQ_SMALL, *SMALL,
                   "--out", str(tmp_path / "run"))
    one_line_from_user_code(result, tmp_path / "blobs.py", line, "KeyError")


def test_a_user_solver_that_raises_mid_solve_names_its_line(tmp_path):
    source, line = broken(PICARD, "        z = tr.freeze(z + alpha * g, z)",
                          "        z = tr.freeze(z + alpha * g.T, z)")
    (tmp_path / "picard.py").write_text(source)
    (tmp_path / "blobs.py").write_text(DATA)
    result = train(SEQ, f"data.name={tmp_path / 'blobs.py'}:blobs",
                   f"deq.forward.solver={tmp_path / 'picard.py'}:picard", *SEQ_SMALL, *SMALL,
                   "--out", str(tmp_path / "run"))
    one_line_from_user_code(result, tmp_path / "picard.py", line, "RuntimeError")


def test_deqctl_traceback_shows_the_chain_of_an_input_error(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"")
    (ckpt / "meta.json").write_text("{not json")
    (ckpt / "recipe.yaml").write_text("{}")
    command = [sys.executable, "-m", "deqctl", "eval", str(ckpt)]
    plain = subprocess.run(command, capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.count("error:") == 1 and "meta.json is unreadable" in plain.stderr
    shown = subprocess.run(command, capture_output=True, text=True,
                           env={**__import__("os").environ, "DEQCTL_TRACEBACK": "1"})
    assert shown.returncode == 2, shown.stderr
    # the error, its traceback, and the error it came from (raised `from None` or not)
    assert "CheckpointError" in shown.stderr and "meta.json is unreadable" in shown.stderr
    assert re.search(r"ValueError: .*meta.json: not valid JSON", shown.stderr), shown.stderr
    assert shown.stderr.count("Traceback") >= 2
