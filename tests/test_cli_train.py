"""`deqctl train` end to end on the embedded data: files, keys, reload, resume, errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deqctl.cli import app
from deqctl.data import build_data, iterate_batches
from deqctl.engine.checkpoint import load_model

from cli_helpers import RECIPE, rows, runner, tiny, train

ROOT = Path(__file__).parents[1]
TINY = tiny(train=192, eval=64, iters=8)
REQUIRED = {"step", "epoch", "split", "loss", "lr", "fwd_nfe", "fwd_nfe_max",
            "fwd_abs_residual", "fwd_rel_residual", "fwd_rel_residual_max", "fwd_converged",
            "bwd_nfe", "bwd_rel_residual", "step_time_s", "samples_per_s", "accuracy"}
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    result = train(RECIPE, *TINY, "train.max_steps=6", "train.save_every=3", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_writes_recipe_metrics_and_checkpoints(run):
    assert (run / "recipe.yaml").is_file()
    metrics = rows(run)
    train_rows = [r for r in metrics if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    for r in train_rows:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert 1 <= r["fwd_nfe"] <= r["fwd_nfe_max"] <= 8
        assert 0 <= r["fwd_converged"] <= 1 and r["bwd_nfe"] >= 1
    test_rows = [r for r in metrics if r["split"] == "test"]
    assert test_rows and test_rows[-1]["step"] == 6 and 0 <= test_rows[-1]["accuracy"] <= 1
    for name in ("final", "step-000003", "step-000006"):
        assert (run / "checkpoints" / name / "model.safetensors").is_file()


def test_checkpoint_alone_rebuilds_identical_model(run, tmp_path):
    ckpt = run / "checkpoints" / "final"
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in ckpt.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    a, recipe, meta = load_model(ckpt)
    b, _, _ = load_model(moved)
    x, _ = next(iterate_batches(build_data(recipe.data).test, 16, shuffle=False))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    # and the final eval accuracy is reproduced from the checkpoint alone
    assert meta["metrics"]["accuracy"] == rows(run)[-1]["accuracy"]


def test_resume_is_bit_exact(run, tmp_path):
    out = tmp_path / "resumed"
    result = runner.invoke(app, ["train", "--resume", str(run / "checkpoints" / "step-000003"),
                                 "--out", str(out), "--plain"])
    assert result.exit_code == 0, result.output
    original = {r["step"]: r["loss"] for r in rows(run) if r["split"] == "train"}
    resumed = {r["step"]: r["loss"] for r in rows(out) if r["split"] == "train"}
    assert sorted(resumed) == [4, 5, 6]
    assert all(resumed[s] == original[s] for s in resumed)


def test_recipe_errors_exit_2_naming_the_key(tmp_path):
    result = train(RECIPE, "model.chanels=8", "data.batch_size=abc", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2
    assert "model.chanels: unknown key" in result.output and "data.batch_size" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x").exists()
    assert train(str(tmp_path / "missing.yaml")).exit_code == 2
    assert train(RECIPE, "data.name=imagenet9").exit_code == 2


def test_existing_run_dir_is_not_overwritten(run):
    before = (run / "metrics.jsonl").read_text()
    result = train(RECIPE, *TINY, "train.max_steps=1", "--out", str(run))
    assert result.exit_code == 2 and "already holds a run" in result.output
    assert (run / "metrics.jsonl").read_text() == before


def test_nonfinite_loss_stops_with_one_line_and_keeps_checkpoints(tmp_path):
    out = tmp_path / "nan"
    result = train(RECIPE, *TINY, "optim.name=sgd", "optim.lr=1e30", "train.max_steps=6",
                   "train.save_every=1", "--out", str(out))
    assert result.exit_code == 1
    assert "loss became non-finite" in result.output and "step-000001" in result.output
    assert "Traceback" not in result.output
    assert (out / "checkpoints" / "step-000001" / "model.safetensors").is_file()
    assert not (out / "checkpoints" / "final").exists()


def test_console_script_runs_as_module():
    done = subprocess.run([sys.executable, "-m", "deqctl", "train", "--help"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "RECIPE" in done.stdout


@pytest.mark.parametrize("mode,steps", [("phantom", 3), ("jfb", 1)])
def test_inexact_gradient_rows_report_their_backward_cost(tmp_path, mode, steps):
    out = tmp_path / mode
    result = train(RECIPE, *TINY, f"deq.backward.mode={mode}", "deq.backward.phantom_steps=3",
                   "deq.jacobian_reg.weight=0.1", "train.max_steps=1", "--out", str(out))
    assert result.exit_code == 0, result.output
    row = rows(out)[0]
    assert REQUIRED <= set(row), REQUIRED - set(row)
    assert row["bwd_nfe"] == steps and row["bwd_rel_residual"] is None   # nothing was solved
    assert row["jac_loss"] > 0


def test_fixed_point_cache_starts_each_example_at_its_own_last_fixed_point(tmp_path):
    """Two epochs of the tiny recipe: with deq.cache_fixed_points the second epoch's solves
    start at the first epoch's z* and take fewer iterations; the cache travels in the
    checkpoint, so a resume from the middle of epoch 2 is still bit-exact."""
    common = [RECIPE, *TINY, "train.max_steps=12", "deq.forward.tol=1e-4",
              "deq.forward.max_iter=30"]
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    assert train(*common, "--out", str(plain)).exit_code == 0
    assert train(*common, "deq.cache_fixed_points=true", "train.save_every=9",
                 "--out", str(cached)).exit_code == 0

    def epoch2_nfe(run):
        return sum(r["fwd_nfe"] for r in rows(run) if r["split"] == "train" and r["step"] > 6)
    assert epoch2_nfe(cached) < 0.8 * epoch2_nfe(plain)

    resumed = tmp_path / "resumed"
    result = train("--resume", str(cached / "checkpoints" / "step-000009"), "--out", str(resumed))
    assert result.exit_code == 0, result.output
    original = {r["step"]: r["loss"] for r in rows(cached) if r["split"] == "train"}
    again = {r["step"]: r["loss"] for r in rows(resumed) if r["split"] == "train"}
    assert sorted(again) == [10, 11, 12] and all(again[s] == original[s] for s in again)


def test_tensorboard_scalars_are_the_metrics_rows(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "tb"
    result = train(RECIPE, *TINY, "train.max_steps=3", "log.tensorboard=true", "--out", str(out))
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for row in rows(out):
        for key in ("loss", "fwd_nfe", "wall_s"):
            scalars = {e.step: e.value for e in events.Scalars(f"{row['split']}/{key}")}
            assert scalars[row["step"]] == pytest.approx(row[key], rel=1e-6)


def test_tensorboard_without_the_package_is_one_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import fails
    out = tmp_path / "tb"
    result = train(RECIPE, *TINY, "log.tensorboard=true", "--out", str(out))
    assert result.exit_code == 2 and "pip install 'deqctl[tensorboard]'" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_mixed_precision_forward_reports_its_bf16_evaluations(tmp_path):
    out = tmp_path / "bf16"
    result = train(RECIPE, *TINY, "deq.forward.bf16_until=0.1", "deq.forward.tol=1e-3",
                   "train.max_steps=1", "--out", str(out))
    assert result.exit_code == 0, result.output
    train_row = next(r for r in rows(out) if r["split"] == "train")
    assert 1 <= train_row["fwd_nfe_bf16"] < train_row["fwd_nfe_max"]


def test_evaluating_more_often_leaves_training_bit_identical(tmp_path):
    # bench/baselines.py reads accuracy at a training time from evaluations it adds: they
    # must not move training (dropout and augmentation draw from the same generator)
    seq = str(ROOT / "configs" / "sequential-mnist-deq.yaml")
    small = ["model.d_model=16", "model.heads=2", "model.d_ff=32", "data.limit_train=64",
             "data.limit_eval=32", "data.batch_size=16", "data.eval_batch_size=32",
             "train.log_every=1", "train.max_steps=4", "runtime.threads=1",
             "deq.forward.max_iter=6", "deq.backward.max_iter=6", "deq.eval.max_iter=6"]
    train_rows = []
    for every in (1, 4):
        out = tmp_path / f"every-{every}"
        result = train(seq, *small, f"train.eval_every={every}", "--out", str(out))
        assert result.exit_code == 0, result.output
        keep = ("step", "loss", "grad_norm", "fwd_rel_residual", "bwd_rel_residual")
        train_rows.append([{k: r[k] for k in keep} for r in rows(out) if r["split"] == "train"])
        assert sum(r["split"] == "test" for r in rows(out)) == 4 // every
    assert len(train_rows[0]) == 4 and train_rows[0] == train_rows[1]


def test_a_warm_started_run_resumes_bit_exactly(tmp_path):
    """deq.warm_start starts each solve from the previous batch's z*: a checkpoint keeps
    that state, so the resumed run's solves start where the uninterrupted run's did."""
    run = tmp_path / "warm"
    result = train(RECIPE, *TINY, "deq.warm_start=true", "train.max_steps=6",
                   "train.save_every=3", "--out", str(run))
    assert result.exit_code == 0, result.output
    again = tmp_path / "again"
    result = train("--resume", str(run / "checkpoints" / "step-000003"), "--out", str(again))
    assert result.exit_code == 0, result.output
    keys = ("loss", "fwd_nfe", "fwd_rel_residual", "grad_norm")
    original = {r["step"]: [r[k] for k in keys] for r in rows(run) if r["split"] == "train"}
    resumed = {r["step"]: [r[k] for k in keys] for r in rows(again) if r["split"] == "train"}
    assert resumed == {s: v for s, v in original.items() if s > 3}
