"""`deqctl eval RUN_OR_CHECKPOINT [key=value ...] [--split] [--sweep-iters] [--json]`"""

from __future__ import annotations

import contextlib
import json
from enum import Enum
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ..errors import quote
from ..engine.evaluate import evaluate
from ..implicit import SolveSpec
from ..keys import SOLVER, K
from ..inspect import Source, open_source
from ..ui.work import work_shown_on
from ..ui.fmt import fmt_float, fmt_pct, fmt_sci
from ..limits import ITER_LIMIT
from ..numbers import strict_json
from .common import (TRUST_CODE, USAGE, fail, progress_bar, reader_may_leave, split_args,
                     user_errors)

class SplitName(str, Enum):
    test = "test"
    val = "val"


@user_errors
@reader_may_leave()        # `deqctl eval RUN | head`: the reader has what it wanted
def eval_command(
    args: Optional[List[str]] = typer.Argument(
        None, help="RUN_OR_CHECKPOINT, then overrides of data.*, deq.eval.*, runtime.* "
                   "(e.g. deq.eval.solver=fixed_point deq.eval.tol=1e-4)"),
    split: SplitName = typer.Option(SplitName.test, "--split", help="which split to evaluate"),
    sweep_iters: Optional[str] = typer.Option(
        None, "--sweep-iters", help="re-solve with each max_iter, e.g. 1,2,4,8,16,32 "
                                    "(tol stays the eval tol): metric against NFE"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout, nothing else"),
    trust_code: bool = TRUST_CODE,
) -> None:
    """Evaluate a trained DEQ with any test-time solver settings (loss, task metrics, NFE, residuals)."""
    path, overrides = split_args(args)
    if path is None:
        fail("missing RUN_OR_CHECKPOINT (e.g. deqctl eval runs/mnist-deq)", USAGE)
    iters = _parse_iters(sweep_iters) if sweep_iters is not None else None
    src = open_source(path, overrides, trust_code=trust_code)
    mode = src.recipe.deq.mode
    if iters is not None and mode == "baseline":
        fail("--sweep-iters: a baseline applies its network once; there is no depth to sweep",
             USAGE)
    if src.progress:
        typer.echo(f"note: {src.progress}", err=True)
    err = Console(stderr=True)
    with work_shown_on(err):          # other text than the run's is tokenized first
        data = src.split(split.value)
    solver = src.recipe.deq.eval_settings().spec()
    out = Console()
    if not as_json:
        typer.echo(f"{src.label}: {split.value} split, {len(data)} samples; "
                   f"{src.recipe.deq.describe_eval()}; device {src.device} ({src.device_reason})")
        for note in src.data().notes:
            typer.echo(note)
    runs = [solver] if iters is None else [solver.but(max_iter=k) for k in iters]
    rule = src.model.deq.readout_stop
    rows = []
    with progress_bar(err) as progress:
        bar = progress.add_task("eval", total=len(runs))
        for i, s in enumerate(runs):
            progress.update(bar, description=f"eval max_iter={s.max_iter}")
            # a readout stop is reported against the residual stop on the same batches
            # a twin answers at depth k by applying its cell k times (a solve stops itself)
            twin_depth = src.model.deq.applying(s.max_iter) if iters and mode == "unrolled" \
                else contextlib.nullcontext()
            with twin_depth, (src.model.auditing_readout(src.task.agree) if rule
                              else contextlib.nullcontext()) as audit:
                row = evaluate(src.model, src.task, data, src.recipe.data.eval_batch_size,
                               device=src.device, solver=s, split_name=split.value,
                               precision=src.recipe.runtime.precision,
                               on_batch=_advance(progress, bar, i))
            rows.append(_result_row(row, src))
            if audit is not None:
                rows[-1]["readout"] = {**rule.as_dict(), **audit.summary()}
    result = {"split": split.value, "source": src.label, "solver": solver.as_dict(),
              "data": src.data().facts}
    if iters is None:
        result.update(rows[0])
    else:
        result["sweep"] = [{"max_iter": s.max_iter, **r} for s, r in zip(runs, rows)]
    if as_json:
        typer.echo(json.dumps(strict_json(result), allow_nan=False))
    elif iters is None:
        out.print(_summary_table(rows[0], src, solver))
    else:
        out.print(_sweep_table(result["sweep"], src, solver))


def _parse_iters(text: str) -> list[int]:
    """Return the --sweep-iters values, or exit 2 naming the bad entry."""
    values = []
    if text.count(",") >= 64:
        fail("--sweep-iters: at most 64 values", USAGE)
    for part in text.split(","):
        part = part.strip()
        if not (part.isascii() and part.isdigit() and len(part) <= 6
                and 1 <= int(part) <= ITER_LIMIT):
            fail(f"--sweep-iters: expected comma-separated integers from 1 to {ITER_LIMIT} "
                 f"like 1,2,4,8 (got {quote(part)})", USAGE)
        values.append(int(part))
    return values


def _result_row(row: dict[str, Any], src: Source) -> dict[str, Any]:
    """The reported subset of an evaluate() row: loss, task metrics, solver statistics."""
    return {"n": row[K.n], "loss": row[K.loss],
            **{m.key: row[m.key] for m in src.task.metrics if m.key in row},
            **{k: row[k] for k in SOLVER}, "samples_per_s": row[K.samples_per_s]}


def _summary_table(row: dict[str, Any], src: Source, s: SolveSpec) -> Table:
    table = Table(title="evaluation", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("samples", str(row[K.n]))
    table.add_row("loss", fmt_float(row[K.loss]))
    for m in src.task.metrics:
        table.add_row(m.key, m.fmt(row.get(m.key)))
    table.add_row("fwd NFE mean / max", f"{fmt_float(row[K.fwd_nfe], 3)} / {row[K.fwd_nfe_max]:.0f}")
    table.add_row("fwd abs residual (mean)", fmt_sci(row[K.fwd_abs_residual]))
    table.add_row("fwd rel residual mean / max",
                  f"{fmt_sci(row[K.fwd_rel_residual])} / {fmt_sci(row[K.fwd_rel_residual_max])}")
    table.add_row(f"converged (tol {s.tol:g} {s.stop_mode})", fmt_pct(row[K.fwd_converged]))
    table.add_row("samples/s", f"{row[K.samples_per_s]:.0f}")
    if "readout" in row:
        r = row["readout"]
        table.add_row("stopped on the readout", fmt_pct(r["readout_stopped"]))
        table.add_row("NFE vs residual stop (per sample / batch)",
                      f"{r['nfe_ratio']:.2f}x / {r['nfe_ratio_batch']:.2f}x "
                      f"({fmt_float(r['fwd_nfe'], 3)} vs {fmt_float(r['residual_fwd_nfe'], 3)})")
        table.add_row("agreement with residual stop (where it converged)",
                      f"{fmt_pct(r['agreement'])} ({fmt_pct(r['agreement_converged'])})")
    return table


def _sweep_table(sweep: list[dict[str, Any]], src: Source, s: SolveSpec) -> Table:
    # recurrent models and twins apply their cell exactly max_iter times: no solver, no stop
    how = {"recurrent": "recurrent depth", "unrolled": "twin depth"}.get(src.recipe.deq.mode,
                                                                         s.solver)
    table = Table(title=f"anytime inference: {how}, tol {s.tol:g} {s.stop_mode}")
    metrics = [m for m in src.task.metrics if m.column]
    readout = "readout" in sweep[0]
    for col in ("max_iter", "NFE", "NFE max", f"{s.stop_mode} res", "conv", "loss",
                *(m.label for m in metrics), *(("NFE/res", "agree") if readout else ()),
                "samp/s"):
        table.add_column(col, justify="right")
    for r in sweep:
        vs = (f"{r['readout']['nfe_ratio']:.2f}x", fmt_pct(r["readout"]["agreement"])) \
            if readout else ()
        table.add_row(str(r["max_iter"]), fmt_float(r[K.fwd_nfe], 3), f"{r[K.fwd_nfe_max]:.0f}",
                      fmt_sci(r[K.fwd_rel_residual if s.stop_mode == "rel" else K.fwd_abs_residual]), fmt_pct(r[K.fwd_converged]),
                      fmt_float(r[K.loss]), *(m.fmt(r.get(m.key)) for m in metrics), *vs,
                      f"{r[K.samples_per_s]:.0f}")
    return table



def _advance(progress: Progress, task: Any, run: int) -> Callable[[int, int], None]:
    def on_batch(done: int, total: int) -> None:
        progress.update(task, completed=run + done / total)
    return on_batch
