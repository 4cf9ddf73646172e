"""The test-time compute benchmark (bench/test_time.py, issue 32 item 4): its figures are
compare's estimates over seeds, "rises" is the paired gain per seed, the answers name a
model only at >= 95%, and its smoke mode trains all three models and evaluates the twin at
each test-time depth rather than its recipe's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import test_time  # noqa: E402

KS = [40, 80, 160]


def result(solved: dict[str, dict[int, dict[int, float]]]) -> dict:
    paths = {s: {"prediction_agreement": 1.0, "unique": 0.5, "converged": 1.0} for s in (0, 1, 2)}
    out = {"title": "t", "iters": KS,
           "splits": {"data.test_length=64": {m: test_time.summarise(v, KS, paths)
                                              for m, v in solved.items()}}}
    out["answers"] = test_time.answers(out)
    return out


RISING = {40: {0: 0.0, 1: 0.01, 2: 0.0}, 80: {0: 0.9, 1: 0.95, 2: 1.0},
          160: {0: 0.97, 1: 1.0, 2: 0.99}}
FLAT = {k: {0: 0.0, 1: 0.0, 2: 0.0} for k in KS}
NOISY = {40: {0: 0.2, 1: 0.3, 2: 0.1}, 80: {0: 0.25, 1: 0.2, 2: 0.1},
         160: {0: 0.3, 1: 0.1, 2: 0.15}}


def test_figures_are_compares_estimates_and_the_gain_is_paired_by_seed():
    s = test_time.summarise(RISING, KS, {0: {"prediction_agreement": 1.0, "unique": 1.0,
                                              "converged": 1.0}})
    assert s["by_iters"]["80"]["mean"] == pytest.approx(0.95)
    low, high = s["by_iters"]["160"]["ci95"]
    assert low < 0.9867 < high and high <= 1.0             # cut to [0, 1] as compare does
    assert s["gain"]["mean"] == pytest.approx((0.97 + 0.99 + 0.99) / 3)
    assert s["gain"]["n"] == 3 and s["rises"] == "rises"
    all_or_nothing = {40: {0: 0.0, 1: 0.02, 2: 0.0}, 80: {0: 1.0, 1: 1.0, 2: 1.0}}
    assert test_time.summarise(all_or_nothing, [40, 80], {})["gain"]["ci95"][1] == 1.0
    assert (s["best_iters"], s["best"]["mean"]) == (160, pytest.approx(0.9867, abs=1e-4))
    assert s["starts_unique"]["mean"] == 1.0 and s["starts_unique"]["n"] == 1


def test_rises_says_only_what_the_seeds_show():
    assert test_time.summarise(FLAT, KS, {})["rises"] == "flat"
    assert test_time.summarise(NOISY, KS, {})["rises"] == "not shown at this n"
    falling = {40: RISING[160], 80: RISING[80], 160: RISING[40]}
    assert test_time.summarise(falling, KS, {})["rises"] == "falls"


def test_the_answers_name_a_model_only_at_95_percent_and_the_table_has_every_model():
    out = result({"deq": RISING, "recurrent": NOISY, "twin": FLAT})
    assert "deq rises" in out["answers"][0] and "twin flat" in out["answers"][0]
    assert "deq (98.7% [" in out["answers"][1] and "at k=160" in out["answers"][1]
    assert "twin" not in out["answers"][1] and "recurrent" not in out["answers"][1]
    below = result({"deq": {k: {0: 0.94, 1: 0.94, 2: 0.94} for k in KS}})
    assert below["answers"][1].endswith("no model.")
    head, rows = test_time.table(out)
    assert head[2:5] == ["k=40", "k=80", "k=160"]
    assert [r[1] for r in rows] == ["deq", "recurrent", "twin"]
    assert rows[0][0] == "test_length=64" and rows[2][2] == "0.0% [0.0, 0.0]"
    md = test_time.markdown(out)
    assert md.count("\n| test_length=64 | ") == 3


def test_harder_splits():
    assert test_time.harder_splits("data.test_length=64,128") == [
        ["data.test_length=64"], ["data.test_length=128"]]
    assert test_time.harder_splits("") == [[]]
    with pytest.raises(SystemExit, match="--harder"):
        test_time.harder_splits("deq.eval.max_iter=80")


@pytest.mark.slow
def test_smoke_trains_every_model_and_evaluates_the_twin_at_each_depth(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / "test_time.py"), "--smoke",
                           "--dir", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads((tmp_path / "test_time.json").read_text())
    assert out["depth"] == 4 and out["iters"] == [4, 8]
    models = out["splits"]["data.test_length=12"]
    assert list(models) == ["deq", "recurrent", "twin"]
    for s in models.values():
        assert all(0.0 <= s["by_iters"][k]["mean"] <= 1.0 and s["by_iters"][k]["n"] == 2
                   for k in ("4", "8"))
        assert s["starts_prediction_agreement"]["n"] == 2
    # the twin trained at depth 4 was applied 8 times at k=8, not its recipe's 4
    twin = [json.loads(p.read_text()) for p in (tmp_path / "evals").glob("mode=unrolled*")]
    assert len(twin) == 2 and all([r["fwd_nfe"] for r in rows] == [4, 8] for rows in twin)
    assert (tmp_path / "test_time.md").read_text().count("| test_length=12 |") == 3
    assert "Test-time compute" in done.stdout
