"""`deqctl compare RUN [RUN ...] [--plot out.png] [--json] [--target METRIC=VALUE]`"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import quote
from ..inspect.groups import expand, group_runs, is_sweep, paired_differences, stable_lr_ranges
from ..inspect.runs import RunSummary, same_task, summarise_all
from ..inspect.stats import Estimate
from ..ui import plot_groups, plot_runs
from ..ui.fmt import fmt_float, fmt_int, fmt_pct
from ..files import Output, check_outputs
from ..inspect.report import render
from ..numbers import strict_json
from .common import USAGE, fail, reader_may_leave, user_errors
from .compare_groups import group_table, lr_lines, paired_lines


@user_errors
@reader_may_leave()        # `deqctl compare RUNS | head`: the reader has what it wanted
def compare(
    runs: List[Path] = typer.Argument(..., help="run directories or sweep folders (e.g. a DEQ "
                                      "and its deq.mode=unrolled twin, over seeds)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a PNG: loss and metric against "
                                        "step and training time, forward NFE and residual "
                                        "(per group: the mean over seeds with a +-1 std band)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON document on stdout, nothing else"),
    target: Optional[str] = typer.Option(None, "--target", help="METRIC=VALUE, e.g. accuracy=0.97: "
                                         "when each run first reached it (step, training time)"),
    group_by: Optional[str] = typer.Option(None, "--group-by", help="KEY[,KEY]: group runs by "
                                           "these recipe keys (default: runs that differ only "
                                           "in seed form a group)"),
    report: Optional[Path] = typer.Option(None, "--report", help="write a Markdown report "
                                          "answering faster / less memory / more stable, "
                                          "with its plot beside it (NAME-curves.png)"),
    force: bool = typer.Option(False, "--force", help="replace --plot / --report if they exist"),
) -> None:
    """Compare runs: final and best metric, training time, time to a target, peak memory,
    forward NFE and convergence; over seeds, each group's mean, std and 95% interval, the
    paired difference between groups, divergences, loss spikes and the stable lr range."""
    wanted = _parse_target(target) if target is not None else None
    by = [k.strip() for k in group_by.split(",") if k.strip()] if group_by is not None else None
    if by is not None and not by:
        fail("--group-by: name at least one recipe key, e.g. deq.mode", USAGE)
    warn = lambda text: typer.echo(f"warning: {text}", err=True)   # noqa: E731
    paths = expand(runs, warn)
    # nothing compare reads is an output: a run's folder, a sweep's (its plan, its lock)
    folders = (*paths, *(p for p in runs if is_sweep(p)))
    figure = Output(plot, force, "--plot", tuple(paths), folders) if plot is not None else None
    written = _report_outputs(report, force, paths, folders)
    check_outputs([o for o in (figure, *written) if o is not None])
    try:    # unreadable runs, runs of other tasks, a target that is no metric, a
        summaries = summarise_all(paths, wanted, warn)     # --group-by key no run has
        same_task(summaries)
        groups = group_runs(summaries, by)
    except ValueError as exc:
        fail(str(exc), USAGE)
    head = summaries[0].task.headline
    grouped = by is not None or any(len(g.runs) > 1 for g in groups)
    result = {"task": summaries[0].task.name, "metric": head.key,
              "higher_is_better": head.higher_is_better,
              "target": None if wanted is None else {"metric": wanted[0], "value": wanted[1]},
              "runs": [s.to_json() for s in summaries],
              "groups": [g.to_json() for g in groups],
              "paired": [_paired_json(p) for p in paired_differences(groups)],
              "stable_lr": stable_lr_ranges(groups, head)}
    draw = _drawer(summaries, groups, grouped, head)
    if figure is not None:
        with figure.writing() as tmp:
            draw(tmp)
        result["plot"] = str(plot)
    if written:
        doc, curves = written
        with curves.writing() as tmp:
            draw(tmp)
        with doc.writing() as tmp:
            tmp.write_text(render(groups, result["paired"], result["stable_lr"],
                                  head, wanted, [str(r) for r in runs], result["task"],
                                  curves.path.name), encoding="utf-8")
        result["report"] = str(report)
    if as_json:
        typer.echo(json.dumps(strict_json(result), allow_nan=False))
        return
    console = Console()
    if not console.is_terminal:     # a log file or pipe: no truncated cells
        console = Console(width=200)
    console.print(_table(summaries, wanted))
    if grouped:
        console.print(group_table(groups, head, wanted))
        for line in paired_lines(result["paired"], head) + lr_lines(result["stable_lr"], head):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    if plot is not None:
        typer.echo(f"plot: {result['plot']}")
    if written:
        typer.echo(f"report: {report} (plot beside it: {written[1].path})")


def _report_outputs(report: Path | None, force: bool, reading: list[Path],
                    folders: tuple[Path, ...]) -> tuple[Output, ...]:
    """--report and the plot beside it (NAME-curves.png), or nothing."""
    if report is None:
        return ()
    curves = report.with_name(f"{report.stem}-curves.png")
    return (Output(report, force, "--report", tuple(reading), folders),
            Output(curves, force, "--report", tuple(reading), folders))


def _drawer(summaries: list[RunSummary], groups, grouped: bool, head):
    """Draw the comparison into a PNG path: per group over seeds, else per run."""
    label = f"test {head.key}"

    def draw(path: Path) -> None:
        if grouped:
            plot_groups([{"name": g.label, "runs": [{"train": r.train, "evals": r.evals}
                                                     for r in g.runs]} for g in groups],
                        path, metric=head.key, metric_label=label,
                        log_metric=head.key in ("ppl",))
        else:
            plot_runs([{"name": s.name, "train": s.train, "evals": s.evals} for s in summaries],
                      path, metric=head.key, metric_label=label, log_metric=head.key in ("ppl",))
    return draw


def _paired_json(p: dict) -> dict:
    return {k: (v.to_json() if isinstance(v, Estimate) else v) for k, v in p.items()}


def _parse_target(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    try:
        if not sep or not key or not math.isfinite(float(value)):
            raise ValueError
        return key.strip(), float(value)
    except ValueError:
        fail(f"--target: expected METRIC=VALUE such as accuracy=0.97 (got {quote(text)})", USAGE)


def _table(runs: list[RunSummary], target: tuple[str, float] | None) -> Table:
    head = runs[0].task.headline
    better = "higher" if head.higher_is_better else "lower"
    table = Table(title=f"{runs[0].task.name}: final and best test {head.key} ({better} is "
                        f"better); time: training time in s, evaluations excluded; conv: "
                        f"training solves converged, first -> last logged interval")
    cols = ["run", "mode", "final", "best", "steps", "time"]
    if target is not None:
        cols.append(f"to {target[0]}={target[1]:g}")
    cols += ["peak MB", "NFE", "conv", "test conv"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("run", "mode") else "right",
                         no_wrap=c != "run", min_width=12 if c == "run" else None)
    for r in runs:
        cells = [r.name, r.mode, head.fmt(r.final), head.fmt(r.best), str(r.steps),
                 fmt_int(r.wall_s)]
        if target is not None:
            cells.append(f"{fmt_int(r.target_wall_s)} s @{r.target_step}"
                         if r.target_step is not None else "never")
        cells += [fmt_int(r.peak_mem_mb), fmt_float(r.fwd_nfe, 3),
                  f"{fmt_pct(r.converged_start)}->{fmt_pct(r.converged_end)}",
                  fmt_pct(r.test_converged)]
        table.add_row(*cells)
    return table
