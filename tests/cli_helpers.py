"""What the CLI test files share: the default recipe and tiny overrides of it, `deqctl train`
in-process, a run's
metrics rows, waiting for a training subprocess to log its first rows, and trials of
`deqctl` killed or signalled at a chosen write (tests/crash_points.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from deqctl.cli import app

CONFIGS = Path(__file__).parents[1] / "configs"
RECIPE = str(CONFIGS / "mnist-deq.yaml")
runner = CliRunner()


def tiny(train: int = 64, eval: int = 64, iters: int | None = None) -> list[str]:
    """Overrides that make the default recipe a run of seconds: a small model on `train`
    samples evaluated on `eval`, batches of 32, a row every step, one thread (tiny models
    run as fast on one, and a second only spins against other processes); `iters` caps
    every solve."""
    caps = [f"deq.{block}.max_iter={iters}" for block in ("forward", "backward", "eval")]
    return ["model.channels=8", "model.inner_channels=16", f"data.limit_train={train}",
            f"data.limit_eval={eval}", "data.batch_size=32",
            f"data.eval_batch_size={min(eval, 64)}", "train.log_every=1",
            "runtime.threads=1", *(caps if iters else [])]


def train(*args):
    return runner.invoke(app, ["train", *args, "--plain"])


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def wait_for_rows(proc: subprocess.Popen, run: Path, n: int = 2, timeout: float = 120) -> None:
    """Return once `run` has logged n metrics rows, the process has ended, or time is up."""
    deadline = time.time() + timeout
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)


def run_trials(folder: Path, trials: list[dict]) -> list:
    """Run crash_points.py trials (writes counted under `folder`); returns each trial's
    exit status or "killed"."""
    spec = folder / f"trials-{len(list(folder.glob('trials-*')))}.json"
    spec.write_text(json.dumps(trials))
    here = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(here.parent)}
    done = subprocess.run([sys.executable, str(here / "crash_points.py"), str(folder),
                           str(spec)], capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
