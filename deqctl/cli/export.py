"""`deqctl export RUN_OR_CHECKPOINT --format safetensors|pt2|onnx --out PATH [--iters N]`"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import torch
import typer

from ..api import load as load_model
from ..engine import usercode
from ..engine.bundle import save_bundle
from ..export import (ExportFailed, MissingDependency, UNROLLABLE, Unrolled, calibrate_iters,
                      compare, fold_norms, require_onnx, write_onnx, write_pt2)
from ..inspect import open_source
from ..files import Output
from ..limits import UNROLL_LIMIT
from .common import FAILED, TRUST_CODE, USAGE, fail, residual_stops_only, split_args, user_errors


class Format(str, Enum):
    safetensors = "safetensors"
    pt2 = "pt2"
    onnx = "onnx"


# the solvers an export can unroll, as a CLI choice (one list: export.UNROLLABLE)
Solver = Enum("Solver", {name: name for name in UNROLLABLE}, type=str)


@user_errors
def export(
    args: Optional[List[str]] = typer.Argument(
        None, help="RUN_OR_CHECKPOINT, then overrides of data.*, deq.eval.*, runtime.*"),
    fmt: Format = typer.Option(..., "--format", help="safetensors (weights + recipe), "
                               "pt2 (torch.export) or onnx"),
    out: Path = typer.Option(..., "--out", help="file to write"),
    iters: Optional[int] = typer.Option(None, "--iters", min=1, max=UNROLL_LIMIT,
                                        help="unrolled solver iterations (default: what the eval "
                                        f"settings need to reach tol; at most {UNROLL_LIMIT})"),
    solver: Optional[Solver] = typer.Option(None, "--solver", help="unrolled solver "
                                            "(default: the eval solver; anderson for broyden)"),
    batch: int = typer.Option(64, "--batch", min=1, help="samples for calibration and parity"),
    max_diff: Optional[float] = typer.Option(None, "--max-diff", min=0.0,
                                             help="fail if max |output diff| vs eager exceeds this"),
    min_agree: float = typer.Option(0.99, "--min-agree", min=0.0, max=1.0,
                                    help="fail if fewer predictions agree with the eager model"),
    force: bool = typer.Option(False, "--force", help="replace --out if it exists"),
    trust_code: bool = TRUST_CODE,
) -> None:
    """Export a trained DEQ with its solver unrolled to fixed iterations; check parity on a real batch."""
    path, overrides = split_args(args)
    if path is None:
        fail("missing RUN_OR_CHECKPOINT (e.g. deqctl export runs/mnist-deq --format onnx --out m.onnx)",
             USAGE)
    if fmt is Format.safetensors and (iters is not None or solver is not None):
        fail("--iters and --solver apply to pt2 and onnx; a safetensors export keeps the "
             "solver and its eval settings", USAGE)
    target = Output(out, force, reading=(Path(path),)).check()   # before any work
    try:
        if fmt is Format.onnx:
            require_onnx()   # before any work: a missing extra should fail in a second
        _export(path, overrides, fmt, target, iters, solver, batch, max_diff, min_agree,
                trust_code)
    except MissingDependency as exc:
        fail(str(exc), USAGE)
    except ExportFailed as exc:
        fail(str(exc), FAILED)


def _export(path: str, overrides: list[str], fmt: Format, target: Output, iters: int | None,
            solver: Solver | None, batch: int, max_diff: float | None, min_agree: float,
            trust_code: bool) -> None:
    """Write the artefact to a temporary file, check it, and only then move it to --out."""
    with target.writing() as tmp:
        _write(path, overrides, fmt, tmp, target.path, iters, solver, batch, max_diff,
               min_agree, trust_code)


def _write(path: str, overrides: list[str], fmt: Format, out: Path, named: Path,
           iters: int | None, solver: Solver | None, batch: int, max_diff: float | None,
           min_agree: float, trust_code: bool) -> None:
    say = typer.echo
    src = open_source(path, overrides, trust_code=trust_code)
    residual_stops_only(src, "export")
    if src.progress:
        typer.echo(f"note: {src.progress}", err=True)
    # Artefacts are written for and checked on the CPU, where they will be loaded first.
    model = src.model.cpu().eval()
    settings = src.recipe.deq.eval_settings()
    s = settings.spec()
    x_cal, _ = src.batch("train" if src.data().train is not None else "test", batch)
    x, _ = src.batch("test", batch)
    x_cal, x = x_cal.cpu(), x.cpu()
    checked_on = "test"
    if x.shape[1:] != x_cal.shape[1:]:     # a harder test split of another size (mazes):
        x, checked_on = x_cal, "train"    # the artefact takes the shape it describes
    with torch.no_grad():
        eager = model.run(x, solver=s).out
    info, task = src.info, src.task

    if fmt is Format.safetensors:
        save_bundle(out, model, src.recipe, info.as_dict(),
                    extra={"source": src.label,
                           "code": usercode.records(src.recipe.user_code())})
        with torch.no_grad():
            candidate = load_model(out, trust_code=trust_code)(x)
        parity = compare(task, eager, candidate)
        say(f"export {named}: weights, resolved recipe and data description (eval solver "
            f"{s.describe()}); load with deqctl.load({str(named)!r})")
        hint = "the stored weights do not reproduce the model"
    else:
        name = solver.value if solver else (s.solver if s.solver in UNROLLABLE else "anderson")
        # the artefact iterates in full precision: calibrate (and unroll) without bf16
        us = settings.model_copy(update={"solver": name, "bf16_until": None}).spec()
        needed, conv = calibrate_iters(model, x_cal, us)
        target = f"tol {s.tol:g} ({s.stop_mode}) on {x_cal.shape[0]} samples"
        if conv == 1.0:
            say(f"calibration: {name} needs {needed} iterations to reach {target}")
        else:
            say(f"calibration: {name} does not reach {target} within max_iter {s.max_iter} "
                f"({conv:.0%} do); taking {needed}")
        n = iters or needed
        unrolled = Unrolled.from_spec(fold_norms(model), n, us).eval()
        dynamic = model.dynamic_length
        if fmt is Format.pt2:
            run = write_pt2(unrolled, x, out, dynamic)
        else:
            run = write_onnx(unrolled, x, out, info.input_name, task.output_name, dynamic)
        with torch.no_grad():
            reference = unrolled(x)
        parity = compare(task, eager, run(x), reference)
        axes = "batch and length" if dynamic else "batch"
        say(f"export {named}: {fmt.value}, {name} unrolled to {n} iterations (each sample stops at "
            f"tol {us.tol:g} {us.stop_mode} and answers with its lowest-residual iterate, as the "
            f"eager solve does), normalisations folded; "
            f"input {info.input_name} {info.describe_inputs()}, dynamic {axes}")
        hint = _unroll_hint(n, needed, conv, s.max_iter)
    say(f"parity on {parity.n} {checked_on} samples vs the eager DEQ ({s.describe()}): "
        f"max |diff| {parity.max_abs_diff:.3g}, predictions agree {parity.agreement:.2%}"
        + (f", exporter error {parity.export_error:.2g}" if fmt is not Format.safetensors else ""))
    problems = parity.problems(max_diff, min_agree)
    if problems:
        fail(f"parity check failed: {'; '.join(problems)}; {named} was not written (the "
             f"artefact does not match the eager model); {hint}", FAILED)
    say(f"parity ok; wrote {named}")


def _unroll_hint(n: int, needed: int, converged: float, max_iter: int) -> str:
    """What to change when an unrolled export misses parity."""
    if n < needed:
        return f"raise --iters (the eval settings need {needed})"
    if converged < 1.0 and n > needed:
        # the artefact keeps looking for better iterates where the eager solve has stopped
        return (f"--iters {n} runs past deq.eval.max_iter {max_iter}, so samples that never "
                f"reach tol answer with other iterates than the eager model's: drop --iters, "
                f"or export with deq.eval.max_iter={n + 1}")
    if converged < 1.0:
        return ("some samples do not reach tol within deq.eval.max_iter, and rounding can "
                "steer those to other best iterates: raise it, or loosen deq.eval.tol")
    return (f"try --iters above {n}, a tighter deq.eval.tol (eager and unrolled both stop "
            f"within tol of z*, not at it), or looser --max-diff / --min-agree")
