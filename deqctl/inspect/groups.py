"""Runs grouped by their settings, with figures over seeds: `deqctl compare` of a sweep.

Runs whose recipes differ only in `seed` form one group (or, with --group-by KEY,..., runs
sharing those keys' values); each group reports every figure of a run as mean, std and a
95% interval over its seeds, and two groups that share seeds are compared seed by seed
(the paired difference, later group minus the first). A group also says how stably it
trained: the share of its runs that diverged (a non-finite loss ended them) and their loss
spikes per 1000 steps. Where the groups differ in optim.lr as well, the stable
learning-rate range of each family of groups is the largest rate whose seeds all finished
without divergence within 1% of the family's best (1 point for a metric in [0, 1]).
"""

from __future__ import annotations

import difflib
import os
import statistics

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..engine.checkpoint import CheckpointError
from ..engine.rundir import is_run
from ..errors import quote
from ..files import read_json
from ..sweep.plan import PLAN_FILE as PLAN
from ..tasks import Metric
from .runs import RunSummary
from .stats import Estimate, estimate, paired

# keys that never tell runs apart for grouping: the seed is what a group averages over,
# and where a run logs to (log.*: trackers, a sweep's group name) changes nothing it learns
NOT_SETTINGS = ("seed", "name", "runtime.threads")
NOT_SETTING_BLOCKS = ("log.",)
# each figure of a run with the bounds its mean cannot leave, which cut its interval;
# None: the headline metric's (an accuracy's [0, 1]; any other metric is left open)
OPEN, NON_NEGATIVE, FRACTION = (None, None), (0.0, None), (0.0, 1.0)
FIGURES = {"final": None, "best": None, "target_wall_s": NON_NEGATIVE, "wall_s": NON_NEGATIVE,
           "peak_mem_mb": NON_NEGATIVE, "fwd_nfe": NON_NEGATIVE, "test_converged": FRACTION,
           "spikes_per_1k": NON_NEGATIVE}
PAIRED = ("final", "best", "target_wall_s", "wall_s", "peak_mem_mb", "fwd_nfe")
LR = "optim.lr"


def expand(paths: list[Path], warn: Callable[[str], None] | None = None) -> list[Path]:
    """The runs `paths` name: a run directory itself, a sweep's folder its points (in the
    plan's order), any other folder the run directories directly inside it. Each run
    once, under the first name it was given by (`warn` hears of the others): a run counted
    twice would be a second seed that never ran."""
    out = []
    for p in paths:
        if is_run(p):
            out.append(p)
            continue
        if not p.is_dir():
            raise CheckpointError(f"{p}: no such run directory or sweep")
        plan = p / PLAN
        if plan.is_file():
            try:
                names = [q["name"] for q in read_json(plan, 64 * 2**20)["points"]]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{plan}: unreadable sweep plan ({exc})") from None
            found = [p / n for n in names if is_run(p / n)]
        else:
            found = sorted(q for q in p.iterdir() if is_run(q))
        if not found:
            raise CheckpointError(f"{p}: holds no run directories (yet)")
        out.extend(found)
    return _once(out, warn)


def _once(runs: list[Path], warn: Callable[[str], None] | None) -> list[Path]:
    """`runs` without repeats: one folder by another spelling (a symlink, a trailing
    slash, a sweep and one of its points) is the same run."""
    first: dict[str, Path] = {}
    for run in runs:
        seen = first.setdefault(os.path.realpath(run), run)
        if seen is not run and warn is not None:
            warn(f"{run} is the run {seen} again; counted once")
    return list(first.values())


def is_sweep(folder: Path) -> bool:
    """True for a sweep's folder (it holds the sweep's plan)."""
    return (folder / PLAN).is_file()


@dataclass
class Group:
    """Runs of one setting: `settings` are the keys that tell it from the other groups."""

    settings: dict[str, Any]
    runs: list[RunSummary] = field(default_factory=list)

    @property
    def label(self) -> str:
        return label(self.settings)

    def by_seed(self, figure: str) -> dict[Any, float | None]:
        return {r.settings.get("seed", r.name): _value(r, figure) for r in self.runs}

    def figures(self) -> dict[str, Estimate | None]:
        metric = FRACTION if self.runs[0].task.headline.unit_interval else OPEN
        return {f: estimate((_value(r, f) for r in self.runs), within or metric)
                for f, within in FIGURES.items()}

    def divergence_rate(self) -> float:
        return sum(r.diverged for r in self.runs) / len(self.runs)

    def to_json(self) -> dict[str, Any]:
        figures = self.figures()
        return {"settings": self.settings, "n": len(self.runs),
                "runs": [r.name for r in self.runs],
                "divergence_rate": self.divergence_rate(),
                "reached_target": sum(r.target_step is not None for r in self.runs),
                **{f: e.to_json() if e else None for f, e in figures.items()}}


def _value(r: RunSummary, figure: str) -> float | None:
    if figure == "spikes_per_1k":
        return 1000 * r.spikes / r.steps if r.steps and r.spikes is not None else None
    return getattr(r, figure)


def group_runs(runs: list[RunSummary], by: list[str] | None = None) -> list[Group]:
    """Groups of runs in the order their first run was given: by the keys in `by`, else
    by every recipe key that differs between the runs except the seed. ValueError (one
    line) for a key in `by` that no run's recipe has: every run would share its None."""
    if by is not None:
        _known(runs, by)
    else:
        keys = sorted(k for k in {k for r in runs for k in r.settings} - set(NOT_SETTINGS)
                      if not k.startswith(NOT_SETTING_BLOCKS))
        by = [k for k in keys if len({_hashable(r.settings.get(k)) for r in runs}) > 1]
    groups: dict[tuple, Group] = {}
    for r in runs:
        key = tuple(_hashable(r.settings.get(k)) for k in by)
        groups.setdefault(key, Group({k: r.settings.get(k) for k in by})).runs.append(r)
    return list(groups.values())


def _known(runs: list[RunSummary], keys: list[str]) -> None:
    have = {k for r in runs for k in r.settings}
    for key in keys:
        if key not in have:
            close = difflib.get_close_matches(key, sorted(have), n=3)
            hint = (f"did you mean {', '.join(close)}?" if close
                    else "a dotted recipe key such as deq.mode or optim.lr")
            raise ValueError(f"--group-by: no run has the recipe key {quote(key)} ({hint})")


def _hashable(v: Any) -> Any:
    return repr(v) if isinstance(v, (list, dict)) else v


def paired_differences(groups: list[Group]) -> list[dict[str, Any]]:
    """Each group against its contrast, seed by seed, where they share two seeds or more:
    the earliest group that differs from it in one setting alone (one other than optim.lr
    where there is such a group: the learning rate has its stable range), else the first
    group. {"a", "b" (settings), "seeds", figure: Estimate of b - a, ...}."""
    out = []
    for i, g in enumerate(groups[1:], start=1):
        base = _contrast(g, groups[:i])
        row: dict[str, Any] = {"a": base.settings, "b": g.settings}
        seeds: list = []
        for f in PAIRED:
            est, shared = paired(base.by_seed(f), g.by_seed(f))
            row[f] = est
            seeds = shared if f == "final" else seeds
        if len(seeds) >= 2:
            row["seeds"] = seeds
            out.append(row)
    return out


def label(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "all runs"


def pair_labels(pair: dict[str, Any]) -> tuple[str, str, str]:
    """(b, a, where) of a paired difference: the settings the two groups differ in, and
    those they share ("" when none), so a line reads "where: b minus a"."""
    a, b = pair["a"], pair["b"]
    same = {k: v for k, v in a.items() if _hashable(b.get(k)) == _hashable(v)}
    return (label({k: v for k, v in b.items() if k not in same}),
            label({k: v for k, v in a.items() if k not in same}),
            label(same) if same else "")


def _contrast(g: Group, earlier: list[Group]) -> Group:
    def differing(other: Group) -> list[str]:
        return [k for k in g.settings if _hashable(g.settings[k]) != _hashable(other.settings.get(k))]
    single = [(differing(o) == [LR], o) for o in earlier if len(differing(o)) == 1]
    return min(single, key=lambda pair: pair[0])[1] if single else earlier[0]


def stable_lr_ranges(groups: list[Group], metric: Metric) -> list[dict[str, Any]]:
    """Per family of groups that differ in optim.lr alone: the rates tried and the
    largest stable one (every seed finished, none diverged, and the group's mean final
    `metric` within 1% of the family's best group mean; 1 point for a metric in [0, 1]
    such as accuracy). Means, not single seeds: a seed-to-seed spread wider than 1%
    would otherwise leave no rate stable."""
    higher_is_better = metric.higher_is_better
    if not any(LR in g.settings for g in groups):
        return []
    families: dict[tuple, list[Group]] = {}
    for g in groups:
        rest = tuple((k, _hashable(v)) for k, v in g.settings.items() if k != LR)
        families.setdefault(rest, []).append(g)
    out = []
    for rest, members in families.items():
        means = {id(g): statistics.fmean(finals) for g in members
                 if (finals := [r.final for r in g.runs if r.final is not None])}
        if not means:
            continue
        best = max(means.values()) if higher_is_better else min(means.values())
        slack = 0.01 if metric.unit_interval else 0.01 * abs(best)

        def ok(g: Group) -> bool:
            if any(r.diverged or r.final is None or not r.finished for r in g.runs):
                return False
            mean = means[id(g)]
            return mean >= best - slack if higher_is_better else mean <= best + slack

        rates = sorted((float(g.settings[LR]), ok(g)) for g in members)
        stable = [lr for lr, good in rates if good]
        out.append({"settings": dict(rest), "rates": [lr for lr, _ in rates],
                    "stable": stable, "largest_stable": max(stable) if stable else None,
                    "best": best})
    return out

