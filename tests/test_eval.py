"""`deqctl eval`: metrics with test-time solver settings, the anytime sweep, JSON output,
override rules; and the one place where classifiers and language models part ways."""

from __future__ import annotations

import json

import pytest

from deqctl.cli import app
from deqctl.inspect import check_overrides
from deqctl.recipe import RecipeError

from cli_helpers import runner

JSON_KEYS = {"split", "loss", "accuracy", "fwd_nfe", "fwd_nfe_max", "fwd_abs_residual",
             "fwd_rel_residual", "fwd_converged", "samples_per_s"}


pytestmark = pytest.mark.usefixtures("one_thread")


def eval_json(*args: str) -> dict:
    result = runner.invoke(app, ["eval", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)       # fails unless stdout is exactly one JSON value


def test_json_keys_and_values_match_the_training_evaluation(run):
    got = eval_json(str(run))
    assert JSON_KEYS <= set(got), JSON_KEYS - set(got)
    assert got["split"] == "test" and got["n"] == 64
    assert got["solver"] == {"solver": "anderson", "max_iter": 50, "tol": 1e-3, "stop_mode": "rel"}
    # same checkpoint, data and eval settings as train's final evaluation -> same numbers
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["split"] == "test"
    for key in ("loss", "accuracy", "fwd_nfe", "fwd_rel_residual", "fwd_converged"):
        assert got[key] == pytest.approx(final[key], rel=1e-5, abs=1e-7), key
    assert got["fwd_converged"] == 1.0 and got["fwd_rel_residual"] <= 1e-3
    assert 1 < got["fwd_nfe"] <= got["fwd_nfe_max"] <= 50
    assert 0.0 <= got["accuracy"] <= 1.0 and got["samples_per_s"] > 0


def test_eval_overrides_change_the_test_time_solve(run):
    loose = eval_json(str(run), "deq.eval.solver=fixed_point", "deq.eval.tol=1e-2")
    tight = eval_json(str(run), "deq.eval.solver=fixed_point", "deq.eval.tol=1e-4",
                      "deq.eval.max_iter=100")
    assert loose["solver"]["solver"] == tight["solver"]["solver"] == "fixed_point"
    assert loose["fwd_rel_residual"] <= 1e-2 and tight["fwd_rel_residual"] <= 1e-4
    assert loose["fwd_nfe"] < tight["fwd_nfe"] <= tight["fwd_nfe_max"] <= 100


def test_sweep_reports_metric_against_nfe_in_the_given_order(run):
    got = eval_json(str(run), "--sweep-iters", "4,1,2,8,64")
    sweep = got["sweep"]
    assert [r["max_iter"] for r in sweep] == [4, 1, 2, 8, 64]
    for r in sweep:
        assert {"max_iter", "fwd_nfe", "fwd_rel_residual", "accuracy", "loss"} <= set(r)
        assert r["fwd_nfe"] <= r["fwd_nfe_max"] <= r["max_iter"]
    by_iter = sorted(sweep, key=lambda r: r["max_iter"])
    nfe = [r["fwd_nfe"] for r in by_iter]
    assert nfe[:4] == [1, 2, 4, 8]             # too few iterations to reach tol: all used
    assert nfe == sorted(nfe) and nfe[-1] < 64  # and with room to spare, it stops at tol
    res = [r["fwd_rel_residual"] for r in by_iter]
    assert res[-1] <= 1e-3 < res[0] and res[-1] < res[2]
    assert by_iter[-1]["fwd_converged"] == 1.0 and by_iter[0]["fwd_converged"] == 0.0


def test_human_output_shows_metrics_table(run):
    result = runner.invoke(app, ["eval", str(run)])
    assert result.exit_code == 0, result.output
    for text in ("64 samples", "accuracy", "fwd NFE", "converged", "anderson"):
        assert text in result.stdout, text
    sweep = runner.invoke(app, ["eval", str(run), "--sweep-iters", "1,2"])
    assert sweep.exit_code == 0 and "anytime" in sweep.stdout and "acc" in sweep.stdout


@pytest.mark.parametrize("args, needle", [
    (["model.channels=4", "optim.lr=1"], "model.channels, optim.lr"),
    (["deq.forward.tol=1e-2"], "deq.forward.tol"),
    (["--split", "val"], "no val split"),
    (["--sweep-iters", "1,x"], "--sweep-iters"),
    (["deq.eval.solver=newton"], "deq.eval.solver"),
])
def test_bad_input_exits_2_with_one_line(run, args, needle):
    result = runner.invoke(app, ["eval", str(run), *args])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and "Traceback" not in result.output


def test_missing_checkpoint_exits_2(tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such run directory" in result.stderr


def test_override_policy():
    check_overrides(["data.limit_eval=10", "deq.eval.tol=1e-4", "runtime.device=cpu"])
    with pytest.raises(RecipeError, match="deq.backward.tol"):
        check_overrides(["deq.backward.tol=1e-4"])
    with pytest.raises(RecipeError, match="dataset"):   # a prefix is not a section
        check_overrides(["dataset=x"])


def test_data_that_does_not_fit_the_model_is_refused(run):
    result = runner.invoke(app, ["eval", str(run), "data.name=sequential-mnist"])
    assert result.exit_code == 2
    assert "does not fit a model trained on mnist-5k" in result.stderr
    assert "inputs 'sequence' vs 'image'" in result.stderr


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    from cli_helpers import RECIPE, tiny, train
    out = tmp_path_factory.mktemp("twin") / "run"
    done = train(RECIPE, *tiny(), "deq.mode=unrolled", "deq.unrolled.depth=3",
                 "train.max_steps=2", "--out", str(out))
    assert done.exit_code == 0, done.output
    return out


def test_a_twin_sweeps_test_time_depth_applying_its_cell_k_times(twin):
    plain = eval_json(str(twin))
    assert plain["fwd_nfe"] == 3                       # its own depth without a sweep
    sweep = eval_json(str(twin), "--sweep-iters", "1,3,7")["sweep"]
    assert [r["fwd_nfe"] for r in sweep] == [1, 3, 7]
    assert sweep[1]["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert eval_json(str(twin))["fwd_nfe"] == 3        # and its depth is its own again


def test_a_baseline_refuses_an_iteration_sweep_in_one_line(tmp_path):
    from cli_helpers import RECIPE, tiny, train
    done = train(RECIPE, *tiny(), "deq.mode=baseline", "train.max_steps=1",
                 "--out", str(tmp_path / "b"))
    assert done.exit_code == 0, done.output
    got = runner.invoke(app, ["eval", str(tmp_path / "b"), "--sweep-iters", "1,2"])
    assert got.exit_code == 2 and "--sweep-iters" in got.output
    assert len(got.output.strip().splitlines()) == 1
