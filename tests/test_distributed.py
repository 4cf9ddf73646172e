"""`torchrun -m deqctl train` (issue 10): two CPU processes (gloo) against one process with
the same global batch, resume across ranks, and a signal reaching the ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from deqctl.cli import app

from cli_helpers import RECIPE, rows, runner, wait_for_rows

# No Jacobian regulariser: its probe vectors are random, and the ranks draw their own.
COMMON = ["model.channels=8", "model.inner_channels=16", "data.limit_train=128",
          "data.limit_eval=64", "data.batch_size=32", "data.eval_batch_size=32",
          "train.log_every=1", "deq.forward.max_iter=8", "deq.backward.max_iter=8",
          "deq.eval.max_iter=8", "deq.jacobian_reg.weight=0", "runtime.threads=1", "--plain"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(procs: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={procs}"]


def deqctl(*args, procs: int = 1, **kw):
    launcher = torchrun(procs) if procs > 1 else [sys.executable]
    return subprocess.run([*launcher, "-m", "deqctl", *args], capture_output=True, text=True,
                          env=ENV, timeout=300, **kw)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    done = deqctl("train", RECIPE, *COMMON, "train.max_steps=6", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_two_processes_train_like_one_with_the_same_global_batch(single, tmp_path):
    out = tmp_path / "two"
    done = deqctl("train", RECIPE, *COMMON, "train.max_steps=6", "--out", str(out), procs=2)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("done: 6 steps") == 1          # rank 0 speaks for both
    one, two = rows(single), rows(out)
    assert [(r["split"], r["step"]) for r in two] == [(r["split"], r["step"]) for r in one]
    for a, b in zip(one, two):
        assert b["n"] == a["n"]                              # statistics of the global batch
        for key in ("loss", "fwd_nfe", "fwd_rel_residual", "accuracy"):
            assert b[key] == pytest.approx(a[key], rel=2e-4, abs=1e-6), (a["step"], key)


def test_a_signal_stops_every_rank_and_the_run_resumes(single, tmp_path):
    out = tmp_path / "two"
    proc = subprocess.Popen([*torchrun(), "-m", "deqctl", "train", RECIPE, *COMMON,
                             "train.max_steps=6", "--out", str(out)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_rows(proc, out, timeout=180)
    proc.send_signal(signal.SIGTERM)       # torchrun passes it on to both ranks
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0
    stopped = json.loads((out / "checkpoints" / "interrupted" / "meta.json").read_text())["step"]
    assert 2 <= stopped < 6, output
    done = deqctl("train", "--resume", str(out), "--plain", procs=2)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (out / ".lock").exists()
    got = {(r["split"], r["step"]): r["loss"] for r in rows(out)}
    ref = {(r["split"], r["step"]): r["loss"] for r in rows(single)}
    assert got.keys() == ref.keys()
    assert all(got[k] == pytest.approx(ref[k], rel=2e-4) for k in got)


def test_rank_0_holds_the_run_while_the_ranks_train(tmp_path):
    out = tmp_path / "two"
    proc = subprocess.Popen([*torchrun(), "-m", "deqctl", "train", RECIPE, *COMMON,
                             "train.max_steps=400", "--out", str(out)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_rows(proc, out, timeout=180)
        holder = json.loads((out / ".lock").read_text())
        assert holder["pid"] != proc.pid             # a rank, not the launcher
        again = runner.invoke(app, ["train", RECIPE, *COMMON, "--out", str(out)])
        assert again.exit_code == 2 and f"being written by pid {holder['pid']}" in again.output
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=180)
    assert not (out / ".lock").exists()
