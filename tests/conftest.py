"""Fixtures shared by the command tests: one tiny trained run per session, one thread."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from deqctl.cli import app

from cli_helpers import RECIPE, runner, tiny

# token files of the tests' texts go to a folder of this test session's, never ~/.cache
os.environ["DEQCTL_CACHE"] = tempfile.mkdtemp(prefix="deqctl-test-cache-")
atexit.register(shutil.rmtree, os.environ["DEQCTL_CACHE"], True)



@pytest.fixture(scope="session")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step run of the default recipe on a tiny model, trained once per test session."""
    out = tmp_path_factory.getbasetemp() / "deqctl-tiny-run"
    threads = torch.get_num_threads()
    try:
        result = runner.invoke(app, ["train", RECIPE, *tiny(), "train.max_steps=2", "--out", str(out), "--plain"])
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
