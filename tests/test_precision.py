"""Mixed precision and compile on the CPU (issue 10): fp16 with a gradient scaler that
resumes bit-exactly, bf16, and a compiled cell whose checkpoints load without compile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deqctl.cli import app

from cli_helpers import RECIPE, runner, tiny, train

TINY = tiny(train=128, eval=64, iters=8)

pytestmark = pytest.mark.usefixtures("one_thread")


def losses(run: Path) -> dict[tuple[str, int], float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["split"], r["step"]): r["loss"] for r in rows}


def test_fp16_trains_with_a_scaler_and_resumes_bit_exactly(tmp_path):
    run = tmp_path / "fp16"
    result = train(RECIPE, *TINY, "runtime.precision=fp16", "train.max_steps=4",
                   "train.save_every=2", "--out", str(run))
    assert result.exit_code == 0, result.output
    trainer = json.loads((run / "checkpoints" / "step-000002" / "trainer.json").read_text())
    assert trainer["scaler"]["scale"] > 0
    got = losses(run)
    assert all(v == v for v in got.values())          # finite (JSON null would be None)
    again = tmp_path / "again"
    result = train("--resume", str(run / "checkpoints" / "step-000002"), "--out", str(again))
    assert result.exit_code == 0, result.output
    assert losses(again) == {k: v for k, v in got.items() if k[1] > 2}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_evaluation_of_an_fp32_model(tmp_path, precision):
    run = tmp_path / "fp32"
    assert train(RECIPE, *TINY, "train.max_steps=1", "--out", str(run)).exit_code == 0
    result = runner.invoke(app, ["eval", str(run), f"runtime.precision={precision}", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["loss"] is not None and 0 < got["fwd_rel_residual"] < 1


def test_a_compiled_cell_trains_like_the_eager_one_and_loads_without_compile(tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    for run, extra in ((eager, []), (compiled, ["runtime.compile=true"])):
        result = train(RECIPE, *TINY, "train.max_steps=2", *extra, "--out", str(run))
        assert result.exit_code == 0, result.output
    a, b = losses(eager), losses(compiled)
    assert a.keys() == b.keys()
    assert all(b[k] == pytest.approx(a[k], rel=1e-4) for k in a)
    result = runner.invoke(app, ["eval", str(compiled), "--json"])   # no compile here
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["loss"] == pytest.approx(b[("test", 2)], rel=1e-5)
