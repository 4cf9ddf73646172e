"""An exported (unrolled) DEQ answers as the eager one does, converged or not: the graph
freezes each sample once it reaches tol and returns each sample's lowest-residual iterate,
as the library's solvers do, so a batch in which only some solves converge within the
budget still exports with full prediction agreement."""

from __future__ import annotations

import pytest
import torch

import deqctl
from deqctl.cli import app
from deqctl.data import DataInfo
from deqctl.export import Unrolled, calibrate_iters, compare, write_onnx, write_pt2
from deqctl.implicit import SolveSpec
from deqctl.tasks import task_for

from cli_helpers import runner

pytestmark = pytest.mark.usefixtures("one_thread")

D = 4                       # state width
FAST, DIP, DRIFT = 0, 1, 2  # the three kinds of sample in a batch


class _Regimes(deqctl.DEQModel):
    """f(z) = a * z + b * (1 + z^2) + c elementwise, with a, b, c (each D wide) read from
    the input (B, 3, 1, D), so each sample contracts at its own rate:
    - FAST: a <= 0.3, b = 0: a contraction, within tol in about 10 evaluations;
    - DIP: a = 0.1, but 2 along one axis that starts near its (unstable) fixed point:
      fixed-point iteration's residual falls for 2 steps, then grows for good, so the best
      iterate is z_2 and the last one is far from it (Anderson finds the fixed point);
    - DRIFT: a = 1, b > 0: no fixed point at all; the abs residual b * |1 + z^2| is least
      at z = 0, the start, and larger at every other iterate of any solver.
    Predictions are bands of |z|: below 0.1, up to 5, above 5, which the best and the
    last iterate of a DIP sample (fixed_point) and of a DRIFT one (abs residual) straddle."""

    inputs, tasks = ("image",), ("classify",)

    def inject(self, x):
        return x[:, :, 0, :]

    def init_state(self, u):
        return torch.zeros_like(u[:, 0])

    def cell(self, z, u):
        return u[:, 0] * z + u[:, 1] * (1 + z ** 2) + u[:, 2]

    def decode(self, z, x):
        r = z.norm(dim=1)
        return torch.stack([torch.full_like(r, 0.1), r, r * r / 5], dim=1)


INFO = DataInfo(name="regimes", task="classify", inputs="image", shape=(3, 1, D), num_classes=3)
# what a recipe's deq.eval would say: FAST samples converge, DIP (fixed_point) and DRIFT
# (stop_mode abs) never do; Anderson needs few iterations, and each costs export time
EVAL = {"fixed_point": dict(tol=1e-4, max_iter=12),
        "anderson": dict(tol=1e-4, max_iter=8, options={"m": 3})}


def _spec(solver: str, stop_mode: str) -> SolveSpec:
    return SolveSpec(solver=solver, stop_mode=stop_mode, **EVAL[solver])


def _batch(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples, FAST, DIP and DRIFT in turn; returns (x, kind)."""
    g = torch.Generator().manual_seed(0)
    kind = torch.arange(n) % 3
    a = torch.tensor([0.1, 0.2, 0.2, 0.3]).repeat(n, 1)
    b = torch.zeros(n, D)
    sign = torch.randint(0, 2, (n, D), generator=g) * 2 - 1
    c = sign * (0.3 + 0.7 * torch.rand(n, D, generator=g))     # |z*| from 0.6 to 2.9
    dip, drift = kind == DIP, kind == DRIFT
    a[dip] = torch.tensor([0.1, 0.1, 0.1, 2.0])
    c[dip] = torch.tensor([1.0, 1.0, 1.0, 1e-2])
    a[drift], b[drift], c[drift] = 1.0, 0.02, 0.0
    return torch.stack([a, b, c], 1)[:, :, None, :], kind


@pytest.fixture(scope="module")
def model():
    return _Regimes(INFO, deqctl.DEQ()).eval()


def _iterate(model, x, k: int) -> torch.Tensor:
    """The output at z_k of plain fixed-point iteration (z_0: the start)."""
    with torch.no_grad():
        u = model.inject(x)
        z = model.init_state(u)
        for _ in range(k):
            z = model.cell(z, u)
        return model.decode(z, x)


# the cases exported: in each, some samples converge and some never do
EXPORTED = [("fixed_point", "rel"), ("anderson", "abs")]


@pytest.mark.parametrize("solver, stop_mode", EXPORTED)
def test_the_batch_converges_only_in_part_and_the_last_iterate_would_not_do(
        model, solver, stop_mode):
    x, kind = _batch()
    spec = _spec(solver, stop_mode)
    with torch.no_grad():
        u = model.inject(x)
        res = spec.run(lambda z: model.cell(z, u), model.init_state(u),
                       snapshot_at=(spec.max_iter,))
        eager = model.decode(res.z, x)
        last = model.decode(res.snapshots[spec.max_iter], x)   # the budget's last iterate
    assert res.converged[kind == FAST].all() and not res.converged[kind == DRIFT].any()
    assert res.converged[kind == DIP].all() == (solver == "anderson")
    assert calibrate_iters(model, x, spec)[0] == spec.max_iter - 1
    assert task_for(INFO).agree(last, eager).float().mean() < 0.9


@pytest.mark.parametrize("solver, stop_mode", [(s, m) for s in ("fixed_point", "anderson")
                                               for m in ("rel", "abs")])
def test_the_unrolled_module_answers_as_the_eager_solve(model, solver, stop_mode):
    x, _ = _batch()
    spec = _spec(solver, stop_mode)
    unrolled = Unrolled.from_spec(model, calibrate_iters(model, x, spec)[0], spec).eval()
    with torch.no_grad():
        parity = compare(task_for(INFO), model.run(x, solver=spec).out, unrolled(x))
    # Anderson with rel residuals takes DRIFT samples on a chaotic path, where the graph's
    # rounding (Gauss-Jordan, the Gram matrix built at once) and the solver's part ways
    chaotic = (solver, stop_mode) == ("anderson", "rel")
    assert parity.problems(max_diff=1e-2 if chaotic else 1e-5, min_agree=1.0) == [], parity


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """(solver, stop_mode, fmt) -> a runner of that artefact, exported once per module."""
    done: dict = {}

    def get(solver: str, stop_mode: str, fmt: str):
        key = (solver, stop_mode, fmt)
        if key not in done:
            x, _ = _batch()
            spec = _spec(solver, stop_mode)
            unrolled = Unrolled.from_spec(model, calibrate_iters(model, x, spec)[0], spec).eval()
            path = tmp_path_factory.mktemp("export") / f"m.{fmt}"
            if fmt == "pt2":
                run = write_pt2(unrolled, x, path)
            else:
                pytest.importorskip("onnxruntime")
                run = write_onnx(unrolled, x, path, INFO.input_name, "logits")
            done[key] = (run, unrolled)
        return done[key]
    return get


def _slow_onnx_anderson(cases):
    """Anderson's ONNX export takes about 20 s (its unrolled least-squares solves)."""
    return [pytest.param(*c, marks=pytest.mark.slow) if c[0] == "anderson" and c[-1] == "onnx"
            else c for c in cases]


@pytest.mark.parametrize("solver, stop_mode, fmt", _slow_onnx_anderson(
    [(s, m, f) for s, m in EXPORTED for f in ("pt2", "onnx")]))
def test_a_partly_converged_batch_exports_with_full_agreement(model, exported, solver,
                                                              stop_mode, fmt):
    x, _ = _batch()
    run, unrolled = exported(solver, stop_mode, fmt)
    with torch.no_grad():
        parity = compare(task_for(INFO), model.run(x, solver=_spec(solver, stop_mode)).out,
                         run(x), unrolled(x))
    assert parity.problems(max_diff=1e-4, min_agree=0.99) == [], parity
    assert parity.agreement == 1.0


@pytest.mark.parametrize("solver, stop_mode, kind, best_k, fmt", _slow_onnx_anderson(
    [("fixed_point", "rel", DIP, 2, f) for f in ("torch", "pt2", "onnx")]
    + [("anderson", "abs", DRIFT, 0, f) for f in ("torch", "pt2", "onnx")]))
def test_an_unconverged_sample_gets_its_best_iterate_not_its_last(
        model, exported, solver, stop_mode, kind, best_k, fmt):
    """DIP under fixed-point iteration: the best iterate is z_2, far from the last; DRIFT
    under Anderson with abs residuals: the start. The artefact returns it too, to float
    precision, on a batch of another size."""
    x, kinds = _batch(6)
    spec = _spec(solver, stop_mode)
    with torch.no_grad():
        out = model.run(x, solver=spec)
    eager, mine = out.out, kinds == kind
    assert not out.info.forward.converged[mine].any()
    best = _iterate(model, x, best_k)
    assert torch.allclose(eager[mine], best[mine], atol=1e-6)      # the library's answer
    if fmt == "torch":
        run = Unrolled.from_spec(model, spec.max_iter - 1, spec).eval()
    else:
        run, _ = exported(solver, stop_mode, fmt)
    with torch.no_grad():
        got = run(x)
    assert torch.allclose(got[mine], best[mine], atol=1e-5, rtol=0), (got - best)[mine]


def test_iters_past_the_eval_budget_is_named_when_parity_fails(run, tmp_path):
    """With samples that never reach tol, an artefact iterating past deq.eval.max_iter
    answers them with other iterates than the eager model: the hint says so (not "raise
    --iters", which would widen the gap), and the summary states the stop rule."""
    result = runner.invoke(app, ["export", str(run), "deq.eval.solver=fixed_point",
                                 "deq.eval.max_iter=3", "--format", "pt2", "--out",
                                 str(tmp_path / "m.pt2"), "--iters", "6", "--max-diff", "1e-12"])
    assert result.exit_code == 1, result.output
    assert "each sample stops at tol 0.001 rel and answers with its lowest-residual iterate" \
        in result.stdout
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: parity check failed")
    assert "--iters 6 runs past deq.eval.max_iter 3" in err and "raise --iters" not in err
    assert not (tmp_path / "m.pt2").exists()
