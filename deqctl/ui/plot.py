"""Residual-trace plots (PNG) and unicode sparklines for the terminal."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

# Figure + the Agg canvas directly, not pyplot: no display needed, no global backend switch
# that would surprise a user's notebook, and no pyplot figure registry to leak.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

BLOCKS = "▁▂▃▄▅▆▇█"


def _usable(v: float, log: bool) -> bool:
    """Return True when ``v`` can be drawn: finite, and positive on a log scale."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return False
    return math.isfinite(x) and (x > 0 or not log)


def plot_traces(traces: dict[str, list[float]], path: str | Path, *, tol: float | None,
                ylabel: str = "relative residual", title: str = "") -> Path:
    """Plot per-iteration residuals of each solver on a log axis; return the PNG path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = 0
    for name, values in traces.items():
        # NaN/inf (diverged iterations) and zeros (exact fixed point) have no place on a log axis.
        pts = [(i + 1, float(v)) for i, v in enumerate(values) if _usable(v, log=True)]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(pts) <= 30 else None, markersize=3, label=name)
        drawn += 1
    if tol is not None and tol > 0:
        ax.axhline(tol, linestyle="--", color="gray", linewidth=1, label=f"tol {tol:.0e}")
    if drawn:
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no finite residuals to plot", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if drawn or tol:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path



def plot_starts(distance: list[float], path: str | Path, *, title: str = "") -> Path:
    """Plot each sample's distance between the fixed points its solves reached from
    random starts (sorted, log axis): a flat line near the tolerance says one fixed point,
    a step up says some samples have several. Returns the PNG path written."""
    path = Path(path)
    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values = sorted(float(v) for v in distance)
    pts = [(100 * (i + 1) / len(values), v) for i, v in enumerate(values) if _usable(v, log=True)]
    if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(pts) <= 64 else None, markersize=3)
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "every start reached the same point exactly", ha="center",
                va="center", transform=ax.transAxes)
    ax.set_xlabel("samples (%), sorted by distance")
    ax.set_ylabel("max relative distance to the usual start's fixed point")
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path

def sparkline(values: list[float], width: int = 40, log: bool = True) -> str:
    """Return a sparkline of ``values`` (at most ``width`` chars, ' ' where nothing is drawable).

    Longer series are averaged into ``width`` buckets (in log space when ``log``), so a
    500-iteration trace still fits one table cell.
    """
    if not values or width <= 0:
        return ""
    pts = [(math.log10(float(v)) if log else float(v)) if _usable(v, log) else None for v in values]
    n = len(pts)
    out_len = min(n, width)
    buckets: list[float | None] = []
    for i in range(out_len):
        chunk = [p for p in pts[i * n // out_len:(i + 1) * n // out_len] if p is not None]
        buckets.append(sum(chunk) / len(chunk) if chunk else None)
    valid = [b for b in buckets if b is not None]
    if not valid:
        return " " * out_len
    lo, hi = min(valid), max(valid)
    span = hi - lo
    chars = []
    for b in buckets:
        if b is None:
            chars.append(" ")
        elif span == 0:
            chars.append(BLOCKS[len(BLOCKS) // 2])  # flat series: mid height, not "all zero"
        else:
            chars.append(BLOCKS[min(int((b - lo) / span * len(BLOCKS)), len(BLOCKS) - 1)])
    return "".join(chars)


def plot_runs(runs: list[dict], path: str | Path, *, metric: str, metric_label: str,
              log_metric: bool = False) -> Path:
    """Plot runs side by side; return the PNG path written. Each run is {"name", "train":
    rows, "evals": rows} (metrics.jsonl rows). Panels: training loss and the evaluation
    metric against step and against training time, forward NFE and forward relative
    residual against step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(13, 7.5), dpi=110)
    FigureCanvasAgg(fig)
    panels = [("train", "step", "loss", "training loss", "step", False),
              ("train", "wall_s", "loss", "training loss", "training time (s)", False),
              ("evals", "step", metric, metric_label, "step", log_metric),
              ("evals", "wall_s", metric, metric_label, "training time (s)", log_metric),
              ("train", "step", "fwd_nfe", "forward NFE (mean)", "step", False),
              ("train", "step", "fwd_rel_residual", "forward rel residual (mean)", "step", True)]
    for i, (rows, x, y, ylabel, xlabel, log) in enumerate(panels):
        ax = fig.add_subplot(2, 3, i + 1)
        drawn = 0
        for run in runs:
            pts = [(r[x], r[y]) for r in run[rows] if _usable(r.get(x), False)
                   and _usable(r.get(y), log)]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) <= 30 else None, markersize=3,
                        label=run["name"])
                drawn += 1
        _finish(ax, drawn, log, xlabel, ylabel)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_groups(groups: list[dict], path: str | Path, *, metric: str, metric_label: str,
                log_metric: bool = False) -> Path:
    """Plot groups of runs (seeds): each {"name", "runs": [{"train", "evals"}]}; per panel
    the mean over the group's runs at each step they all logged, with a +-1 std band.
    Panels: training loss, the evaluation metric and forward NFE against step."""
    path = Path(path)
    fig = Figure(figsize=(13, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    panels = [("train", "loss", "training loss", False), ("evals", metric, metric_label, log_metric),
              ("train", "fwd_nfe", "forward NFE (mean)", False)]
    for i, (rows, y, ylabel, log) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        drawn = 0
        for g in groups:
            per_run = [{r["step"]: float(r[y]) for r in run[rows]
                        if _usable(r.get(y), log) and isinstance(r.get("step"), int)}
                       for run in g["runs"]]
            steps = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
            if not steps:
                continue
            values = [[p[s] for p in per_run] for s in steps]
            mean = [statistics.fmean(v) for v in values]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            line, = ax.plot(steps, mean, marker="o" if len(steps) <= 30 else None,
                            markersize=3, label=f"{g['name']} (n={len(per_run)})")
            if len(per_run) > 1:
                ax.fill_between(steps, [m - s for m, s in zip(mean, std)],
                                [m + s for m, s in zip(mean, std)], alpha=0.2,
                                color=line.get_color())
            drawn += 1
        _finish(ax, drawn, log, "step", ylabel)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _finish(ax, drawn: int, log: bool, xlabel: str, ylabel: str) -> None:
    """A panel's axes, grid and legend, or "no data" where nothing was drawn."""
    if log and drawn:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
