"""`deqctl predict`: every input kind, bad inputs among good ones, predictions equal to
eval's and to the model's, forecasts whose time stamps continue the series."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import deqctl
from deqctl.cli import app
from deqctl.data import build_data
from deqctl.predict import continue_times
from deqctl.recipe import load

from cli_helpers import CONFIGS, RECIPE, runner

pytestmark = pytest.mark.usefixtures("one_thread")


def predict(*args: str):
    return runner.invoke(app, ["predict", *map(str, args)])


def csv_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """An image folder root/{train,test}/<digit>/NNNN.png of real digits, and the test
    pixels and labels it holds (in the folder's order)."""
    root = tmp_path_factory.mktemp("digits")
    bundle = build_data(load(RECIPE).data)
    every_class = [int((bundle.train.targets == c).nonzero()[0]) for c in range(10)]
    for part, split, picked in (("train", bundle.train, every_class),
                                ("test", bundle.test, range(40))):
        for i in picked:
            folder = root / part / str(int(split.targets[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(split.inputs[i, 0].numpy()).save(folder / f"{i:04d}.png")
    order = sorted(range(40), key=lambda i: (int(bundle.test.targets[i]), i))
    return root, bundle.test.inputs[order], bundle.test.targets[order]


def test_predict_on_a_folder_is_eval_on_it(run, digits, tmp_path):
    root, _, labels = digits
    out = tmp_path / "p.csv"
    result = predict(run, root / "test", "--out", out)
    assert result.exit_code == 0, result.output
    rows = csv_rows(out.read_text())
    assert list(rows[0])[:6] == ["input", "prediction", "probability", "nfe", "rel_residual",
                                 "converged"]
    # each row keeps its class subfolder, and names the class as training named it
    assert [r["input"].split("/")[0] for r in rows] == [str(int(y)) for y in labels]
    correct = sum(r["prediction"] == r["input"].split("/")[0] for r in rows)
    ev = runner.invoke(app, ["eval", str(run), "data.name=imagefolder", f"data.root={root}",
                             "--json"])
    assert ev.exit_code == 0, ev.output
    assert correct == round(json.loads(ev.output)["accuracy"] * len(rows))
    for r in rows:
        assert 0 < float(r["probability"]) <= 1 and int(r["nfe"]) >= 1
        assert r["converged"] in ("true", "false") and float(r["rel_residual"]) >= 0


def test_predictions_are_the_model_s(run, digits, tmp_path):
    _, pixels, _ = digits
    np.savez(tmp_path / "d.npz", x=pixels[:, 0].numpy())            # uint8 (N, H, W)
    result = predict(run, tmp_path / "d.npz", "--json", "--top-k", "3")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    model = deqctl.load(run).eval()
    with torch.inference_mode():
        probs = model(pixels.float() / 255).softmax(-1)
    top = probs.topk(3, dim=-1)
    assert [r["input"] for r in rows] == [f"{tmp_path / 'd.npz'}[{i}]" for i in range(40)]
    assert [r["prediction"] for r in rows] == [str(int(c)) for c in top.indices[:, 0]]
    assert [r["prediction_3"] for r in rows] == [str(int(c)) for c in top.indices[:, 2]]
    assert [r["probability"] for r in rows] == pytest.approx(top.values[:, 0].tolist(), abs=1e-6)


def test_bad_inputs_are_named_and_the_good_ones_written(run, digits, tmp_path):
    root, _, _ = digits
    good = sorted((root / "test").rglob("*.png"))[:3]
    photo = tmp_path / "photo.jpg"            # another size and mode: converted as training
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8)).save(photo)
    (tmp_path / "notes.png").write_text("not an image")
    os.mkfifo(tmp_path / "pipe.png")
    np.savez(tmp_path / "wrong.npz", x=np.zeros((2, 5, 5), np.uint8))
    out = tmp_path / "p.jsonl"
    result = predict(run, *good, photo, tmp_path / "notes.png", tmp_path / "pipe.png",
                     tmp_path / "missing.png", tmp_path / "wrong.npz", "--out", out)
    assert result.exit_code == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["input"] for r in rows] == [*map(str, good), str(photo)]
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 4
    for name, why in (("notes.png", "not a readable image"), ("pipe.png", "not a regular file"),
                      ("missing.png", "not found"), ("wrong.npz", "(1, 5, 5)")):
        assert any(name in s and why in s for s in skipped), (name, skipped)
    assert "4 failed" in result.stderr
    # --out exists now: never replaced without --force
    again = predict(run, *good, "--out", out)
    assert again.exit_code == 2 and "--force" in again.stderr
    assert len(out.read_text().splitlines()) == 4


def test_globs_and_overrides_after_the_run(run, digits):
    root, _, _ = digits
    result = predict(run, f"{root}/test/1/*.png", "deq.eval.max_iter=2", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows and all(r["input"].startswith(f"{root}/test/1/") for r in rows)
    assert all(r["nfe"] <= 2 for r in rows)
    assert "max_iter 2" in result.stderr
    wrong = predict(run, f"{root}/test", "optim.lr=1")
    assert wrong.exit_code == 2 and "optim.lr" in wrong.stderr


@pytest.fixture(scope="module")
def forecaster(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fc") / "run"
    result = runner.invoke(app, [
        "train", str(CONFIGS / "co2-forecast-deq.yaml"), "train.max_steps=2", "runtime.threads=1",
        "data.window=8", "data.horizon=3", "data.season=4", "data.limit_train=32",
        "data.limit_eval=16", "data.batch_size=16",
        "model={name: tcn_deq, channels: 8, head: {pool: flatten}}", "--out", str(out), "--plain"])
    assert result.exit_code == 0, result.output
    return out


def test_a_forecast_continues_the_series_time_column(forecaster, tmp_path):
    series = tmp_path / "weekly.csv"
    days = [f"2001-12-{d:02d}" for d in (1, 8, 15, 22, 29)] + ["2002-01-05", "2002-01-12",
                                                              "2002-01-19", "2002-01-26"]
    series.write_text("date,co2\n" + "".join(f"{d},{370 + i * 0.1:.1f}\n"
                                             for i, d in enumerate(days)))
    result = predict(forecaster, series)
    assert result.exit_code == 0, result.output
    rows = csv_rows(result.stdout)
    assert list(rows[0]) == ["input", "time", "co2", "nfe", "rel_residual", "converged"]
    assert [r["time"] for r in rows] == ["2002-02-02", "2002-02-09", "2002-02-16"]
    assert len({r["nfe"] for r in rows}) == 1       # one solve per input, repeated per step
    # --every: a forecast from each window; inside the series its own stamps label it
    every = csv_rows(predict(forecaster, series, "--every").stdout)
    assert len(every) == 3 * (len(days) - 8 + 1)
    assert [r["time"] for r in every[:3]] == ["2002-01-26", "2002-02-02", "2002-02-09"]
    assert every[0]["input"] == f"{series}@2002-01-19"
    short = tmp_path / "short.csv"
    short.write_text("date,co2\n2001-01-01,370\n")
    bad = predict(forecaster, short, series)
    assert bad.exit_code == 1 and "1 rows; the model reads windows of 8" in bad.stderr
    assert len(csv_rows(bad.stdout)) == 3


@pytest.mark.parametrize("stamps, expected", [
    (["19580329", "19580405"], ["19580412", "19580419"]),                      # weekly
    (["2001-01-31", "2001-02-28", "2001-03-31"], ["2001-04-30", "2001-05-31"]),  # month ends
    (["2001-01-15", "2001-02-15"], ["2001-03-15", "2001-04-15"]),               # monthly
    (["1999", "2000", "2001"], ["2002", "2003"]),                                # years
    (["1958.21", "1958.23", "1958.25"], ["1958.27", "1958.29"]),                # fractions
    (["2020-01-01T00:00:00", "2020-01-01T06:00:00"], ["2020-01-01T12:00:00",
                                                      "2020-01-01T18:00:00"]),
    (["2000-02-29", "2001-02-28"], ["2002-02-28", "2003-02-28"]),                # years
])
def test_time_stamps_continue_at_the_series_step(stamps, expected):
    assert continue_times(stamps, 2) == expected


def test_a_time_column_mixing_formats_is_refused():
    with pytest.raises(ValueError, match="mixes formats"):
        continue_times(["2001-01-01", "20010108"], 1)


def test_an_interrupted_predict_keeps_the_rows_written(run, digits, tmp_path, monkeypatch):
    from deqctl.predict import rows as predict_rows
    root, _, _ = digits
    real, calls = predict_rows.Predictor._predict, []

    def stop_at_the_third_batch(self, items):
        calls.append(len(items))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, items)

    monkeypatch.setattr(predict_rows.Predictor, "_predict", stop_at_the_third_batch)
    out = tmp_path / "p.csv"
    result = predict(run, root / "test", "data.eval_batch_size=4", "--out", out)
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert len(csv_rows(out.read_text())) == 8          # two whole batches, in place
