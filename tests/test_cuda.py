"""The CUDA path (issue 19): solvers on the device and their host syncs, every gradient rule
against the unrolled reference, bf16/fp16 and bf16_until training, torch.compile, a
checkpoint moving between GPU and CPU, torchrun, and peak memory. Marked `cuda` and
skipped without a GPU; bench/gpu.sh runs them first (`pytest -m cuda`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from deqctl.cli import app
from deqctl.implicit.gradcheck import compare_to_unrolled
from deqctl.solvers import solve

from cli_helpers import RECIPE, rows, runner, tiny, train

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = ["runtime.device=cuda", "train.max_steps=4", "--plain"]


def contraction(dim: int = 64, batch: int = 32, dtype=torch.float32):
    """Per-sample z = W z + b on the GPU, its exact solution from linalg.solve."""
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(dim, dim, device="cuda", generator=g, dtype=dtype)
    w = 0.8 * w / torch.linalg.matrix_norm(w, 2)
    b = torch.randn(batch, dim, device="cuda", generator=g, dtype=dtype)
    exact = torch.linalg.solve(torch.eye(dim, device="cuda", dtype=dtype) - w, b.T).T
    return (lambda z: z @ w.T + b), exact


@pytest.mark.parametrize("method", ["fixed_point", "anderson", "broyden"])
def test_solvers_find_known_fixed_points_on_the_device(method):
    f, exact = contraction(dtype=torch.float64)
    res = solve(f, torch.zeros_like(exact), method, tol=1e-8, max_iter=400)
    assert res.z.is_cuda and bool(res.converged.all())
    assert torch.allclose(res.z, exact, atol=1e-6)


@pytest.mark.parametrize("method", ["fixed_point", "anderson", "broyden"])
def test_host_syncs_per_solve_are_bounded_by_check_every(method):
    """A sync only every check_every evaluations: at most max_iter / check_every + 2."""
    f, exact = contraction()
    max_iter, check_every = 40, 4
    solve(f, torch.zeros_like(exact), method, tol=1e-30, max_iter=max_iter,
          check_every=check_every)                              # warm-up: kernels, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            solve(f, torch.zeros_like(exact), method, tol=1e-30, max_iter=max_iter,
                  check_every=check_every)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in seen if "synchroniz" in str(w.message)]
    assert len(syncs) <= max_iter // check_every + 2, [str(w.message) for w in syncs[:5]]


def test_every_gradient_rule_against_the_unrolled_reference_on_the_device():
    g = torch.Generator(device="cuda").manual_seed(3)
    w = (0.4 * torch.randn(6, 6, device="cuda", generator=g, dtype=torch.float64)
         ).requires_grad_()
    x = torch.randn(4, 6, device="cuda", generator=g, dtype=torch.float64)

    def cell(z, u):
        return torch.tanh(z @ w.T + u)
    settings = dict(forward=dict(solver="anderson", tol=1e-12, max_iter=300),
                    backward=dict(solver="anderson", tol=1e-12, max_iter=300))
    reports = compare_to_unrolled(cell, x, torch.zeros_like(x), [w], settings)
    assert reports["ift"].cosine > 0.99999 and reports["ift"].rel_error < 1e-5
    assert 0 < reports["jfb"].cosine < reports["ift"].cosine
    assert reports["phantom"].cosine > 0


@pytest.mark.parametrize("extra", [["runtime.precision=bf16"], ["runtime.precision=fp16"],
                                   ["deq.forward.bf16_until=1e-2"], ["runtime.compile=true"]])
def test_training_steps_on_the_gpu(tmp_path, extra):
    out = tmp_path / "run"
    result = train(RECIPE, *tiny(train=128), *CUDA, *extra, "--out", str(out))
    assert result.exit_code == 0, result.output
    train_rows = [r for r in rows(out) if r["split"] == "train"]
    assert train_rows and all(r["loss"] is not None and r.get("skipped_steps", 0) == 0
                              for r in train_rows)
    if "bf16_until" in extra[0]:
        assert any(r.get("fwd_nfe_bf16", 0) > 0 for r in train_rows)


def test_peak_memory_is_cuda_max_memory_allocated(tmp_path):
    out = tmp_path / "run"
    assert train(RECIPE, *tiny(train=128), *CUDA, "--out", str(out)).exit_code == 0
    peaks = [r["peak_mem_mb"] for r in rows(out) if r["split"] == "train"]
    # the model's activations at batch 32 take well over a megabyte, and under the card
    assert all(1 < p < torch.cuda.get_device_properties(0).total_memory / 2**20 for p in peaks)


def _eval(path: Path, *extra: str) -> dict:
    result = runner.invoke(app, ["eval", str(path), "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_checkpoint_moves_between_gpu_and_cpu(tmp_path):
    gpu_run, cpu_run = tmp_path / "gpu", tmp_path / "cpu"
    assert train(RECIPE, *tiny(train=128), *CUDA, "--out", str(gpu_run)).exit_code == 0
    on_gpu, on_cpu = _eval(gpu_run, "runtime.device=cuda"), _eval(gpu_run, "runtime.device=cpu")
    assert on_cpu["accuracy"] == pytest.approx(on_gpu["accuracy"], abs=1 / 64)
    assert on_cpu["loss"] == pytest.approx(on_gpu["loss"], rel=1e-3)
    assert train(RECIPE, *tiny(train=128), "train.max_steps=4", "runtime.device=cpu", "--plain",
                 "--out", str(cpu_run)).exit_code == 0
    back = _eval(cpu_run, "runtime.device=cuda")
    assert back["loss"] == pytest.approx(_eval(cpu_run)["loss"], rel=1e-3)


def test_torchrun_on_the_gpus_present(tmp_path):
    """nccl at one process per GPU; on a single GPU, two processes sharing it over gloo."""
    procs = max(torch.cuda.device_count(), 2)
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={procs}"]
    done = subprocess.run([*launcher, "-m", "deqctl", "train", RECIPE, *tiny(train=128),
                           "deq.jacobian_reg.weight=0", *CUDA, "--out", str(out)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("done: 4 steps") == 1 and rows(out)[-1]["split"] == "test"
