"""Resume is exact with workers (issue 30): `deqctl train` killed with SIGKILL mid-epoch,
then resumed, writes the rows and the weights of a run never killed, bit for bit: from a
token file read through numpy.memmap, and from an image folder decoded by two DataLoader
workers.

data.workers decodes images (deqctl.data.loader); token files are read in the main
process. `text` and `shakespeare` refuse the key; `hf` takes it for its image sets and
starts no worker for a text column, so a token file with data.workers=2 is an hf text set.

Each run is a subprocess started by LAUNCH: every token file is read through its memmap
(IN_MEMORY_TOKENS = 0, as for a corpus past 2M tokens), and the run stops itself
(SIGSTOP) just after the train row of a chosen step, so the test's SIGKILL lands at a known
point: mid-epoch, two steps past a mid-epoch checkpoint, its workers alive."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deqctl import recipe as recipes
from deqctl.data import build_data, iterate_batches
from deqctl.engine import checkpoint, rundir

from cli_helpers import CONFIGS, RECIPE, rows, train
from test_loader import folder

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LAUNCH = """
import os, signal, sys
from deqctl.data import tokens
from deqctl.engine import metrics
from deqctl.cli import app

tokens.IN_MEMORY_TOKENS = 0
pause, write = int(sys.argv[1]), metrics.JsonlSink.write

def write_then_pause(self, row):
    write(self, row)
    if row.get("split") == "train" and row.get("step") == pause:
        os.kill(os.getpid(), signal.SIGSTOP)

metrics.JsonlSink.write = write_then_pause
sys.argv = ["deqctl", *sys.argv[2:]]
app()
"""
# 5 batches an epoch, checkpoints at 7 (epoch 1, batch 2) and at the end (12): the kill
# after step 9's row drops rows 8 and 9, and the resume crosses the epoch boundary at 10
SCHEDULE = ["train.max_steps=12", "train.save_every=7", "train.log_every=1",
            "train.eval_every_epoch=true", "runtime.threads=1", "--plain"]
KILL_AFTER, CHECKPOINT = 9, 7
TIMING = {"step_time_s", "samples_per_s", "wall_s", "peak_mem_mb", "eval_time_s"}
TEXT = "".join(f"line {i} of the corpus, with words é{i % 7}\n" for i in range(400))


def content(run: Path) -> list[dict]:
    """The rows without their timings, which no two runs share."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows(run)]


def weights(run: Path) -> dict:
    return load_file(run / "checkpoints" / "final" / "model.safetensors")


def children(pid: int) -> set[int]:
    """The processes `pid` started (its DataLoader workers), from /proc."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_mid_epoch(tmp: Path, argv: list[str], run: Path) -> set[int]:
    """Run `deqctl train *argv` until it stops itself after step KILL_AFTER's row, SIGKILL
    it there; returns the processes it had started (alive at the kill)."""
    logs = tmp / "killed.txt"
    with open(logs, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCH, str(KILL_AFTER), "train",
                                 *argv, "--out", str(run)], env=ENV, stdout=log,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while True:
        pid, status = os.waitpid(proc.pid, os.WNOHANG | os.WUNTRACED)
        if pid and os.WIFSTOPPED(status):
            break
        assert not pid, f"ended before step {KILL_AFTER}:\n{logs.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no step {KILL_AFTER}:\n{logs.read_text()[-3000:]}"
        time.sleep(0.02)
    started = children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    deadline = time.monotonic() + 2          # no orphaned worker goes on holding the lock
    while rundir.live_holder(run) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rundir.live_holder(run) is None and not any(map(running, started))
    return started


def to_the_end(tmp: Path, name: str, argv: list[str]) -> None:
    """`deqctl *argv` as LAUNCH runs it, never stopped: it must succeed."""
    logs = tmp / f"{name}.txt"
    with open(logs, "w") as log:
        done = subprocess.run([sys.executable, "-c", LAUNCH, "0", *argv], env=ENV,
                              stdout=log, stderr=subprocess.STDOUT, timeout=300)
    assert done.returncode == 0, logs.read_text()[-3000:]


def check_exact_resume(tmp: Path, argv: list[str]) -> set[int]:
    """Kill a run of `argv` mid-epoch, resume it, and compare it with a run never killed:
    the same rows (timings aside) and the same final weights, bit for bit. Returns the
    processes the killed run had started."""
    killed, whole = tmp / "killed", tmp / "whole"
    started = kill_mid_epoch(tmp, argv, killed)
    assert rows(killed)[-1]["step"] == KILL_AFTER and not checkpoint.is_finished(killed)
    latest = checkpoint.resolve(killed)
    state = json.loads((latest / "trainer.json").read_text())["state"]
    assert (state["step"], state["epoch"], state["pos"]) == (CHECKPOINT, 1, 2)   # mid-epoch
    to_the_end(tmp, "resumed", ["train", "--resume", str(killed), "--plain"])
    to_the_end(tmp, "whole", ["train", *argv, "--out", str(whole)])
    keys = [(r["split"], r["step"]) for r in rows(killed)]
    assert len(keys) == len(set(keys))
    assert content(killed) == content(whole)
    got, want = weights(killed), weights(whole)
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)
    return started


# --- a token file ---------------------------------------------------------------------


def lm(tmp: Path) -> list[str]:
    """The Shakespeare recipe, tiny, on 40 sequences of 16 tokens (5 batches of 8)."""
    return [str(CONFIGS / "shakespeare-deq.yaml"), "data.seq_len=16", "data.batch_size=8",
            "data.limit_train=40", "data.eval_batch_size=16", "data.limit_eval=32",
            f"data.root={tmp / 'cache'}", "model={name: transformer_deq, d_model: 16, "
            "heads: 2, d_ff: 32}", *SCHEDULE]


@pytest.mark.slow
def test_a_token_file_run_with_two_workers_killed_mid_epoch_resumes_exactly(tmp_path):
    from datasets import Dataset, DatasetDict

    lines = TEXT.splitlines(keepends=True)
    DatasetDict({"train": Dataset.from_dict({"text": lines}),
                 "test": Dataset.from_dict({"text": lines[:75]})}).save_to_disk(tmp_path / "ds")
    argv = [*lm(tmp_path), "data.name=hf", f"data.hf.path={tmp_path / 'ds'}",
            "data.workers=2"]
    started = check_exact_resume(tmp_path, argv)
    assert started == set()                  # token files are read in the main process
    token_files = list((tmp_path / "cache" / "tokens").glob("*.ids"))
    assert len(token_files) == 2


@pytest.mark.slow
def test_a_text_file_run_killed_mid_epoch_resumes_exactly(tmp_path):
    (tmp_path / "train.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "test.txt").write_text(TEXT[:3000], encoding="utf-8")
    check_exact_resume(tmp_path, [*lm(tmp_path), "data.name=text",
                                  f"data.files.train={tmp_path / 'train.txt'}",
                                  f"data.files.test={tmp_path / 'test.txt'}"])


def test_text_files_refuse_data_workers_in_one_line(tmp_path):
    result = train(str(CONFIGS / "shakespeare-deq.yaml"), "data.name=text", "data.workers=2",
                   "--out", str(tmp_path / "run"), "--plain")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "data.workers: unknown key (valid for data.name=text:" in result.output


# --- an image folder decoded by two workers ----------------------------------------------


def test_batches_read_through_workers_leave_the_global_rng_alone(tmp_path):
    """A DataLoader draws its workers' base seed from the global RNG unless given a
    generator: the draw a resumed epoch makes again would shift every later dropout mask
    and Jacobian probe."""
    b = build_data(recipes.validate({"data": {
        "name": "imagefolder", "root": str(folder(tmp_path, train_n=8)), "image_size": 6,
        "augment": "imagenet", "workers": 2}}).data)
    before = torch.get_rng_state()
    assert len(list(iterate_batches(b.train, 4, shuffle=True, seed=1, augment=True))) == 2
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.slow
def test_an_image_folder_run_with_two_workers_killed_mid_epoch_resumes_exactly(tmp_path):
    root = folder(tmp_path / "images", train_n=20, test_n=6)
    argv = [RECIPE, "data.name=imagefolder", f"data.root={root}", "data.image_size=8",
            "data.augment=imagenet", "data.workers=2", "data.batch_size=4",
            "data.eval_batch_size=6", "model.channels=8", "model.inner_channels=16",
            *[f"deq.{b}.max_iter=6" for b in ("forward", "backward", "eval")], *SCHEDULE]
    started = check_exact_resume(tmp_path, argv)
    assert len(started) == 2                 # both workers were alive at the kill
