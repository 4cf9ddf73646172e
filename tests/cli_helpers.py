"""What the CLI test files share: the default recipe, `deqctl train` in-process, a run's
metrics rows, and waiting for a training subprocess to log its first rows."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from typer.testing import CliRunner

from deqctl.cli import app

RECIPE = str(Path(__file__).parents[1] / "configs" / "mnist-deq.yaml")
runner = CliRunner()


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
