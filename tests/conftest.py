"""Fixtures shared by the command tests: one tiny trained run per session, one thread."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deqctl.cli import app

RECIPE = str(Path(__file__).parents[1] / "configs" / "mnist-deq.yaml")
TINY = ["train.max_steps=2", "data.limit_train=64", "data.limit_eval=64", "data.batch_size=32",
        "data.eval_batch_size=64", "train.log_every=1", "model.channels=8",
        "model.inner_channels=16", "runtime.threads=1"]


@pytest.fixture(scope="session")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step run of the default recipe on a tiny model, trained once per test session."""
    out = tmp_path_factory.getbasetemp() / "deqctl-tiny-run"
    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, ["train", RECIPE, *TINY, "--out", str(out), "--plain"])
    finally:
        torch.set_num_threads(threads)     # runtime.threads is process-wide
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run as fast on one thread, and a second one only spins against other
    processes when the machine is shared; the tiny run's runtime.threads=1 sets the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
