"""`deqctl solve-trace RUN_OR_CHECKPOINT_OR_RECIPE [key=value ...] [--solvers ...] [--backward]`"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from ..implicit import SolveSpec
from ..implicit.spec import bf16_problem
from ..inspect import (EVAL_OVERRIDES, SolverTrace, TraceReport, is_recipe, open_source,
                       trace_model)
from ..inspect.gradaudit import GradAudit, audit_gradient
from ..inspect.source import Source
from ..inspect.starts import StartsReport, path_independence
from ..inspect.trace import BaselineReport, trace_baseline
from ..implicit.settings import SolverSettings
from ..solvers import SOLVERS
from ..ui import plot_starts, plot_traces, sparkline
from ..ui.fmt import fmt_ms, fmt_pct, fmt_sci
from ..files import Output, check_outputs
from ..limits import ITER_LIMIT
from .common import (TRUST_CODE, USAGE, fail, residual_stops_only, say_user_code, split_args,
                     user_errors)

SOLVERS_DEFAULT = "anderson,broyden,fixed_point"
POWER_ITERS_DEFAULT = 100


@user_errors
def solve_trace(
    args: Optional[List[str]] = typer.Argument(
        None, help="RUN_OR_CHECKPOINT or RECIPE.yaml (untrained model), then overrides "
                   "key=value (for a trained model: data.*, deq.eval.*, runtime.*, and "
                   "deq.backward.* for --backward and --grad)"),
    solvers: Optional[str] = typer.Option(None, "--solvers", help="comma-separated solvers "
                                          f"to compare (default: {SOLVERS_DEFAULT})"),
    batch: int = typer.Option(32, "--batch", min=1, help="test samples in the batch"),
    max_iter: Optional[int] = typer.Option(None, "--max-iter", min=1, max=ITER_LIMIT,
                                           help="evaluation budget (default: eval / backward settings)"),
    tol: Optional[float] = typer.Option(None, "--tol", min=0.0,
                                        help="tolerance (default: eval / backward settings)"),
    backward: bool = typer.Option(False, "--backward", help="also trace the adjoint (IFT) solve"),
    power_iters: Optional[int] = typer.Option(None, "--power-iters", min=4, max=ITER_LIMIT,
                                              help="power-iteration steps for the spectral "
                                                   f"radius (default: {POWER_ITERS_DEFAULT})"),
    starts: int = typer.Option(0, "--starts", min=0, max=1000,
                               help="also solve from K random starts: is the fixed point unique?"),
    grad: bool = typer.Option(False, "--grad", help="audit the training gradient against "
                              "the exact implicit one (float64, tight solves)"),
    min_cos: Optional[float] = typer.Option(None, "--min-cos", min=-1.0, max=1.0,
                                            help="with --grad: exit 1 below this cosine "
                                                 "(over the samples with a fixed point)"),
    max_no_fixed_point: Optional[float] = typer.Option(
        None, "--max-no-fixed-point", min=0.0, max=1.0, metavar="FRACTION",
        help="with --grad: exit 1 when more samples than this have no fixed point"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a PNG of residual vs iteration"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the traces as JSON"),
    force: bool = typer.Option(False, "--force", help="replace --plot / --json files that exist"),
    trust_code: bool = TRUST_CODE,
) -> None:
    """Compare solvers on a real batch: true residual per iteration, NFE and time to tol,
    spectral radius of df/dz at z* next to fixed-point iteration's observed rate."""
    path, overrides = split_args(args)
    if path is None:
        fail("missing RUN_OR_CHECKPOINT or RECIPE.yaml", USAGE)
    # what configures a fixed-point solve, given or not: a baseline has none to configure
    solve_options = {"--solvers": solvers is not None, "--max-iter": max_iter is not None,
                     "--tol": tol is not None, "--backward": backward,
                     "--power-iters": power_iters is not None, "--starts": starts > 0,
                     "--grad": grad, "--min-cos": min_cos is not None,
                     "--max-no-fixed-point": max_no_fixed_point is not None,
                     "--plot": plot is not None}
    names = [s.strip() for s in (solvers or SOLVERS_DEFAULT).split(",") if s.strip()]
    if not names:
        fail("--solvers: name at least one solver, e.g. anderson,broyden", USAGE)
    if tol is not None and not 0 < tol < math.inf:
        fail("--tol must be a finite number > 0", USAGE)
    outputs = _outputs(plot, json_path, backward, starts > 0, force, Path(path))  # refused before any work
    src = open_source(path, overrides, allow_recipe=True, trust_code=trust_code,
                      allowed=(*EVAL_OVERRIDES, "deq.backward"))   # weights fix the rest
    residual_stops_only(src, "solve-trace")
    if is_recipe(path):
        say_user_code(src.recipe)       # as train does: importing it is the first thing said
    if src.progress:
        typer.echo(f"note: {src.progress}", err=True)
    if src.recipe.deq.mode == "baseline":
        _refuse_solve_options([k for k, given in solve_options.items() if given])
        _baseline(src, path, batch, outputs)
        return
    _check_solvers(names, src.recipe)
    x, y = src.batch("test", batch)
    update = {k: v for k, v in (("max_iter", max_iter), ("tol", tol)) if v is not None}
    if tol is not None and (problem := bf16_problem(
            tol, src.recipe.deq.eval_settings().bf16_until, "--tol")):
        fail(f"deq.forward.bf16_until: {problem}", USAGE)
    fwd = _specs(src.recipe.deq.eval_settings(), names, update)
    bwd = _specs(src.recipe.deq.backward, names, update) if backward else []
    console = Console()
    _header(src, x)
    if (deq := src.recipe.deq).fixed_depth:
        depth = deq.explicit_depth if deq.mode == "unrolled" else deq.eval_settings().max_iter
        typer.echo(f"{deq.describe_eval()}: it answers with {depth} applications of its cell; "
                   f"the traces solve that cell to its fixed point")
    report = trace_model(src.model, src.task, x, y, fwd, bwd,
                         power_iters=power_iters or POWER_ITERS_DEFAULT)
    fwd, bwd = fwd[0], (bwd[0] if bwd else None)

    console.print(_solver_table("forward", report.forward, fwd))
    console.print(_iteration_table(report.forward, fwd))
    if report.backward is not None:
        console.print(_solver_table("backward (adjoint)", report.backward, bwd))
    typer.echo(_contraction_line(report))
    unique = path_independence(src.model, src.task, x, fwd, starts) if starts else None
    if unique is not None:
        typer.echo(_starts_line(unique, fwd))
    audit = (audit_gradient(src.model, src.task, x, y)
             if grad or min_cos is not None or max_no_fixed_point is not None else None)
    if audit is not None:
        console.print(_grad_table(audit))
        typer.echo(audit.line())
    if "plot" in outputs:
        _plots(outputs, report, fwd, bwd, unique)
    if "json" in outputs:
        _write_json(outputs["json"], src, path, {
            **report.to_json(), "starts": unique.to_json() if unique is not None else None,
            "grad": audit.to_json() if audit is not None else None})
    failures = audit.failures(min_cos, max_no_fixed_point) if audit is not None else []
    if failures:
        fail("; ".join(failures), 1)


def _header(src: Source, x: torch.Tensor) -> None:
    typer.echo(f"{src.label}: {x.shape[0]} test samples, device {src.device} ({src.device_reason})")


def _refuse_solve_options(given: list[str]) -> None:
    """Exit 2 naming every solve option given for a baseline (none given: nothing to say)."""
    if given:
        fail(f"{', '.join(given)}: a baseline (deq.mode=baseline) is an explicit network "
             f"evaluated once, with no fixed point to solve, trace or audit; leave "
             f"{'it' if len(given) == 1 else 'them'} out", USAGE)


def _baseline(src: Source, path: str, batch: int, outputs: dict[str, Output]) -> None:
    """What applies to an explicit baseline, in one line: its one evaluation of the batch
    (and that in the --json file)."""
    x, _ = src.batch("test", batch)
    _header(src, x)
    r: BaselineReport = trace_baseline(src.model, x)
    typer.echo(f"explicit baseline {r.network}: one evaluation ({r.batch} samples in "
               f"{fmt_ms(r.time_s)} ms), no fixed point, so no solver trace and no spectral "
               f"radius")
    if "json" in outputs:
        _write_json(outputs["json"], src, path, r.to_json())


def _write_json(out: Output, src: Source, path: str, report: dict) -> None:
    data = {"source": src.label, "untrained": is_recipe(path), "mode": src.recipe.deq.mode,
            **report}
    with out.writing() as tmp:
        tmp.write_text(json.dumps(data, indent=1, allow_nan=False))
    typer.echo(f"json: {out.path}")


def _plots(outputs: dict[str, Output], report: TraceReport, fwd: SolveSpec,
           bwd: SolveSpec | None, unique: StartsReport | None) -> None:
    """The forward solve's residuals by iteration, and beside it the adjoint's and the
    distances between the fixed points reached from random starts."""
    with outputs["plot"].writing() as tmp:
        plot_traces({k: _residuals(t, fwd)[0] for k, t in report.forward.items()}, tmp,
                    tol=fwd.tol, ylabel=f"{fwd.stop_mode} residual (median over batch)",
                    title=f"forward solve, {report.batch} samples")
    written = [outputs["plot"].path]
    if report.backward is not None:
        with outputs["backward"].writing() as tmp:
            plot_traces({k: _residuals(t, bwd)[0] for k, t in report.backward.items()},
                        tmp, tol=bwd.tol, title="adjoint solve",
                        ylabel=f"{bwd.stop_mode} residual (median over batch)")
        written.append(outputs["backward"].path)
    if unique is not None:
        s = unique.summary()
        with outputs["starts"].writing() as tmp:
            plot_starts(unique.distance.tolist(), tmp, title=(
                f"{s['starts']} random starts: prediction agreement "
                f"{fmt_pct(s['prediction_agreement'])}, unique {fmt_pct(s['unique'])}"))
        written.append(outputs["starts"].path)
    typer.echo(f"plot: {', '.join(map(str, written))}")


def _outputs(plot: Path | None, json_path: Path | None, backward: bool, starts: bool,
             force: bool, reading: Path) -> dict[str, Output]:
    """The files this trace will write, each checked now: the forward plot, beside it the
    adjoint's (NAME-backward.png) with --backward and the starts' (NAME-starts.png) with
    --starts, and the JSON; never the file read."""
    outputs = {}
    if plot is not None:
        outputs["plot"] = Output(plot, force, "--plot", (reading,))
        for kind, wanted in (("backward", backward), ("starts", starts)):
            if wanted:
                outputs[kind] = Output(plot.with_name(f"{plot.stem}-{kind}"
                                                      f"{plot.suffix or '.png'}"), force,
                                       "--plot", (reading,))
    if json_path is not None:
        outputs["json"] = Output(json_path, force, "--json", (reading,))
    check_outputs(list(outputs.values()))
    return outputs


def _check_solvers(names: list[str], recipe) -> None:
    """Exit 2 unless every name is a built-in solver or one the recipe names."""
    valid = [*SOLVERS.builtins, *(p.ref for k, p in recipe.user_code().items()
                                  if k.startswith("deq."))]
    unknown = [n for n in names if n not in valid]
    if unknown:
        fail(f"--solvers: unknown solver {', '.join(unknown)} (valid: {', '.join(valid)})",
             USAGE)


def _specs(settings: SolverSettings, names: list[str], update: dict) -> list[SolveSpec]:
    """One spec per solver: the recipe block's budget and tolerance (with the command's
    --max-iter / --tol), and each solver's own knobs from that block."""
    return [settings.model_copy(update={**update, "solver": name}).spec() for name in names]


def _residuals(t: SolverTrace, s: SolveSpec) -> tuple[list[float], list[float]]:
    return (t.rel_median, t.rel_max) if s.stop_mode == "rel" else (t.abs_median, t.abs_max)


def _solver_table(title: str, traces: dict[str, SolverTrace], s: SolveSpec) -> Table:
    table = Table(title=f"{title}: {s.stop_mode} residual, tol {s.tol:g}, max_iter "
                        f"{s.max_iter}; times in ms")
    # sized to fit an 80-column terminal (or log file) without truncation
    table.add_column("solver", no_wrap=True, min_width=11)
    for col, width in (("NFE", 3), ("conv", 5), ("final", 7), ("ms", 4), ("to tol", 6)):
        table.add_column(col, justify="right", no_wrap=True, min_width=width)
    table.add_column("median by iter (log)", no_wrap=True, min_width=20)
    for name, t in traces.items():
        median, _ = _residuals(t, s)
        final = t.rel_residual if s.stop_mode == "rel" else t.abs_residual
        table.add_row(name, str(t.nfe), fmt_pct(t.converged), fmt_sci(final), fmt_ms(t.time_s),
                      fmt_ms(t.time_to_tol_s), sparkline(median, width=20))
    return table


def _iteration_table(traces: dict[str, SolverTrace], s: SolveSpec) -> Table:
    """Median / max residual at roughly log-spaced iterations (1, 2, 3, 4, 6, 8, 12, ...)."""
    longest = max(len(t.rel_median) for t in traces.values())
    table = Table(title=f"{s.stop_mode} residual by iteration (median / max over the batch; "
                        f"- once every sample has stopped)")
    table.add_column("iter", justify="right")
    for name in traces:
        table.add_column(name, justify="right")
    for i in _thin(longest):
        cells = []
        for t in traces.values():
            median, mx = _residuals(t, s)
            cells.append(f"{fmt_sci(median[i])} / {fmt_sci(mx[i])}" if i < len(median)
                         and not math.isnan(median[i]) else "-")
        table.add_row(str(i + 1), *cells)
    return table


def _thin(n: int) -> list[int]:
    """0-based iteration indices to show: 1, 2, 3, 4, 6, 8, 12, 16, ... and the last."""
    shown, k = [], 1
    while k <= n:
        shown.append(k)
        k = k + 1 if k < 4 else (k * 3 // 2 if k & (k - 1) == 0 else k * 4 // 3)
    if n not in shown:
        shown.append(n)
    return [i - 1 for i in shown]


def _grad_table(a: GradAudit) -> Table:
    table = Table(title=f"training gradient, {a.rule}, against the exact implicit gradient "
                        f"(float64, rel tol 1e-10)")
    for col in ("parameters", "cosine", "rel. error"):
        table.add_column(col, justify="left" if col == "parameters" else "right")
    for g in [*a.groups, a.overall]:
        table.add_row(g.name, f"{g.cosine:.4f}", fmt_sci(g.rel_error))
    if a.adjoint_residual is not None:
        table.caption = (f"adjoint residual reached: {fmt_sci(a.adjoint_residual)} (max); "
                         f"reference: {fmt_sci(a.exact_residual)}")
    return table


def _starts_line(r: StartsReport, s: SolveSpec) -> str:
    d = r.summary()
    return (f"{r.starts} random starts ({s.describe()}): distance to the usual solution "
            f"median {d['distance_median']:.2e}, max {d['distance_max']:.2e} (relative); "
            f"prediction agreement {fmt_pct(d['prediction_agreement'])}; one fixed point "
            f"(all converged, within the contraction bound) for "
            f"{fmt_pct(d['unique'])} of samples")


def _contraction_line(report: TraceReport) -> str:
    rho = report.spectral_radius.cpu().double()
    text = (f"spectral radius of df/dz at z* ({report.spectral_from}): max {rho.max():.4f}, "
            f"median {rho.median():.4f} over {rho.numel()} samples")
    if report.fixed_point_rate is not None:
        rate = report.fixed_point_rate[torch.isfinite(report.fixed_point_rate)]
        if rate.numel():
            text += (f"\nfixed_point observed linear rate (tail of its trace): max {rate.max():.4f}, "
                     f"median {rate.median():.4f} over {rate.numel()} samples")
        else:
            text += "\nfixed_point observed linear rate: trace too short to measure"
    if float(rho.max()) >= 1.0:
        text += "\nrho >= 1: plain fixed-point iteration does not contract at z* for some samples"
    return text

