"""Evidence over seeds: Student-t intervals, loss spikes, and `compare` of a sweep grouped
by its settings, with paired differences, divergence and the stable learning rates."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from deqctl.cli import app
from deqctl.engine.stability import LossSpikes
from deqctl.inspect.groups import group_runs, pair_labels, paired_differences, stable_lr_ranges
from deqctl.inspect.stats import estimate, paired, t_quantile
from deqctl.tasks import Metric

from cli_helpers import RECIPE, runner, tiny

TINY = [o for o in tiny() if not o.startswith("runtime.threads")] + ["train.max_steps=3"]


@pytest.mark.parametrize("df, expected", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262),
                                          (29, 2.045), (10_000, 1.960)])
def test_t_quantiles_match_the_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)


def test_an_estimate_is_mean_std_and_the_t_interval():
    e = estimate([1.0, 2.0, 3.0, 4.0, None, math.nan])
    assert (e.mean, e.n) == (2.5, 4) and e.std == pytest.approx(1.2909944)
    half = 3.182446 * e.std / 2
    assert e.ci95 == pytest.approx((2.5 - half, 2.5 + half), rel=1e-5)
    # a rate cannot be negative: the interval of spikes seen by one seed of three stops at 0
    rate = estimate([0.0, 0.0, 3.0], within=(0.0, None))         # mean 1, std sqrt(3)
    assert rate.ci95 == pytest.approx((0.0, 1 + 4.302653), rel=1e-6)   # t(2) sqrt(3) / sqrt(3)
    assert estimate([0.9, 1.0, 1.0], within=(0.0, 1.0)).ci95[1] == 1.0
    one = estimate([7.0])
    assert one.std is None and one.ci95 is None and not one.excludes_zero()
    diff, seeds = paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.5, 1: 2.4, 2: 3.7, 3: 9.0})
    assert seeds == [0, 1, 2] and diff.mean == pytest.approx(0.5333333) and diff.excludes_zero()


def test_a_spike_is_a_loss_three_times_the_running_median():
    spikes = LossSpikes()
    assert spikes.count([1.0, 0.9, 0.8, 2.6, 3.0, 0.7]) == 1   # 3.0 > 3 x 0.95; 2.6 < 3 x 0.9
    assert spikes.count([math.nan, 3.0]) == 1                       # NaN is no spike
    again = LossSpikes(spikes.history)                              # what a checkpoint keeps
    assert again.count([3.5, 0.9]) == spikes.count([3.5, 0.9]) == 1     # 3.5 > 3 x 1.0


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> Path:
    """A DEQ and its explicit twin over three seeds, as a sweep."""
    out = tmp_path_factory.mktemp("twins") / "s"
    result = runner.invoke(app, ["sweep", RECIPE, *TINY, "deq.mode=implicit,unrolled",
                                 "--seeds", "0,1,2", "--out", str(out), "--jobs", "2",
                                 "--plain"])
    assert result.exit_code == 0, result.output
    return out


def compare_json(*args) -> dict:
    result = runner.invoke(app, ["compare", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_compare_groups_a_sweep_s_seeds_and_pairs_them(twins, tmp_path):
    report = compare_json(twins, "--target", "accuracy=0.05")
    runs = {r["name"]: r for r in report["runs"]}
    assert len(runs) == 6
    groups = {g["settings"]["deq.mode"]: g for g in report["groups"]}
    assert set(groups) == {"implicit", "unrolled"}
    for mode, g in groups.items():
        finals = [runs[f"mode={mode}_seed={s}"]["final"] for s in range(3)]
        f = g["final"]
        assert g["n"] == 3 and f["n"] == 3 and f["mean"] == pytest.approx(sum(finals) / 3)
        assert f["ci95"][0] <= f["mean"] <= f["ci95"][1] and f["std"] >= 0
        assert g["divergence_rate"] == 0 and g["spikes_per_1k"]["mean"] >= 0
    (pair,) = report["paired"]
    assert pair["a"] == {"deq.mode": "implicit"} and pair["b"] == {"deq.mode": "unrolled"}
    assert pair["seeds"] == [0, 1, 2]
    diffs = [runs[f"mode=unrolled_seed={s}"]["final"] - runs[f"mode=implicit_seed={s}"]["final"]
             for s in range(3)]
    assert pair["final"]["mean"] == pytest.approx(sum(diffs) / 3)
    # grouped by a key all runs share: one group of six
    (whole,) = compare_json(twins, "--group-by", "optim.lr")["groups"]
    assert whole["n"] == 6
    table = runner.invoke(app, ["compare", str(twins), "--plot", str(tmp_path / "g.png")])
    assert table.exit_code == 0, table.output
    assert "paired over seeds 0, 1, 2" in table.output and "± " in table.output
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_divergence_and_the_stable_learning_rates(tmp_path):
    out = tmp_path / "s"
    result = runner.invoke(app, ["sweep", RECIPE, *TINY, "optim.lr=1e-3,1e30", "--seeds", "0,1",
                                 "--out", str(out), "--jobs", "2", "--plain"])
    assert result.exit_code == 1                    # the 1e30 points diverged
    report = compare_json(out)
    groups = {g["settings"]["optim.lr"]: g for g in report["groups"]}
    assert groups[1e30]["divergence_rate"] == 1 and groups[1e-3]["divergence_rate"] == 0
    assert all(r["diverged"] for r in report["runs"] if "1e30" in r["name"])
    (lr,) = report["stable_lr"]
    assert lr["rates"] == [1e-3, 1e30] and 1e30 not in lr["stable"]
    text = runner.invoke(app, ["compare", str(out)]).output
    assert "stable learning rates" in text and "100%" in text


def test_a_report_answers_the_three_claims_with_intervals(twins, tmp_path):
    report = tmp_path / "r" / "report.md"
    result = runner.invoke(app, ["compare", str(twins), "--target", "accuracy=0.05",
                                 "--report", str(report)])
    assert result.exit_code == 0, result.output
    text = report.read_text()
    for heading in ("## Faster?", "## Less memory?", "## More stable?", "## Groups"):
        assert heading in text
    assert "deq.mode=unrolled minus deq.mode=implicit" in text
    assert "95% interval" in text and "of 3 run(s) diverged" in text
    assert (tmp_path / "r" / "report-curves.png").read_bytes()[:4] == b"\x89PNG"
    again = runner.invoke(app, ["compare", str(twins), "--report", str(report)])
    assert again.exit_code == 2 and "--force" in again.stderr       # never replaced unasked


def _fake_run(seed: int, final: float, **settings):
    return SimpleNamespace(settings={"seed": seed, **settings}, name=f"s{seed}", final=final,
                           best=final, target_wall_s=None, wall_s=10.0 + seed,
                           peak_mem_mb=1.0, fwd_nfe=5.0, diverged=False, finished=True)


def test_a_group_interval_of_accuracy_stops_at_100_percent_and_a_loss_is_left_open():
    def group(finals, unit_interval):
        runs = [_fake_run(s, f) for s, f in enumerate(finals)]
        task = SimpleNamespace(headline=Metric("m", "m", str, unit_interval=unit_interval))
        for r in runs:
            r.task, r.steps, r.spikes, r.test_converged = task, 100, 0, 1.0
        (g,) = group_runs(runs)
        return g.figures()
    accuracy = group([0.99, 1.0, 1.0], unit_interval=True)
    assert accuracy["final"].ci95[1] == accuracy["best"].ci95[1] == 1.0
    assert accuracy["final"].ci95[0] == pytest.approx(0.99667 - 4.302653 * 0.0057735 / 3 ** 0.5,
                                                      abs=1e-5)
    loss = group([0.99, 1.0, 1.0], unit_interval=False)
    assert loss["final"].ci95[1] > 1.0


def test_each_group_is_paired_with_the_group_differing_in_one_setting_not_the_lr():
    runs = [_fake_run(s, 0.5 + 0.01 * s + (0.1 if mode == "u" else 0) + lr,
                      **{"deq.mode": mode, "optim.lr": lr})
            for lr in (0.001, 0.01) for mode in ("i", "u") for s in (0, 1, 2)]
    groups = group_runs(runs)
    pairs = {(pair_labels(p)): p["final"].mean for p in paired_differences(groups)}
    assert pairs == pytest.approx({
        ("deq.mode=u", "deq.mode=i", "optim.lr=0.001"): 0.1,
        ("optim.lr=0.01", "optim.lr=0.001", "deq.mode=i"): 0.009,
        ("deq.mode=u", "deq.mode=i", "optim.lr=0.01"): 0.1})     # not lr=0.01 vs lr=0.001


def test_a_stable_rate_is_judged_by_its_group_mean_not_by_its_worst_seed():
    # seeds 2% apart: no single seed is within 1% of the best seed, the means are
    runs = [_fake_run(s, 0.50 + 0.01 * s + d, **{"optim.lr": lr})
            for lr, d in ((1e-3, 0.0), (1e-2, 0.003), (1e-1, 0.05)) for s in (0, 1, 2)]
    (lr,) = stable_lr_ranges(group_runs(runs), Metric("mae", "mae", str, higher_is_better=False))
    assert lr["stable"] == [1e-3, 1e-2] and lr["largest_stable"] == 1e-2
