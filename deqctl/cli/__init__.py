"""The `deqctl` command line: one module per command; each parses, calls the library and
turns known errors into a one-line message and an exit code."""

from __future__ import annotations

import typer

from . import compare as _compare
from . import data as _data
from . import eval as _eval
from . import export as _export
from . import generate as _generate
from . import predict as _predict
from . import solve_trace as _solve_trace
from . import sweep as _sweep
from . import train as _train

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, evaluate, inspect and export Deep Equilibrium Models.")


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__
        typer.echo(f"deqctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version,
                                       is_eager=True, help="Print the version and exit.")
          ) -> None:
    """Train, evaluate, inspect and export Deep Equilibrium Models."""


app.command("train", no_args_is_help=True)(_train.train)
app.command("eval", no_args_is_help=True)(_eval.eval_command)
app.command("solve-trace", no_args_is_help=True)(_solve_trace.solve_trace)
app.command("export", no_args_is_help=True)(_export.export)
app.command("compare", no_args_is_help=True)(_compare.compare)
app.command("predict", no_args_is_help=True)(_predict.predict)
app.command("generate", no_args_is_help=True)(_generate.generate)
app.command("sweep", no_args_is_help=True)(_sweep.sweep)
app.command("data", no_args_is_help=True)(_data.data_command)


def main() -> None:
    app()
