"""The commands on sequence checkpoints: a character language model and a forecaster
trained for two steps, then evaluated (also on another text), traced and exported."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import deqctl
from deqctl.cli import app
from deqctl.data import DataInfo

from cli_helpers import runner

CONFIGS = Path(__file__).parents[1] / "configs"
pytestmark = pytest.mark.usefixtures("one_thread")


def train_tiny(out: Path, recipe: str, *overrides: str) -> Path:
    result = runner.invoke(app, ["train", str(CONFIGS / recipe), "train.max_steps=2",
                                 "train.log_every=1", "runtime.threads=1", *overrides,
                                 "--out", str(out), "--plain"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("lm") / "run", "shakespeare-deq.yaml",
                      "data.seq_len=32", "data.limit_train=64", "data.limit_eval=16",
                      "data.batch_size=32", "data.eval_batch_size=16",
                      "model={name: transformer_deq, d_model: 16, heads: 2, d_ff: 32}")


@pytest.fixture(scope="module")
def forecast_run(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("fc") / "run", "co2-forecast-deq.yaml",
                      "data.limit_train=64", "data.limit_eval=32", "data.batch_size=32",
                      "model={name: tcn_deq, channels: 8, head: {pool: flatten}}")


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_language_model_rows_carry_bpc_and_ppl(lm_run):
    train, test = [r for r in rows(lm_run) if r["split"] == "train"], rows(lm_run)[-1]
    assert [r["step"] for r in train] == [1, 2] and test["split"] == "test"
    for r in (*train, test):
        assert r["bpc"] == pytest.approx(r["loss"] / 0.6931471805599453)
        assert r["ppl"] == pytest.approx(2.718281828459045 ** r["loss"], rel=1e-6)
        assert r["fwd_nfe"] >= 1 and "accuracy" not in r


def test_forecast_rows_carry_errors_and_baselines(forecast_run):
    test = rows(forecast_run)[-1]
    for key in ("mae", "rmse", "mase", "naive_mae", "naive_rmse", "snaive_mae", "snaive_rmse"):
        assert test[key] > 0, key
    assert test["mase"] == pytest.approx(test["mae"] / test["snaive_mae"])
    assert test["rmse"] >= test["mae"]


def test_a_checkpoint_alone_carries_vocabulary_and_scaling(lm_run, forecast_run):
    meta = json.loads((lm_run / "checkpoints" / "final" / "meta.json").read_text())
    info = DataInfo.from_dict(meta["data_info"])
    assert info.vocab is not None and len(info.vocab) == 76 and info.tokenizer == "char"
    meta = json.loads((forecast_run / "checkpoints" / "final" / "meta.json").read_text())
    info = DataInfo.from_dict(meta["data_info"])
    assert info.target_std[0] > 1 and 300 < info.mean[0] < 400 and info.season == 52
    model = deqctl.load(forecast_run)
    x = torch.full((2, 104, 1), 350.0)
    with torch.no_grad():
        y = model(x)
    # data in ppm in, forecasts in ppm out: a flat window continues near its level
    assert y.shape == (2, 52, 1) and (y - 350.0).abs().max() < 50


def test_eval_on_another_text_reports_unknown_characters(lm_run, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("To be, or not to be: that is the question. ~~~ 12345 \u00e9\u00e9\n" * 4)
    result = runner.invoke(app, ["eval", str(lm_run), "data.name=text",
                                 f"data.files.test={other}", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    # '~' and 'é' never occur in the plays; digits 1-5 do
    assert got["data"]["unknown_tokens"] == {"test": 20}
    assert got["bpc"] > 0 and got["n"] >= 1
    human = runner.invoke(app, ["eval", str(lm_run), "data.name=text", f"data.files.test={other}"])
    assert human.exit_code == 0 and "20 character(s) of the test text" in human.stdout
    assert "bpc" in human.stdout and "ppl" in human.stdout


def test_eval_forecast_json(forecast_run):
    result = runner.invoke(app, ["eval", str(forecast_run), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    final = rows(forecast_run)[-1]
    for key in ("mae", "rmse", "mase", "naive_mae", "snaive_mae"):
        assert got[key] == pytest.approx(final[key], rel=1e-5), key
    assert got["data"]["gaps_interpolated"] == {"train": 59, "val": 0, "test": 0}


@pytest.mark.parametrize("which", ["lm_run", "forecast_run"])
def test_solve_trace_on_sequence_models(which, request, tmp_path):
    run = request.getfixturevalue(which)
    result = runner.invoke(app, ["solve-trace", str(run), "--batch", "4", "--backward",
                                 "--power-iters", "8", "--json", str(tmp_path / "t.json")])
    assert result.exit_code == 0, result.output
    assert "spectral radius of df/dz" in result.stdout and "adjoint" in result.stdout
    report = json.loads((tmp_path / "t.json").read_text())
    assert set(report["solvers"]) == {"anderson", "broyden", "fixed_point"}
    assert report["backward"]["solvers"]["anderson"]["nfe"] >= 1


def test_lm_exports_with_a_dynamic_sequence_length(lm_run, tmp_path):
    out = tmp_path / "lm.pt2"
    result = runner.invoke(app, ["export", str(lm_run), "--format", "pt2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "dynamic batch and length" in result.stdout and "parity ok" in result.stdout
    program = torch.export.load(str(out)).module()
    model = deqctl.load(lm_run)
    x = torch.randint(0, 77, (3, 20))            # another batch size and length than trained
    with torch.no_grad():
        assert program(x).shape == (3, 20, 77)
        assert (program(x).argmax(-1) == model(x).argmax(-1)).float().mean() > 0.95


def test_forecaster_exports_to_onnx_with_parity(forecast_run, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    out = tmp_path / "fc.onnx"
    result = runner.invoke(app, ["export", str(forecast_run), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    m = re.search(r"predictions agree ([\d.]+)%", result.stdout)
    assert m and float(m.group(1)) >= 99
    assert "dynamic batch" in result.stdout and "and length" not in result.stdout   # a fixed window
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    inp, outp = session.get_inputs()[0], session.get_outputs()[0]
    assert (inp.name, outp.name) == ("series", "forecast")
    x = torch.linspace(340, 360, 104).view(1, 104, 1).repeat(2, 1, 1)
    got = torch.from_numpy(session.run(None, {"series": x.numpy()})[0])
    with torch.no_grad():
        want = deqctl.load(forecast_run)(x)
    assert torch.allclose(got, want, atol=0.05 * float(want.abs().max()))


@pytest.mark.parametrize("args, needle", [
    (["data.name=text"], "data.files.test: required"),
    (["data.name=text", "data.files.test=/nope.txt"], "data.files.test: /nope.txt not found"),
    (["data.tokenizer=byte"], "trained with 'char', not 'byte'"),
    (["data.seq_len=16"], "does not fit a model trained on shakespeare (shape (16,) vs (32,))"),
])
def test_bad_eval_data_exits_2_with_one_line(lm_run, args, needle):
    result = runner.invoke(app, ["eval", str(lm_run), *args])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("overrides, needle", [
    (["data.name=csv", "data.path=/nope.csv", "data.columns=co2"], "data.path: /nope.csv not found"),
    (["data.window=10"], "data.window: 10 is shorter than data.season 52"),
    (["model={name: resnet_deq}"], "model.name=resnet_deq takes image inputs"),
])
def test_bad_forecast_recipes_exit_2(tmp_path, overrides, needle):
    result = runner.invoke(app, ["train", str(CONFIGS / "co2-forecast-deq.yaml"), *overrides,
                                 "--out", str(tmp_path / "r"), "--plain"])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output


def test_the_sequence_recipe_trains_on_any_npz_by_data_overrides_alone(tmp_path):
    import numpy as np
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12, 3)).astype(np.float32)
    y = (x[:, :, 0].mean(1) > 0).astype(np.int64)           # a learnable label
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=x[:10], y_test=y[:10])
    run = train_tiny(tmp_path / "r", "sequential-mnist-deq.yaml", "data.name=npz",
                     f"data.path={tmp_path / 'd.npz'}", "data.augment=false", "data.batch_size=20",
                     "model.d_model=16", "model.d_ff=32")
    final = rows(run)[-1]
    assert final["split"] == "test" and 0 <= final["accuracy"] <= 1 and final["n"] == 10


def test_the_forecast_recipe_trains_on_any_csv_by_data_overrides_alone(tmp_path):
    lines = ["when,load,temp"] + [f"2020-01-{1 + i % 28:02d}T{i // 28:02d}:00,{i % 7},{20 + i % 5}"
                                  for i in range(120)]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    run = train_tiny(tmp_path / "r", "co2-forecast-deq.yaml", "data.name=csv",
                     f"data.path={tmp_path / 'm.csv'}", "data.time_column=when",
                     "data.columns=[load,temp]", "data.window=14", "data.horizon=7",
                     "data.season=7", "model.d_model=8", "model.heads=2", "model.d_ff=16")
    final = rows(run)[-1]
    assert {"mae", "mase", "snaive_mae"} <= set(final)
    meta = json.loads((run / "checkpoints" / "final" / "meta.json").read_text())
    assert meta["data_info"]["columns"] == ["load", "temp"]
    assert meta["data_info"]["target_shape"] == [7, 2]


def test_a_long_series_is_read_in_patches_and_exports_at_its_length(tmp_path):
    """The recipe's patch: auto on 70 steps: 3 per token (24 tokens); the model runs at
    other lengths, and exports at its data's length with parity."""
    import numpy as np
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 70, 2)).astype(np.float32)
    y = (x[:, :35, 0].mean(1) > x[:, 35:, 0].mean(1)).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=x[:10], y_test=y[:10])
    run = train_tiny(tmp_path / "r", "sequential-mnist-deq.yaml", "data.name=npz",
                     f"data.path={tmp_path / 'd.npz'}", "data.batch_size=20",
                     "model.d_model=16", "model.d_ff=32")
    model = deqctl.load(run)
    assert model.reader.patch == 3 and model.inject(torch.from_numpy(x[:2])).shape[1] == 24
    with torch.no_grad():
        assert model(torch.randn(3, 50, 2)).shape == (3, 2)
    out = tmp_path / "m.pt2"
    result = runner.invoke(app, ["export", str(run), "--format", "pt2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "parity ok" in result.stdout and "dynamic batch and length" not in result.stdout
    program = torch.export.load(str(out)).module()
    other = torch.randn(5, 70, 2)
    with torch.no_grad():
        assert torch.allclose(program(other), model(other), atol=1e-3)
