"""Tests for deqctl.ui: plain lines, live table bounds and highlighting, plots, sparklines."""

from __future__ import annotations

import io
import math
import re

from rich.console import Console

from deqctl.data import DataInfo
from deqctl.tasks import task_for
from deqctl.ui import TrainView, plot_traces, sparkline
from deqctl.ui.live import STYLE_BAD, STYLE_WARN, columns, plain_line, row_cells

ANSI = re.compile(r"\x1b\[")

ROW = dict(step=120, epoch=1, split="train", loss=0.34123, accuracy=0.912, lr=1.9e-3,
           fwd_nfe=9.4, fwd_nfe_max=14, fwd_rel_residual=3.1e-4, fwd_rel_residual_max=9.8e-4,
           fwd_abs_residual=2.0e-3, fwd_converged=1.0, bwd_nfe=8.0, bwd_rel_residual=6.2e-5,
           step_time_s=0.041, samples_per_s=1561.3, fwd_stop="conv", fallbacks=0, nonfinite=0)


IMAGES = DataInfo(name="t", task="classify", inputs="image", shape=(1, 4, 4), num_classes=3)
TEXT = DataInfo(name="t", task="lm", inputs="tokens", shape=(8,), tokenizer="byte")
SERIES = DataInfo(name="t", task="forecast", inputs="sequence", shape=(8, 1), target_shape=(2, 1),
                  target_std=(1.0,), target_mean=(0.0,), target_channels=(0,), season=4)
CLASSIFY = task_for(IMAGES)


def col(name: str, task=CLASSIFY) -> int:
    return columns(task.metrics).index(name)


def make_view(*args, task=CLASSIFY, **kw) -> TrainView:
    view = TrainView(*args, **kw)
    view.set_task(task)
    return view


def plain_output(rows: list[dict], events: list[str] = (), **kw) -> str:
    buf = io.StringIO()
    # A forced terminal proves plain=True alone keeps ANSI codes out.
    console = Console(file=buf, force_terminal=True, width=80)
    with make_view(200, fwd_tol=1e-3, bwd_tol=1e-4, console=console, plain=True, **kw) as view:
        for r in rows:
            view.log(r)
            view.advance(r["step"])
        for e in events:
            view.event(e)
    return buf.getvalue()


def test_plain_one_line_per_log_with_numbers_and_no_ansi():
    out = plain_output([ROW, {**ROW, "step": 130}], events=["saved checkpoint runs/a/step_130"])
    lines = out.splitlines()
    assert len(lines) == 3  # 2 logs + 1 event, no progress bar, no wrapping at width 80
    assert not ANSI.search(out)
    first = lines[0]
    assert first.startswith("step 120 ep 1.00 ")
    for piece in ["loss 0.3412", "acc 91.2%", "lr 1.9e-03", "fwd nfe 9.4/14",
                  "rel 3.1e-04/9.8e-04", "conv 100%", "bwd nfe 8.0 rel 6.2e-05",
                  "41 ms/step", "1561 samp/s", "stop conv"]:
        assert piece in first, piece
    assert lines[1].startswith("step 130 ")
    assert lines[2] == "saved checkpoint runs/a/step_130"


def test_plain_auto_when_not_terminal_and_eval_prefix():
    buf = io.StringIO()
    view = make_view(10, fwd_tol=1e-3, bwd_tol=1e-4, console=Console(file=buf))
    assert view.plain  # StringIO is not a terminal
    with view:
        view.log(dict(step=10, epoch=2, split="test", loss=0.25, accuracy=0.9, fwd_nfe=11.0,
                      fwd_rel_residual=2e-4, fwd_converged=0.9996))
    line = buf.getvalue().strip()
    assert line.startswith("test step 10 ep 2.00 loss 0.25 acc 90.0%")
    # 0.9996 converged must not round up to a clean-looking 100%.
    assert "conv 99.9%" in line
    assert " lr " not in line and "bwd" not in line  # eval rows have no training-only groups


def test_plain_abs_mode_and_partial_group_dash():
    line = plain_line({"step": 1, "epoch": 0, "fwd_abs_residual": 5e-3, "fwd_nfe": 3.0}, "abs")
    assert "abs 5.0e-03" in line
    assert "conv -" in line  # missing value inside a present group
    assert "loss" not in line


def test_terminal_table_is_bounded_and_shows_events():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=200)
    view = make_view(100, fwd_tol=1e-3, bwd_tol=1e-4, console=console, max_rows=5, title="mnist")
    assert not view.plain
    with view:
        for s in range(1, 21):
            view.log({**ROW, "step": s})
            view.advance(s)
        view.event("saved checkpoint runs/a/[step_20]")
    table = view.table()
    assert table.row_count == 5
    steps = [c.plain for c in table.columns[col("step")]._cells]
    assert steps == ["16", "17", "18", "19", "20"]
    out = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buf.getvalue())  # drop colours / cursor codes
    assert "saved checkpoint runs/a/[step_20]" in out  # printed verbatim, not read as markup
    assert "20/100" in out  # progress bar: steps done / total
    assert "fwd rel res" in out and "mnist" in out


def test_highlights_residuals_above_tol_and_partial_convergence():
    kw = dict(fwd_tol=1e-3, bwd_tol=1e-4, metrics=CLASSIFY.metrics)
    ok = row_cells(ROW, **kw)
    assert ok[col("fwd res")].style == "" and ok[col("bwd res")].style == ""
    assert ok[col("conv")].style == ""
    bad = row_cells({**ROW, "fwd_rel_residual_max": 2e-3, "bwd_rel_residual": 5e-4,
                     "fwd_converged": 0.75, "nonfinite": 3}, **kw)
    assert bad[col("fwd res")].style == STYLE_BAD
    assert bad[col("bwd res")].style == STYLE_BAD
    assert bad[col("conv")].style == STYLE_WARN
    assert bad[col("notes")].style == STYLE_BAD and "nonfinite 3" in bad[col("notes")].plain
    # abs mode compares the absolute residual (2e-3 > 1e-3) even though rel is fine.
    abs_cells = row_cells(ROW, stop_mode="abs", **kw)
    assert abs_cells[col("fwd res")].style == STYLE_BAD
    assert abs_cells[col("fwd res")].plain == "2.0e-03"
    # NaN residual never converged: flagged.
    assert row_cells({**ROW, "fwd_rel_residual_max": math.nan}, **kw)[col("fwd res")].style == STYLE_BAD


def test_highlight_reaches_the_rendered_terminal_output():
    console = Console(file=io.StringIO(), force_terminal=True, width=200, record=True,
                      color_system="standard")
    view = make_view(10, fwd_tol=1e-3, bwd_tol=1e-4, console=console)
    view.log({**ROW, "fwd_rel_residual_max": 2e-3})
    console.print(view.table())
    text = console.export_text(styles=True)
    assert "\x1b[1;31m3.1e-04/2.0e-03" in text  # bold red residual cell


def test_missing_keys_render_dash_and_eval_row_label():
    view = make_view(10, fwd_tol=1e-3, bwd_tol=1e-4, console=Console(file=io.StringIO(),
                     force_terminal=True, width=200))
    view.log({"step": 5, "split": "train", "loss": None})
    view.log({"step": 10, "epoch": 1, "split": "test", "loss": 0.5, "accuracy": 0.8})
    table = view.table()
    train = [c._cells[0].plain for c in table.columns]
    assert train[col("step")] == "5"
    assert all(v == "-" for i, v in enumerate(train) if i != col("step"))
    test = [c._cells[1].plain for c in table.columns]
    assert test[col("step")] == "test@10"
    assert test[col("acc")] == "80.0%"
    assert table.rows[1].style and "bold" in str(table.rows[1].style)


def test_language_model_rows_show_bpc_and_ppl():
    lm = task_for(TEXT)
    view = make_view(10, fwd_tol=1e-3, bwd_tol=1e-4, task=lm, console=Console(
        file=io.StringIO(), force_terminal=True, width=200))
    row = {**ROW, "accuracy": None, "bpc": 1.523, "ppl": 2.874}
    view.log(row)
    table = view.table()
    headers = [c.header for c in table.columns]
    assert headers[3:5] == ["bpc", "ppl"] and "acc" not in headers
    assert table.columns[col("bpc", lm)]._cells[0].plain == "1.523"
    assert "loss 0.3412 bpc 1.523 ppl 2.874 lr" in plain_line(row, metrics=lm.metrics)


def test_forecast_evaluations_show_the_baselines_above_the_table():
    buf = io.StringIO()
    forecast = task_for(SERIES)
    view = make_view(10, fwd_tol=1e-3, bwd_tol=1e-4, task=forecast,
                     console=Console(file=buf, force_terminal=True, width=200))
    assert [c for c in columns(forecast.metrics)][3:6] == ["mae", "rmse", "mase"]
    row = {"step": 10, "split": "test", "loss": 0.1, "mae": 0.5, "rmse": 0.7, "mase": 0.25,
           "naive_mae": 2.5, "naive_rmse": 3.0, "snaive_mae": 2.0, "snaive_rmse": 2.2}
    with view:
        view.log(row)
    out = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buf.getvalue())
    assert "test @ step 10: mae 0.5, rmse 0.7 | naive mae 2.5, seasonal-naive mae 2 | mase 0.25" in out
    line = plain_line(row, metrics=forecast.metrics)
    assert "mae 0.5 rmse 0.7 mase 0.25 naive mae 2.5 naive rmse 3 snaive mae 2" in line


def test_plot_traces_writes_png_despite_nan(tmp_path):
    traces = {"anderson": [1.0, 0.1, math.nan, 1e-3, 1e-5],
              "broyden": [1.0, math.inf, 0.05, 0.0, 1e-4],
              "diverged": [math.nan, math.nan]}
    path = plot_traces(traces, tmp_path / "sub" / "trace.png", tol=1e-4, title="t")
    assert path == tmp_path / "sub" / "trace.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_sparkline_length_and_characters():
    s = sparkline([10.0 ** -i for i in range(100)], width=40)
    assert len(s) == 40
    assert set(s) <= set("▁▂▃▄▅▆▇█")
    assert s[0] == "█" and s[-1] == "▁"  # decreasing residuals fall left to right
    short = sparkline([1.0, math.nan, -1.0, 0.01], width=40)
    assert short == "█  ▁"  # NaN and non-positive are blanks on a log scale
    assert sparkline([], width=10) == ""
    assert sparkline([3.0, 3.0, 3.0]) == "▅▅▅"  # flat: mid height
    assert len(sparkline(list(range(1, 10)), width=40, log=False)) == 9
