"""How `deqctl compare` prints groups of runs: a table of figures over seeds, the paired
differences between groups, and the stable learning-rate ranges."""

from __future__ import annotations

from typing import Any, Callable

from rich.table import Table
from rich.text import Text

from ..inspect.groups import Group, label, pair_labels
from ..inspect.stats import Estimate
from ..tasks import Metric
from ..ui.fmt import fmt_float, fmt_int, fmt_pct

NO_DIFFERENCE = "not shown at this sample size"


def estimate_text(e: Estimate | None, fmt: Callable[[Any], str], interval: bool = False) -> str:
    """"mean ± std", with `interval` "mean ± std [low, high]" (95%); "mean" for one run,
    "-" for none."""
    if e is None:
        return "-"
    if e.std is None:
        return fmt(e.mean)
    text = f"{fmt(e.mean)} ± {fmt(e.std)}"
    return text + f" [{fmt(e.ci95[0])}, {fmt(e.ci95[1])}]" if interval else text


def group_table(groups: list[Group], head: Metric, target: tuple[str, float] | None) -> Table:
    table = Table(title="over seeds: mean ± std [95% interval] of each group's runs (--json "
                        "has every interval); diverged: share of runs a non-finite loss ended; "
                        "spikes: steps per 1000 whose loss passed 3x the median of the 50 before")
    cols = ["group", "n", f"final {head.key}", f"best {head.key}", "time (s)"]
    if target is not None:
        cols.append(f"to {target[0]}={target[1]:g} (s)")
    cols += ["peak MB", "NFE", "test conv", "diverged", "spikes/1k"]
    for c in cols:
        table.add_column(c, justify="left" if c == "group" else "right")
    for g in groups:
        f = g.figures()
        cells = [Text(g.label), str(len(g.runs)), estimate_text(f["final"], head.fmt, True),
                 estimate_text(f["best"], head.fmt), estimate_text(f["wall_s"], fmt_int)]
        if target is not None:
            reached = sum(r.target_step is not None for r in g.runs)
            cells.append(f"{estimate_text(f['target_wall_s'], fmt_int, True)} "
                         f"({reached}/{len(g.runs)})")
        cells += [estimate_text(f["peak_mem_mb"], fmt_int),
                  estimate_text(f["fwd_nfe"], lambda v: fmt_float(v, 3)),
                  estimate_text(f["test_converged"], fmt_pct), fmt_pct(g.divergence_rate()),
                  estimate_text(f["spikes_per_1k"], lambda v: fmt_float(v, 2))]
        table.add_row(*cells)
    return table


def paired_lines(paired: list[dict], head: Metric) -> list[str]:
    """One line per pair of groups: each figure's paired difference with its interval, or
    "not shown at this sample size" where the interval includes no difference."""
    names = {"final": f"final {head.key}", "best": f"best {head.key}",
             "target_wall_s": "time to target (s)", "wall_s": "training time (s)",
             "peak_mem_mb": "peak MB",
             "fwd_nfe": "NFE"}
    lines = []
    for p in paired:
        parts = []
        for key, name in names.items():
            e = p.get(key)
            if not e or e.get("std") is None:
                continue
            fmt = head.fmt if key in ("final", "best") else (lambda v: fmt_float(v, 3))
            text = f"{name} {fmt(e['mean'])} [{fmt(e['ci95'][0])}, {fmt(e['ci95'][1])}]"
            if e["ci95"][0] <= 0 <= e["ci95"][1]:
                text += f" ({NO_DIFFERENCE})"
            parts.append(text)
        b, a, where = pair_labels(p)
        lines.append(f"paired over seeds {', '.join(map(str, p['seeds']))}"
                     f"{f' at {where}' if where else ''}: ({b}) minus ({a}): " + "; ".join(parts))
    return lines


def lr_lines(ranges: list[dict], head: Metric) -> list[str]:
    """One line per family of groups swept over optim.lr."""
    out = []
    for r in ranges:
        stable = ", ".join(f"{lr:g}" for lr in r["stable"]) or "none"
        largest = f"{r['largest_stable']:g}" if r["largest_stable"] is not None else "none"
        out.append(f"stable learning rates ({label(r['settings'])}): of "
                   f"{', '.join(f'{lr:g}' for lr in r['rates'])}, stable {stable}; largest "
                   f"stable {largest} (every seed finished, none diverged, mean final "
                   f"{head.key} within 1% of the best rate's, {head.fmt(r['best'])})")
    return out
