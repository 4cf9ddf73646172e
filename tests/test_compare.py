"""The explicit twin (deq.mode=unrolled), cost accounting in every row, and `deqctl compare`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deqctl import recipe as recipes
from deqctl.cli import app
from deqctl.engine.checkpoint import load_model
from deqctl.models import build_model

from cli_helpers import RECIPE, runner, tiny

TINY = [*tiny(), "train.max_steps=2"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny DEQ and its unrolled twin, 4 steps each with an evaluation after every 2."""
    base = tmp_path_factory.mktemp("pair")
    runs = []
    for name, extra in (("deq", []), ("twin", ["deq.mode=unrolled", "deq.unrolled.depth=6"])):
        out = base / name
        result = runner.invoke(app, ["train", RECIPE, *TINY, "train.max_steps=4",
                                     "data.limit_train=64", *extra, "--out", str(out), "--plain"])
        assert result.exit_code == 0, result.output
        runs.append(out)
    return runs[0], runs[1]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_every_row_carries_training_time_and_peak_memory(pair):
    for run in pair:
        metrics = rows(run)
        assert all(r["wall_s"] > 0 and r["peak_mem_mb"] >= 0 for r in metrics)
        walls = [r["wall_s"] for r in metrics]
        assert walls == sorted(walls)
        assert "eval_time_s" in metrics[-1] and metrics[-1]["split"] == "test"


def test_the_twin_logs_the_same_statistics(pair):
    deq, twin = (rows(run) for run in pair)
    keys = {k for r in deq if r["split"] == "train" for k in r}
    for r in (r for r in twin if r["split"] == "train"):
        assert keys <= set(r), keys - set(r)
        assert r["fwd_nfe"] == r["fwd_nfe_max"] == 6 and r["bwd_nfe"] == 6
        assert r["fwd_rel_residual"] > 0


def test_a_deq_checkpoint_loads_into_its_twin(pair):
    model, recipe, meta = load_model(pair[0])
    twin_recipe = recipes.validate({**recipe.model_dump(mode="json"),
                                    "deq": {**recipe.deq.model_dump(mode="json"), "mode": "unrolled"}})
    twin = build_model(twin_recipe, model.info)
    twin.load_state_dict(model.state_dict(), strict=True)       # shape for shape
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert twin.eval()(x).shape == model(x).shape


def test_compare_table_json_and_plot(pair, tmp_path):
    png = tmp_path / "cmp.png"
    result = runner.invoke(app, ["compare", *map(str, pair), "--plot", str(png),
                                 "--target", "accuracy=0.0"])
    assert result.exit_code == 0, result.output
    for text in ("deq", "twin", "implicit", "unrolled", "to accuracy=0", "peak MB", "test conv"):
        assert text in result.stdout, text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = runner.invoke(app, ["compare", *map(str, pair), "--json", "--target", "accuracy=0.0"])
    doc = json.loads(out.stdout)
    assert doc["task"] == "classify" and doc["metric"] == "accuracy" and doc["higher_is_better"]
    deq, twin = doc["runs"]
    assert (deq["mode"], twin["mode"]) == ("implicit", "unrolled")
    assert deq["steps"] == twin["steps"] == 4 and deq["target_step"] == 2
    assert deq["final"] == rows(pair[0])[-1]["accuracy"]
    assert deq["wall_s"] == max(r["wall_s"] for r in rows(pair[0]))
    assert twin["fwd_nfe"] == 6


def test_compare_refuses_other_tasks_and_bad_targets(pair, tmp_path):
    other = tmp_path / "lm"
    lm = str(Path(__file__).parents[1] / "configs" / "shakespeare-deq.yaml")
    result = runner.invoke(app, ["train", lm, "train.max_steps=1", "data.seq_len=16",
                                 "data.limit_train=32", "data.limit_eval=8", "data.batch_size=32",
                                 "model={name: tcn_deq, channels: 8}", "runtime.precision=fp32",
                                 "runtime.threads=1", "--out", str(other), "--plain"])
    assert result.exit_code == 0, result.output
    refused = runner.invoke(app, ["compare", str(pair[0]), str(other)])
    assert refused.exit_code == 2
    assert "runs of different tasks cannot be compared (deq: classify, lm: lm)" in refused.stderr
    for bad, needle in (("bpc=2", "'bpc' is not a metric of classify runs"),
                        ("accuracy", "expected METRIC=VALUE")):
        result = runner.invoke(app, ["compare", *map(str, pair), "--target", bad])
        assert result.exit_code == 2 and needle in result.stderr
    missing = runner.invoke(app, ["compare", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no such run directory" in missing.stderr


def test_mdeq_trains_evaluates_traces_and_exports(tmp_path):
    out = tmp_path / "mdeq"
    result = runner.invoke(app, ["train", RECIPE, *TINY, "model={name: mdeq, channels: [4, 8], "
                                 "init_std: 0.01}", "--out", str(out), "--plain"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["eval", str(out), "--json"]).exit_code == 0
    traced = runner.invoke(app, ["solve-trace", str(out), "--batch", "4", "--power-iters", "8"])
    assert traced.exit_code == 0 and "spectral radius" in traced.stdout
    exported = runner.invoke(app, ["export", str(out), "--format", "pt2", "--out", str(tmp_path / "m.pt2"),
                                   "--solver", "anderson"])
    assert exported.exit_code == 0 and "parity ok" in exported.stdout, exported.output
