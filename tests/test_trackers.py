"""Experiment trackers (log.mlflow, log.wandb): each logs the scalars metrics.jsonl holds,
offline; a resumed run continues its tracker run; a sweep's runs are one experiment; a
missing package or a failing tracker is one line."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from deqctl.cli import app
from deqctl.engine import trackers
from deqctl.inspect.groups import group_runs

from cli_helpers import RECIPE, rows, runner, tiny, train

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = ["train.max_steps=3", "train.eval_every_epoch=false"]


def _series(run: Path, split: str, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows(run) if r["split"] == split]


def _mlflow(tmp_path: Path):
    mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed "
                                 "(pip install 'deqctl[mlflow]')")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return mlflow.MlflowClient(tracking_uri=uri), uri


def test_mlflow_logs_the_rows_and_a_resume_continues_its_run(tmp_path):
    client, uri = _mlflow(tmp_path)
    run = tmp_path / "r"
    done = train(RECIPE, *tiny(), *STEPS, "log.mlflow=true", f"log.mlflow_uri={uri}",
                 "log.group=study", "--out", str(run))
    assert done.exit_code == 0, done.output
    exp = client.get_experiment_by_name("study")
    (logged,) = client.search_runs([exp.experiment_id])
    assert logged.info.run_name == "r" and logged.info.status == "FINISHED"
    assert logged.data.params["optim.lr"] == str(yaml.safe_load(
        (run / "recipe.yaml").read_text())["optim"]["lr"])

    def history(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(logged.info.run_id, key)]
    for split, key in [("train", "loss"), ("train", "grad_norm"), ("test", "accuracy"),
                       ("test", "fwd_nfe")]:
        assert history(f"{split}/{key}") == _series(run, split, key), key

    more = runner.invoke(app, ["train", "--resume", str(run / "checkpoints" / "final"),
                               "train.max_steps=5", "--plain"])
    assert more.exit_code == 0, more.output
    (again,) = client.search_runs([exp.experiment_id])      # the same run, continued
    assert again.info.run_id == logged.info.run_id and again.info.status == "FINISHED"
    assert [s for s, _ in history("train/loss")] == [1, 2, 3, 4, 5]
    assert history("train/loss") == _series(run, "train", "loss")


def _wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (.wandb): a 7-byte header, then LevelDB-style
    32 KiB blocks of chunks (crc32, length, type) that join into protobuf Records."""
    pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    data, pos, block, out, parts = path.read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - (pos % block) < 7:             # a block's tail too short for a header
            pos += block - (pos % block)
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):          # still being written
            break
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):                        # full, or the last part of one
            record = pb.Record()
            record.ParseFromString(parts)
            out.append(record)
            parts = b""
    return out


def test_wandb_offline_logs_the_rows_against_deqctls_step(tmp_path):
    pytest.importorskip("wandb", reason="the wandb extra is not installed "
                        "(pip install 'deqctl[wandb]')")
    run = tmp_path / "r"
    done = train(RECIPE, *tiny(), *STEPS, "log.wandb=true", "log.group=study", "--out", str(run))
    assert done.exit_code == 0, done.output
    (log,) = run.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.time() + 30      # wandb-core, its own process, may still be writing
    records = _wandb_records(log)
    while not any(r.WhichOneof("record_type") == "exit" for r in records) \
            and time.time() < deadline:
        time.sleep(0.2)
        records = _wandb_records(log)
    (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert info.display_name == "r" and info.run_group == "study" and info.project == "deqctl"
    assert info.run_id == json.loads((run / "trackers.json").read_text())["wandb"]["id"]
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    for split, key in [("train", "loss"), ("test", "accuracy")]:
        got = [(h["step"], h[f"{split}/{key}"]) for h in history if f"{split}/{key}" in h]
        assert got == _series(run, split, key), key


def test_a_sweeps_runs_are_one_mlflow_experiment(tmp_path):
    client, uri = _mlflow(tmp_path)
    out = tmp_path / "lrs"
    done = runner.invoke(app, ["sweep", RECIPE, *tiny(), *STEPS, "log.mlflow=true",
                               f"log.mlflow_uri={uri}", "optim.lr=1e-3,2e-3", "--out",
                               str(out), "--plain"])
    assert done.exit_code == 0, done.output
    exp = client.get_experiment_by_name("lrs")
    names = {r.info.run_name for r in client.search_runs([exp.experiment_id])}
    assert names == {"lr=1e-3", "lr=2e-3"}


def test_a_missing_tracker_package_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)          # import wandb -> ImportError
    done = train(RECIPE, *tiny(), *STEPS, "log.wandb=true", "--out", str(tmp_path / "r"))
    assert done.exit_code == 2
    assert "log.wandb: needs the wandb package (pip install 'deqctl[wandb]')" in done.output
    assert not (tmp_path / "r").exists()


class _Flaky:
    key, extra = "log.mlflow", "mlflow"

    def __init__(self, *args):
        self.ids, self.rows = {"run_id": "x"}, []

    def write(self, row):
        if len(self.rows) == 1:
            raise ConnectionError("store went away")
        self.rows.append(row)

    def close(self, status):
        self.closed = status


def test_a_tracker_failing_mid_run_is_dropped_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(trackers, "TRACKERS", {"mlflow": _Flaky})
    warnings: list[str] = []
    t = trackers.Trackers(SimpleNamespace(mlflow=True), tmp_path, {}, None, warnings.append)
    (_, flaky), = t.live
    for step in (1, 2, 3):
        t.write({"step": step, "split": "train", "loss": 1.0})
    assert len(flaky.rows) == 1 and t.live == []
    assert warnings == ["mlflow: stopped logging (ConnectionError: store went away); "
                        "metrics.jsonl keeps every row"]
    assert json.loads((tmp_path / "trackers.json").read_text()) == {"mlflow": {"run_id": "x"}}


def test_a_tracker_that_cannot_start_is_a_tracker_error(tmp_path, monkeypatch):
    class Refusing(_Flaky):
        def __init__(self, *args):
            raise PermissionError("read-only store")
    monkeypatch.setattr(trackers, "TRACKERS", {"mlflow": Refusing})
    with pytest.raises(trackers.TrackerError, match=r"^log.mlflow: cannot start "
                       r"\(PermissionError: read-only store\); nothing was trained"):
        trackers.Trackers(SimpleNamespace(mlflow=True), tmp_path, {}, None, print)


def test_where_runs_log_to_never_splits_a_group():
    runs = [SimpleNamespace(settings={"seed": s, "log.group": g, "log.mlflow": m, "optim.lr": 1e-3})
            for s, g, m in [(0, "a", True), (1, "b", False)]]
    (group,) = group_runs(runs)
    assert len(group.runs) == 2
