"""`deqctl export` and deqctl.load: folded normalisations, unrolled solvers, pt2 / ONNX /
safetensors artefacts, parity against the eager DEQ and its failure, missing extras."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
from safetensors import safe_open
from torch.nn.utils import parametrize

import deqctl
from deqctl.cli import app
from deqctl.data import build_data, iterate_batches
from deqctl.engine.checkpoint import CheckpointError, load_model
from deqctl.export import Unrolled, calibrate_iters, compare, fold_norms
from deqctl.export.unroll import _solve_spd
from deqctl.tasks import task_for

from cli_helpers import runner



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded(run):
    model, recipe, meta = load_model(run)
    data = build_data(recipe.data)
    x, y = next(iter(iterate_batches(data.test, 16, shuffle=False)))
    return model, recipe, x


def parity_numbers(output: str) -> tuple[float, float]:
    m = re.search(r"max \|diff\| (\S+), predictions agree ([\d.]+)%", output)
    assert m, output
    return float(m.group(1)), float(m.group(2)) / 100


# --- library pieces ------------------------------------------------------------------


def test_fold_norms_keeps_outputs_and_leaves_the_original_intact(loaded):
    model, _, x = loaded
    assert any(parametrize.is_parametrized(m) for m in model.modules())
    folded = fold_norms(model)
    assert not any(parametrize.is_parametrized(m) for m in folded.modules())
    with torch.no_grad():
        u = model.inject(x)
        z = torch.randn_like(u)
        assert torch.allclose(folded.cell(z, u), model.cell(z, u), atol=1e-5)
        # regression: removing a deep copy's parametrisations must not strip the original's
        assert torch.isfinite(model(x)).all()
    assert any(parametrize.is_parametrized(m) for m in model.modules())


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_unrolled_solver_matches_the_library_solver(loaded, solver):
    model, recipe, x = loaded
    s = recipe.deq.eval_settings().model_copy(
        update={"solver": solver, "tol": 1e-12, "max_iter": 9}).spec()
    unrolled = Unrolled.from_spec(fold_norms(model), 8, s).eval()
    with torch.no_grad():
        u = model.inject(x)
        # after 8 evaluations with no early stop, the library's next iterate is z_8
        res = s.run(lambda z: model.cell(z, u), model.init_state(u))
        want = model.decode(res.z, x)
        assert torch.allclose(unrolled(x), want, atol=1e-4), (unrolled(x) - want).abs().max()


def test_spd_solve_uses_no_linalg_and_matches_it():
    a = torch.randn(4, 5, 5, dtype=torch.float64)
    a = a @ a.transpose(1, 2) + 0.1 * torch.eye(5, dtype=torch.float64)
    b = torch.ones(4, 5, 1, dtype=torch.float64)
    w, ok = _solve_spd(a)
    assert ok.all() and torch.allclose(w, torch.linalg.solve(a, b).squeeze(-1), atol=1e-10)


def test_the_unrolled_anderson_step_is_the_solver_s():
    """One function takes the step in both: the unrolled graph's Gauss-Jordan solve gives
    the Cholesky solve's update."""
    from deqctl.solvers.anderson import anderson_step, cholesky_solve
    g = torch.Generator().manual_seed(0)
    F, G = torch.randn(3, 4, 7, generator=g, dtype=torch.float64), \
        torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    gram = torch.bmm(G, G.transpose(1, 2))
    for beta in (1.0, 0.7):
        a, _ = anderson_step(F, G, gram, lam=1e-4, beta=beta, newest=2, solve=cholesky_solve)
        b, _ = anderson_step(F, G, gram, lam=1e-4, beta=beta, newest=2, solve=_solve_spd,
                             retry=False)
        assert torch.allclose(a, b, atol=1e-10)


def test_calibration_counts_evaluations_to_tol(loaded):
    model, recipe, x = loaded
    s = recipe.deq.eval_settings().spec()
    n, conv = calibrate_iters(model, x, s)
    assert conv == 1.0 and 1 < n < s.max_iter
    n_loose, _ = calibrate_iters(model, x, s.but(tol=1e-1))
    assert n_loose < n
    n_capped, conv_capped = calibrate_iters(model, x, s.but(max_iter=2))
    assert n_capped == 1 and conv_capped == 0.0       # 2 evaluations: z0 measured, z1 returned


def test_parity_problems(loaded):
    task = task_for(loaded[0].info)
    eager = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    close = compare(task, eager, eager + 1e-3, eager + 1e-3)
    assert close.problems(max_diff=1e-2, min_agree=1.0) == []
    assert "--max-diff" in close.problems(max_diff=1e-4, min_agree=None)[0]
    flipped = compare(task, eager, eager.flip(1), eager.flip(1))
    assert flipped.agreement == 0.0 and "--min-agree" in flipped.problems(None, 0.5)[0]
    broken = compare(task, eager, eager + 1.0, eager)        # exported graph != traced module
    assert any("exporter" in p for p in broken.problems(None, None))


# --- the command -----------------------------------------------------------------------


def test_pt2_export_passes_parity_and_takes_any_batch(run, loaded, tmp_path):
    model, _, x = loaded
    out = tmp_path / "m.pt2"
    result = runner.invoke(app, ["export", str(run), "--format", "pt2", "--out", str(out),
                                 "--solver", "fixed_point", "--max-diff", "0.05"])
    assert result.exit_code == 0, result.output
    needed = int(re.search(r"fixed_point needs (\d+) iterations", result.stdout).group(1))
    assert f"unrolled to {needed} iterations" in result.stdout and "parity ok" in result.stdout
    diff, agree = parity_numbers(result.stdout)
    assert diff < 0.05 and agree >= 0.99
    program = torch.export.load(str(out)).module()
    with torch.no_grad():
        for n in (1, 5):
            assert torch.allclose(program(x[:n]), model(x[:n]), atol=0.05)


def test_onnx_export_passes_parity_in_onnxruntime(run, loaded, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    model, _, x = loaded
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", str(run), "--format", "onnx", "--out", str(out),
                                 "--solver", "fixed_point", "--max-diff", "0.05"])
    assert result.exit_code == 0, result.output
    diff, agree = parity_numbers(result.stdout)
    assert diff < 0.05 and agree >= 0.99
    assert not list(tmp_path.glob("*.data"))          # weights inside the one file
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "images"
    got = torch.from_numpy(session.run(None, {"images": x[:3].numpy()})[0])
    with torch.no_grad():
        assert torch.allclose(got, model(x[:3]), atol=0.05)


def test_parity_failure_exits_1_with_a_clear_message(run, tmp_path):
    result = runner.invoke(app, ["export", str(run), "--format", "pt2", "--out",
                                 str(tmp_path / "m.pt2"), "--iters", "1", "--max-diff", "1e-3"])
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in result.output
    assert err.startswith("error: parity check failed: max |diff|") and "--max-diff 0.001" in err
    assert "raise --iters" in err


def test_safetensors_export_and_deqctl_load(run, loaded, tmp_path):
    model, recipe, x = loaded
    out = tmp_path / "deploy" / "m.safetensors"
    result = runner.invoke(app, ["export", str(run), "--format", "safetensors", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert parity_numbers(result.stdout) == (0.0, 1.0)
    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
    assert "resnet_deq" in meta["recipe"] and '"num_classes": 10' in meta["data_info"]
    with torch.no_grad():
        want = model(x)
        for path in (out, run, run / "checkpoints" / "final",
                     run / "checkpoints" / "final" / "model.safetensors"):
            m = deqctl.load(path)
            assert isinstance(m, torch.nn.Module) and not m.training
            assert torch.equal(m(x), want), path
    # eval reads the export too
    assert runner.invoke(app, ["eval", str(out), "--json"]).exit_code == 0


def test_load_rejects_other_files(tmp_path):
    bad = tmp_path / "m.onnx"
    bad.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="onnxruntime"):
        deqctl.load(bad)
    with pytest.raises(CheckpointError, match="no such run"):
        deqctl.load(tmp_path / "missing")


@pytest.mark.parametrize("args, needle", [
    (["--format", "safetensors", "--iters", "3"], "--iters and --solver apply to pt2 and onnx"),
    (["--format", "pt2", "--solver", "broyden"], "broyden"),
    (["--format", "pt2", "model.channels=4"], "model.channels"),
])
def test_bad_input_exits_2(run, tmp_path, args, needle):
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "m"), *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output


def test_missing_onnx_names_the_extra(run, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnx" else real(name, *a))
    result = runner.invoke(app, ["export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert message.startswith("error: ONNX export needs onnx") and "\n" not in message
    assert message.endswith("pip install 'deqctl[export]'")


@pytest.mark.slow
def test_anderson_unrolled_exports_to_onnx(run, tmp_path):
    result = runner.invoke(app, ["export", str(run), "--format", "onnx", "--out",
                                 str(tmp_path / "m.onnx"), "--solver", "anderson",
                                 "--max-diff", "0.05"])
    assert result.exit_code == 0, result.output
    assert "anderson unrolled" in result.stdout and "parity ok" in result.stdout
