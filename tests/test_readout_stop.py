"""Stopping a solve on its readout (deq.eval.stop_mode kl / argmax): the tracker's rule, for
every solver; its settings and refusals; eval's report against the residual stop; generate
per token."""

from __future__ import annotations

import json

import pytest
import torch

from deqctl.cli import app
from deqctl.implicit import DEQ
from deqctl.implicit.settings import deq_settings
from deqctl.options import OptionsError
from deqctl.solvers import ReadoutStop, solve

from cli_helpers import runner

pytestmark = pytest.mark.usefixtures("one_thread")


def slow_contraction(batch: int = 6, dim: int = 8, rate: float = 0.9):
    """z -> rate * z + b: the residual shrinks by `rate` per step, so a tight tolerance takes
    ~100 steps; the fixed point b / (1 - rate) has a clear argmax in its first classes,
    reached long before the residual is small."""
    torch.manual_seed(0)
    b = torch.randn(batch, dim)
    b[:, 0] += 3.0 * torch.arange(batch) % 2 + 1.0       # class 0 wins by a margin
    return (lambda z: rate * z + b), torch.zeros(batch, dim), b / (1 - rate)


def head(z: torch.Tensor, idx=None) -> torch.Tensor:
    """Log-probabilities over the first 4 coordinates, as logits."""
    return torch.log_softmax(z[:, :4], dim=-1)


def picard(tr, z):
    """A user's solver, knowing nothing of readouts: plain fixed-point iteration."""
    while True:
        fz, _ = tr.evaluate(z)
        if tr.finished():
            return
        z = tr.freeze(fz, z)


@pytest.mark.parametrize("method", ["anderson", "fixed_point", "broyden", picard])
@pytest.mark.parametrize("rule", [ReadoutStop("argmax", patience=2), ReadoutStop("kl", 1e-4)])
def test_every_solver_stops_on_the_readout_and_keeps_honest_residuals(method, rule):
    f, z0, z_star = slow_contraction()
    ref = solve(f, z0, method, tol=1e-8, max_iter=300)
    res = solve(f, z0, method, tol=1e-8, max_iter=300, readout=rule.using(head))
    # (quasi-Newton solvers solve this linear map exactly within a few steps)
    assert res.nfe < (0.7 * ref.nfe if method in ("fixed_point", picard) else ref.nfe)
    assert bool(res.readout_stopped.any())
    assert (res.sample_nfe <= ref.sample_nfe).all()
    # the same predictions as the residual-stopped answer
    assert torch.equal(head(res.z).argmax(-1), head(ref.z).argmax(-1))
    # residuals are the true ones of the returned iterate: not converged at 1e-8
    true = torch.linalg.vector_norm(f(res.z) - res.z, dim=1)
    assert torch.allclose(res.abs_residual, true, rtol=1e-4)
    stopped = res.readout_stopped
    assert not bool(res.converged[stopped].any())
    assert bool((res.rel_residual[stopped] > 1e-8).all())
    assert ref.readout_stopped is None and bool(ref.converged.all())


def test_a_tighter_kl_tolerance_iterates_longer():
    f, z0, _ = slow_contraction()
    nfe = [solve(f, z0, "fixed_point", tol=1e-8, max_iter=300,
                 readout=ReadoutStop("kl", tol).using(head)).nfe for tol in (1e-2, 1e-4, 1e-6)]
    assert nfe[0] < nfe[1] < nfe[2]


def test_samples_stop_on_their_own_readout_and_positions_all_count():
    """Two positions per sample. Sample 0's logits race to a margin of 20 at both; sample
    1's second position creeps to a margin of 1, its distribution changing for longer, so
    sample 1 runs on after sample 0 stops: and would not without that position."""
    a = torch.tensor([[2.0, 0.0, 2.0, 0.0], [2.0, 0.0, 0.0, 0.1]])   # fixed points / 10

    def f(z):
        return 0.9 * z + a

    def per_position(z, idx=None):
        return torch.log_softmax(z.view(-1, 2, 2), dim=-1)   # (b, positions, classes)

    rule = ReadoutStop("kl", kl_tol=1e-5)
    res = solve(f, torch.zeros(2, 4), "fixed_point", tol=1e-9, max_iter=200,
                readout=rule.using(per_position))
    assert bool(res.readout_stopped.all())
    assert res.sample_nfe[0] < 12 < 18 < res.sample_nfe[1] < 40
    first = solve(f, torch.zeros(2, 4), "fixed_point", tol=1e-9, max_iter=200,
                  readout=rule.using(lambda z, idx=None: per_position(z)[:, :1]))
    assert first.sample_nfe[1] == first.sample_nfe[0] == res.sample_nfe[0]


def test_compact_solves_read_only_the_running_samples():
    f, z0, _ = slow_contraction()
    seen = []

    def head_seen(z, idx=None):
        seen.append(None if idx is None else idx.tolist())
        return head(z)

    rule = ReadoutStop("argmax", patience=2)
    res = solve(lambda z, idx=None: f(z) if idx is None else f(torch.zeros(6, 8).index_copy(
        0, idx, z))[idx], z0, "fixed_point", tol=1e-8, max_iter=300, compact=True,
        readout=rule.using(head_seen))
    full = solve(f, z0, "fixed_point", tol=1e-8, max_iter=300, readout=rule.using(head))
    assert torch.equal(res.sample_nfe, full.sample_nfe)
    assert any(s is not None and len(s) < 6 for s in seen)     # compacted reads happened


def test_a_tuple_state_is_read_as_its_parts():
    f, z0, _ = slow_contraction()
    halves = lambda z: tuple(t.contiguous() for t in z.split(4, dim=1))
    g = lambda parts: halves(f(torch.cat(parts, dim=1)))
    res = solve(g, halves(z0), "anderson", tol=1e-8, max_iter=300,
                readout=ReadoutStop("argmax").using(lambda parts, idx=None: head(parts[0])))
    assert bool(res.readout_stopped.all()) and isinstance(res.z, tuple)


def test_settings_keep_readout_stops_to_evaluation():
    s = deq_settings({"eval": {"stop_mode": "kl", "kl_tol": 1e-4}})
    assert s.eval_settings().stop_mode == "rel"           # the residual's measure stays
    assert s.eval.readout_stop() == ReadoutStop("kl", 1e-4, 4)
    assert "stops on its readout (kl < 0.0001)" in s.describe_eval()
    assert deq_settings({"eval": {"stop_mode": "abs"}}).eval.readout_stop() is None
    for block in ("forward", "backward"):
        with pytest.raises(OptionsError) as err:
            deq_settings({block: {"stop_mode": "argmax"}})
        assert f"{block}.stop_mode" in str(err.value) and "inference stop" in str(err.value)
    with pytest.raises(OptionsError, match="no solve to stop"):
        deq_settings({"mode": "unrolled", "eval": {"stop_mode": "kl"}})
    with pytest.raises(ValueError, match="patience"):
        ReadoutStop("argmax", patience=0)


def test_training_solves_never_stop_on_the_readout():
    deq = DEQ(eval={"stop_mode": "argmax", "patience": 1})
    f, z0, _ = slow_contraction()
    cell = lambda z, u: f(z)
    deq.train()
    _, info = deq(cell, None, z0, readout=head)
    assert info.forward.readout_stopped is None
    deq.eval()
    with torch.no_grad():
        _, info = deq(cell, None, z0, readout=head)
    assert info.forward.readout_stopped is not None


# -- commands -----------------------------------------------------------------------------

def eval_json(*args: str) -> dict:
    result = runner.invoke(app, ["eval", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_eval_reports_nfe_saved_and_agreement_with_the_residual_stop(run):
    plain = eval_json(str(run))
    got = eval_json(str(run), "deq.eval.stop_mode=argmax", "deq.eval.patience=2")
    r = got["readout"]
    assert r["stop_mode"] == "argmax" and r["patience"] == 2
    assert r["residual_fwd_nfe"] == pytest.approx(plain["fwd_nfe"], rel=1e-6)
    assert r["fwd_nfe"] == pytest.approx(got["fwd_nfe"], rel=1e-6)
    assert r["nfe_ratio"] == pytest.approx(r["fwd_nfe"] / r["residual_fwd_nfe"])
    assert r["nfe_saved"] == pytest.approx(1 - r["nfe_ratio"])
    assert 0 <= r["agreement"] <= 1 and 0 <= r["readout_stopped"] <= 1
    assert got["solver"]["stop_mode"] == "rel"
    table = runner.invoke(app, ["eval", str(run), "deq.eval.stop_mode=kl"])
    assert table.exit_code == 0, table.output
    assert "agreement with residual stop" in table.output and "kl < 0.0001" in table.output
    sweep = eval_json(str(run), "deq.eval.stop_mode=kl", "--sweep-iters", "2,8")
    assert all("agreement" in row["readout"] for row in sweep["sweep"])


def test_a_readout_stop_for_training_or_a_forecast_is_refused_in_one_line(run, tmp_path):
    from cli_helpers import RECIPE, tiny
    bad = runner.invoke(app, ["train", RECIPE, *tiny(), "deq.forward.stop_mode=kl",
                              "--out", str(tmp_path / "r")])
    assert bad.exit_code == 2 and "deq.forward.stop_mode" in bad.output
    assert "inference stop" in bad.output and "Traceback" not in bad.output
    from pathlib import Path
    co2 = Path(__file__).parent.parent / "configs" / "co2-forecast-deq.yaml"
    bad = runner.invoke(app, ["train", str(co2), "train.max_steps=1", "runtime.threads=1",
                              "deq.eval.stop_mode=argmax", "--out", str(tmp_path / "f")])
    assert bad.exit_code == 2, bad.output
    assert "deq.eval.stop_mode=argmax" in bad.output and "no distribution" in bad.output


def test_generate_stops_each_token_on_its_next_token_distribution():
    """Per token: the readout is the last position's distribution; compared with the
    residual stop on the same context and start, it takes fewer evaluations."""
    from deqctl.data import DataInfo
    from deqctl.implicit import SolveSpec
    from deqctl.models import build_model
    from deqctl.predict.generate import Generator, Sampler
    from deqctl.recipe import validate

    info = DataInfo(name="t", task="lm", inputs="tokens", shape=(12,), tokenizer="byte")
    recipe = validate({"model": {"name": "transformer_deq", "d_model": 16, "heads": 2,
                                 "d_ff": 32},
                       "data": {"name": "shakespeare", "tokenizer": "byte"},
                       "deq": {"eval": {"stop_mode": "kl", "kl_tol": 1e-3}}})
    torch.manual_seed(0)
    model = build_model(recipe, info).eval()
    tight = SolveSpec(solver="fixed_point", max_iter=100, tol=1e-6, stop_mode="rel")
    gen = Generator(model, solver=tight, device=torch.device("cpu"), compare=True)
    out = list(gen.generate([72, 101, 108, 108, 111], 16, Sampler(greedy=True)))
    assert all(t.residual_nfe is not None and t.agrees is not None for t in out)
    assert sum(t.nfe for t in out) < sum(t.residual_nfe for t in out)
    assert sum(t.agrees for t in out) >= 15
    plain = Generator(model, solver=tight, device=torch.device("cpu"))
    first = next(plain.generate([72, 101, 108, 108, 111], 1, Sampler(greedy=True)))
    assert first.residual_nfe is None and first.nfe == out[0].nfe


def test_the_audit_reports_agreement_apart_where_the_residual_solve_converged():
    from types import SimpleNamespace

    from deqctl.models.base import ReadoutAudit
    audit = ReadoutAudit(lambda a, b: a.argmax(-1) == b.argmax(-1))
    out = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    ref_out = torch.tensor([[1.0, 0.0], [0.0, 1.0]])      # sample 1 disagrees ...
    solve = SimpleNamespace(sample_nfe=torch.tensor([3, 5]), nfe=5,
                            readout_stopped=torch.tensor([True, False]))
    ref = SimpleNamespace(sample_nfe=torch.tensor([6, 10]), nfe=10,
                          converged=torch.tensor([True, False]))   # ... and had no fixed point
    audit.add(out, ref_out, solve, ref)
    got = audit.summary()
    assert got["agreement"] == 0.5 and got["agreement_converged"] == 1.0
    assert got["nfe_ratio"] == pytest.approx(8 / 16) and got["readout_stopped"] == 0.5
