"""`deqctl solve-trace` and deqctl.inspect: solver traces, spectral radius of df/dz by power
iteration against exact eigenvalues, observed linear rate, JSON and plots."""

from __future__ import annotations

import json

import pytest
import torch

import deqctl
from deqctl.cli import app
from deqctl.inspect import compare_solvers, linear_rate, spectral_radius
from deqctl.implicit import SolveSpec

from cli_helpers import CONFIGS, RECIPE, runner

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def linear_map(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A non-normal real matrix Q diag(eigenvalues) Q^-1 (or with 2x2 rotation blocks
    for complex pairs passed as (r, theta) rows), float32."""
    g = torch.Generator().manual_seed(seed)
    d = eigenvalues.shape[0]
    q = torch.randn(d, d, generator=g, dtype=torch.float64)
    return (q @ torch.diag(eigenvalues.double()) @ torch.linalg.inv(q)).float()


def exact_radius(w: torch.Tensor) -> float:
    return float(torch.linalg.eigvals(w.double()).abs().max())


# --- spectral radius and rate on linear cells f(z) = W z + u -----------------------------


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_spectral_radius_of_linear_cell_within_5_percent(mode):
    lam = torch.tensor([0.9, -0.62, 0.5, 0.41, 0.33, -0.3, 0.2, 0.1, 0.05, -0.02, 0.0, 0.15])
    w = linear_map(lam)
    u = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
    rho = spectral_radius(lambda z: z @ w.T + u, torch.zeros(4, 12), mode=mode)
    assert rho.shape == (4,)
    exact = exact_radius(w)
    assert exact == pytest.approx(0.9, rel=1e-6)
    assert torch.allclose(rho, torch.full((4,), exact), rtol=0.05)
    assert torch.allclose(rho, torch.full((4,), exact), rtol=1e-3)  # in fact much closer


def test_spectral_radius_with_complex_dominant_pair():
    # rotation-scaling block: eigenvalues 0.85 e^{+-0.7i}, so power-iteration factors oscillate
    r, th = 0.85, 0.7
    block = torch.tensor([[r * torch.cos(torch.tensor(th)), -r * torch.sin(torch.tensor(th))],
                          [r * torch.sin(torch.tensor(th)), r * torch.cos(torch.tensor(th))]])
    d = torch.block_diag(block, torch.diag(torch.tensor([0.5, -0.4, 0.3, 0.2, 0.1, 0.0])))
    q = torch.randn(8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w = (q @ d.double() @ torch.linalg.inv(q)).float()
    rho = spectral_radius(lambda z: z @ w.T, torch.zeros(3, 8))
    assert torch.allclose(rho, torch.full((3,), exact_radius(w)), rtol=0.01)


def test_spectral_radius_is_per_sample():
    # a per-sample cell: sample b is scaled by s_b, so its Jacobian is s_b * W
    w = linear_map(torch.tensor([0.8, 0.5, -0.3, 0.2, 0.1, 0.0]))
    scale = torch.tensor([1.0, 0.5, 0.25])[:, None]
    rho = spectral_radius(lambda z: scale * (z @ w.T), torch.zeros(3, 6))
    assert torch.allclose(rho, 0.8 * scale.squeeze(1), rtol=0.01)


def test_fixed_point_rate_matches_spectral_radius_and_traces_fall():
    # float64: near tol, float32 rounding of f(z) - z would blur the tail's rate
    w = linear_map(torch.tensor([0.8, -0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1]), seed=3).double()
    u = torch.randn(5, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    f = lambda z: z @ w.T + u                                             # noqa: E731
    specs = [SolveSpec(name, max_iter=200, tol=1e-6, stop_mode="abs")
             for name in ("fixed_point", "anderson", "broyden")]
    z0 = torch.zeros(5, 8, dtype=torch.float64)
    traces = compare_solvers(f, z0, specs)
    assert traces["broyden"].nfe == len(traces["broyden"].abs_median)
    # (broyden is left out below: its limited-memory variant stalls near 1e-5 on some
    # samples of this problem, a solver matter, not the tracer's)
    for name, t in ((k, traces[k]) for k in ("fixed_point", "anderson")):
        assert t.converged == 1.0, name
        assert t.nfe == len(t.abs_median) == len(t.rel_max)
        assert t.abs_max[-1] <= 1e-6 < t.abs_max[0], name
        assert t.time_to_tol_s == t.time_s > 0
    # Anderson on a linear map is GMRES-like: far fewer evaluations than plain iteration
    assert traces["anderson"].nfe < traces["fixed_point"].nfe / 2
    rate = linear_rate(traces["fixed_point"].trace_abs)
    assert torch.allclose(rate, torch.full((5,), 0.8, dtype=rate.dtype), rtol=0.05)


def test_linear_rate_ignores_stopped_samples_and_short_traces():
    trace = torch.tensor([[1.0, 1.0], [0.5, 0.1], [0.25, float("nan")], [0.125, float("nan")],
                          [0.0625, float("nan")]])
    rate = linear_rate(trace)
    assert rate[0] == pytest.approx(0.5) and torch.isnan(rate[1])


# --- the command -------------------------------------------------------------------------


def test_solve_trace_json_plot_and_backward(run, tmp_path):
    out_json, out_png = tmp_path / "t.json", tmp_path / "t.png"
    result = runner.invoke(app, ["solve-trace", str(run), "--batch", "16", "--tol", "1e-5",
                                 "--max-iter", "60", "--backward", "--json", str(out_json),
                                 "--plot", str(out_png)])
    assert result.exit_code == 0, result.output
    got = json.loads(out_json.read_text())
    assert set(got["solvers"]) == {"anderson", "broyden", "fixed_point"}
    for name, s in got["solvers"].items():
        assert {"nfe", "converged", "time_s", "abs_trace", "rel_trace"} <= set(s), name
        assert len(s["abs_trace"]) == len(s["rel_trace"]) == s["nfe"] <= 60
        assert 0.0 <= s["converged"] <= 1.0 and s["time_s"] > 0
        assert s["rel_trace"][0] == pytest.approx(1.0)       # z0 = 0: f(0) - 0 = f(0)
        assert s["rel_trace"][9] < 0.1 * s["rel_trace"][0]  # a contractive model: residuals fall
    fp = got["solvers"]["fixed_point"]["rel_trace_max"]
    # the worst sample's residual falls by about rho per step: a factor ~1e-1 per 20 steps
    assert all(fp[i + 10] < 0.5 * fp[i] for i in range(0, len(fp) - 10, 10)), fp
    assert got["solvers"]["anderson"]["converged"] == 1.0
    # the local contraction factor explains fixed-point iteration's observed rate
    rho, rate = got["spectral_radius"], got["fixed_point_rate"]
    assert 0 < rho < 1 and len(got["spectral_radius_per_sample"]) == 16
    assert rate == pytest.approx(rho, rel=0.05)
    assert set(got["backward"]["solvers"]) == set(got["solvers"])
    assert got["backward"]["solvers"]["anderson"]["converged"] == 1.0
    assert out_png.read_bytes()[:8] == PNG
    assert (tmp_path / "t-backward.png").read_bytes()[:8] == PNG
    for text in ("forward", "backward (adjoint)", "spectral radius", "observed linear rate"):
        assert text in result.stdout, text


def test_solve_trace_on_an_untrained_recipe(tmp_path):
    out_json = tmp_path / "t.json"
    result = runner.invoke(app, ["solve-trace", RECIPE, "model.channels=4", "model.inner_channels=8",
                                 "--batch", "4", "--solvers", "fixed_point,anderson",
                                 "--json", str(out_json)])
    assert result.exit_code == 0, result.output
    got = json.loads(out_json.read_text())
    assert got["untrained"] is True and list(got["solvers"]) == ["fixed_point", "anderson"]
    assert got["spectral_radius"] > 0 and "backward" not in got


@pytest.mark.parametrize("args, needle", [
    (["--solvers", "anderson,newton"], "newton"),
    (["model.channels=4"], "model.channels"),
])
def test_bad_input_exits_2(run, args, needle):
    result = runner.invoke(app, ["solve-trace", str(run), *args])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and "Traceback" not in result.output


# --- path independence: --starts ------------------------------------------------------------


class _Bistable(deqctl.DEQModel):
    """f(z) = tanh(gain * z) + bias: with gain 4 and bias 0 the stable fixed points are
    about +-0.9993 and 0 is an unstable one, where the usual start (zeros) stays; with
    gain 0.5, a contraction with one fixed point."""

    inputs, tasks = ("image",), ("classify",)

    def __init__(self, info, deq, gain: float = 4.0, bias: float = 0.0):
        super().__init__(info, deq)
        self.gain, self.bias = gain, bias

    def inject(self, x):
        return torch.full((x.shape[0], 3), self.bias, dtype=x.dtype)

    def cell(self, z, u):
        return torch.tanh(self.gain * z) + u

    def decode(self, z, x):
        return torch.stack([z.sum(1), -z.sum(1)], dim=1)


def _starts(gain: float, bias: float, starts: int = 6):
    from deqctl.data import DataInfo
    from deqctl.inspect.starts import path_independence
    from deqctl.tasks import task_for
    info = DataInfo(name="t", task="classify", inputs="image", shape=(1, 2, 2), num_classes=2)
    spec = SolveSpec(solver="anderson", max_iter=100, tol=1e-8)
    model = _Bistable(info, deqctl.DEQ(), gain=gain, bias=bias).double()
    x = torch.zeros(16, 1, 2, 2, dtype=torch.float64)
    return path_independence(model, task_for(info), x, spec, starts).summary()


def test_starts_find_no_spread_on_a_contraction_and_the_spread_of_two_fixed_points():
    one = _starts(gain=0.5, bias=0.3)      # a contraction: one fixed point
    assert one["distance_max"] < 1e-6 and one["unique"] == 1.0
    assert one["prediction_agreement"] == 1.0
    two = _starts(gain=4.0, bias=0.0)      # the random starts land on +-0.9993, not on 0
    assert two["distance_median"] == pytest.approx(1.0) and two["unique"] == 0.0
    assert two["converged"] == 1.0 and two["prediction_agreement"] < 1.0


# --- gradient audit: --grad ------------------------------------------------------------------


class _Linear(deqctl.DEQModel):
    """z* = W z* + U x, logits H z*: the exact gradient has a closed form."""

    inputs, tasks = ("image",), ("classify",)

    def __init__(self, info, deq, width: int = 5, norm: float = 0.9):
        super().__init__(info, deq)
        g = torch.Generator().manual_seed(0)
        w = torch.randn(width, width, generator=g)
        self.W = torch.nn.Parameter(norm * w / torch.linalg.matrix_norm(w, 2))
        self.U = torch.nn.Parameter(torch.randn(width, 4, generator=g))
        self.H = torch.nn.Parameter(torch.randn(2, width, generator=g))

    def inject(self, x):
        return x.flatten(1) @ self.U.T

    def cell(self, z, u):
        return z @ self.W.T + u

    def decode(self, z, x):
        return z @ self.H.T


class _Drifting(_Linear):
    """z -> z + U x: no fixed point at all."""

    def cell(self, z, u):
        return z + u


def _audit(backward: dict, model_class=_Linear):
    from deqctl.data import DataInfo
    from deqctl.inspect.gradaudit import audit_gradient
    from deqctl.tasks import task_for
    info = DataInfo(name="t", task="classify", inputs="image", shape=(1, 2, 2), num_classes=2)
    deq = deqctl.DEQ(forward={"solver": "anderson", "max_iter": 200, "tol": 1e-9},
                     backward={"solver": "anderson", "max_iter": 200, "tol": 1e-9, **backward})
    model = model_class(info, deq)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 2, 2, generator=g), torch.randint(0, 2, (8,), generator=g)
    return model, x, y, audit_gradient(model, task_for(info), x, y)


def test_the_audit_s_reference_is_the_closed_form_implicit_gradient():
    model, x, y, audit = _audit({"mode": "ift"})
    assert audit.overall.cosine > 0.99999 and audit.overall.rel_error < 1e-5
    assert (audit.samples, audit.inexact) == (8, 0) and "did not converge" not in audit.line()
    w, u, h = (p.detach().double().requires_grad_() for p in (model.W, model.U, model.H))
    z = torch.linalg.solve(torch.eye(5, dtype=torch.float64) - w, (x.double().flatten(1) @ u.T).T).T
    torch.nn.functional.cross_entropy(z @ h.T, y).backward()
    from deqctl.inspect.gradaudit import exact_gradient
    from deqctl.tasks import task_for
    exact, _ = exact_gradient(model, task_for(model.info), x, y)
    for name, closed in (("W", w.grad), ("U", u.grad), ("H", h.grad)):
        err = (exact[name] - closed.flatten()).norm() / closed.norm()
        assert err < 1e-7, (name, float(err))    # float64, rel tol 1e-10, rate 0.9


@pytest.mark.parametrize("backward, below", [({"mode": "jfb"}, 0.99),
                                             ({"mode": "ift", "max_iter": 1}, 0.99),
                                             ({"mode": "phantom", "phantom_steps": 2}, 0.99)])
def test_the_audit_flags_gradients_that_are_not_the_implicit_one(backward, below):
    _, _, _, audit = _audit(backward)
    assert audit.overall.cosine < below, audit.line()
    w = next(g for g in audit.groups if g.name == "W")
    assert w.rel_error > 0.05


class _PartlyContracting(_Linear):
    """z -> W z + U x (rate 0.9), but z -> z + U x where |U x| is large: those samples
    have no fixed point."""

    def cell(self, z, u):
        return torch.where(u.norm(dim=1, keepdim=True) > 20, z, z @ self.W.T) + u


def test_the_audit_says_when_no_sample_has_a_fixed_point():
    _, _, _, audit = _audit({"mode": "ift"}, _Drifting)
    assert (audit.samples, audit.inexact) == (8, 8) and audit.overall is None
    assert "no sample of 8 has a fixed point" in audit.line()
    assert audit.to_json()["inexact_samples"] == 8 and audit.to_json()["cosine"] is None


def test_the_audit_s_cosine_counts_only_the_samples_with_a_fixed_point():
    """A sample without a fixed point has no exact gradient: in the cosine, it made an
    exact backward rule look wrong (issue 32). It is counted apart."""
    from deqctl.data import DataInfo
    from deqctl.inspect.gradaudit import audit_gradient
    from deqctl.tasks import task_for
    info = DataInfo(name="t", task="classify", inputs="image", shape=(1, 2, 2), num_classes=2)
    solve = {"solver": "anderson", "max_iter": 200, "tol": 1e-9}
    model = _PartlyContracting(info, deqctl.DEQ(forward=solve, backward={**solve, "mode": "ift"}))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 2, 2, generator=g), torch.randint(0, 2, (8,), generator=g)
    x[:3] *= 100 / (x[:3].flatten(1) @ model.U.detach().T).norm(dim=1).view(3, 1, 1, 1)
    audit = audit_gradient(model, task_for(info), x, y)
    assert (audit.samples, audit.inexact) == (8, 3)
    assert audit.overall.cosine > 0.99999 and audit.overall.rel_error < 1e-5, audit.line()
    assert "over the 5 of 8 samples with a fixed point" in audit.line()
    assert "3 have none" in audit.line()
    whole = audit.to_json()
    assert whole["inexact_samples"] == 3 and whole["no_fixed_point_fraction"] == 3 / 8
    assert audit.failures(min_cos=0.9999, max_no_fixed_point=0.5) == []
    assert audit.failures(min_cos=0.9999, max_no_fixed_point=0.25) == [
        "--max-no-fixed-point 0.25: 3 of 8 samples have no fixed point"]


def test_solve_trace_grad_prints_the_audit_and_min_cos_sets_the_exit_code(run, tmp_path):
    result = runner.invoke(app, ["solve-trace", str(run), "--solvers", "anderson", "--grad",
                                 "--json", str(tmp_path / "t.json")])
    assert result.exit_code == 0, result.output
    assert "against the exact implicit gradient" in result.output
    grad = json.loads((tmp_path / "t.json").read_text())["grad"]
    assert grad["rule"].startswith("ift") and grad["cosine"] > 0.9
    assert {g["group"] for g in grad["groups"]} >= {"body", "head"}
    result = runner.invoke(app, ["solve-trace", str(run), "--solvers", "anderson",
                                 "--min-cos", "1.0"])
    assert result.exit_code == 1 and "error: --min-cos 1" in result.output
    result = runner.invoke(app, ["solve-trace", str(run), "--solvers", "anderson",
                                 "--max-no-fixed-point", "0.5"])
    assert result.exit_code == 0, result.output


def test_a_trained_model_s_backward_rule_can_be_audited_as_another(run, tmp_path):
    """deq.backward.* overrides (the weights do not depend on them) compare rules."""
    cos = {}
    for mode in ("ift", "jfb"):
        path = tmp_path / f"{mode}.json"
        result = runner.invoke(app, ["solve-trace", str(run), f"deq.backward.mode={mode}",
                                     "--solvers", "anderson", "--grad", "--json", str(path)])
        assert result.exit_code == 0, result.output
        cos[mode] = json.loads(path.read_text())["grad"]
    assert cos["ift"]["rule"].startswith("ift") and cos["jfb"]["rule"].startswith("jfb")
    assert cos["jfb"]["cosine"] < cos["ift"]["cosine"]
    result = runner.invoke(app, ["solve-trace", str(run), "model.channels=4"])
    assert result.exit_code == 2 and "deq.backward.*" in result.output


def test_starts_go_in_the_json_and_in_a_plot_beside_the_trace(run, tmp_path):
    plot, js = tmp_path / "trace.png", tmp_path / "t.json"
    result = runner.invoke(app, ["solve-trace", str(run), "--solvers", "anderson",
                                 "--starts", "3", "--batch", "8", "--plot", str(plot),
                                 "--json", str(js)])
    assert result.exit_code == 0, result.output
    starts = json.loads(js.read_text())["starts"]
    assert starts["starts"] == 3 and len(starts["distance"]) == 8
    assert 0 <= starts["prediction_agreement"] <= 1
    beside = tmp_path / "trace-starts.png"
    assert beside.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(beside) in result.output
    # the plot beside is an output like the others: never replaced without --force
    again = runner.invoke(app, ["solve-trace", str(run), "--solvers", "anderson",
                                "--starts", "3", "--plot", str(tmp_path / "other.png"),
                                "--json", str(beside)])
    assert again.exit_code == 2


def test_the_audit_s_reference_has_the_training_pass_s_dropout_masks():
    # variational dropout draws one mask per pass from the seed; a float64 reference that
    # drew other masks (torch.bernoulli draws per dtype) solves another map altogether
    from deqctl import recipe as recipes
    from deqctl.data import build_data
    from deqctl.inspect.gradaudit import audit_gradient
    from deqctl.models import build_model
    from deqctl.tasks import task_for
    tight = [f"deq.{b}.{k}={v}" for b in ("forward", "backward")
             for k, v in (("tol", 1e-6), ("max_iter", 300))]
    r = recipes.load(CONFIGS / "sequential-mnist-deq.yaml",
                     ["model.d_model=16", "model.heads=2", "model.d_ff=32", "model.dropout=0.3",
                      "model.init_std=0.02",
                      "data.limit_train=16", "data.limit_eval=16", *tight])
    data = build_data(r.data)
    torch.manual_seed(0)
    model = build_model(r, data.info)
    audit = audit_gradient(model, task_for(data.info), data.test.inputs[:8],
                           data.test.targets[:8])
    assert audit.exact_residual < 1e-9            # the reference is exact: a contraction
    assert audit.overall.cosine > 0.9999, audit.line()
