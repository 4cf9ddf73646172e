"""`deqctl compare ... --report report.md`: the three claims DEQs are sold on, answered
for the runs given with the numbers and their uncertainty.

- faster: time to the --target (training time, evaluations excluded);
- less memory: peak training memory;
- more stable: divergence, loss spikes, the stable learning rates and the seed-to-seed
  spread of the final metric.

Each pair of groups (a later one against the first, seed by seed) is stated with its 95%
interval, and where the interval includes no difference the report says "not shown at this
sample size" instead of naming a winner.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from .. import __version__
from ..tasks import Metric
from ..ui.fmt import fmt_float, fmt_int, fmt_pct
from .groups import Group, label, pair_labels

NO_DIFFERENCE = "not shown at this sample size"


def _interval(e: dict | None, fmt: Callable[[Any], str]) -> str:
    if not e:
        return "-"
    if e.get("std") is None:
        return f"{fmt(e['mean'])} (n=1)"
    return f"{fmt(e['mean'])} ± {fmt(e['std'])} [{fmt(e['ci95'][0])}, {fmt(e['ci95'][1])}]"


def _verdict(e: dict | None, fmt: Callable[[Any], str], less: str, more: str,
             b: str, a: str) -> str:
    """One sentence on a paired difference b - a: which is less, or no difference shown."""
    if not e or e.get("std") is None:
        return "too few shared seeds to compare (2 or more are needed)"
    low, high = e["ci95"]
    text = (f"{b} minus {a}: {fmt(e['mean'])} (95% interval [{fmt(low)}, {fmt(high)}], "
            f"{e['n']} seeds)")
    if low <= 0 <= high:
        return text + f": {NO_DIFFERENCE}."
    return text + f": {b} {less if high < 0 else more}."


def render(groups: list[Group], paired: list[dict], lr_ranges: list[dict], head: Metric,
           target: tuple[str, float] | None, sources: list[str], task: str,
           curves: str | None) -> str:
    """The report as Markdown (`curves`: the file name of the plot beside it)."""
    n_runs = sum(len(g.runs) for g in groups)
    out = ["# Do these DEQs converge faster, use less memory, train more stably?", "",
           f"{task} runs: {n_runs} in {len(groups)} group(s), from {', '.join(sources)}. "
           f"Written by deqctl {__version__} on {time.strftime('%Y-%m-%d %H:%M')}. Figures "
           f"are mean ± std [95% Student-t interval] over each group's seeds; a difference "
           f"is paired seed by seed.", "", "## Groups", ""]
    cols = ["group", "n", f"final {head.key}", "training time (s)",
            f"time to {target[0]}={target[1]:g} (s)" if target else None, "peak MB",
            "forward NFE", "diverged", "spikes / 1k steps"]
    cols = [c for c in cols if c]
    out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for g in groups:
        j = g.to_json()
        cells = [g.label, str(j["n"]), _interval(j["final"], head.fmt),
                 _interval(j["wall_s"], fmt_int)]
        if target:
            cells.append(f"{_interval(j['target_wall_s'], fmt_int)}; reached by "
                         f"{j['reached_target']}/{j['n']}")
        cells += [_interval(j["peak_mem_mb"], fmt_int), _interval(j["fwd_nfe"], _f3),
                  fmt_pct(j["divergence_rate"]), _interval(j["spikes_per_1k"], _f3)]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "## Faster?", ""]
    if target is None:
        out.append("No `--target` was given, so time to a target is not measured; training "
                   "time to the end of each run:")
    reached = {g.label: (sum(r.target_step is not None for r in g.runs), len(g.runs))
               for g in groups}
    for p in paired:
        b, a, where = pair_labels(p)
        at = f"{where}: " if where else ""
        e = p.get("target_wall_s" if target else "wall_s")
        if target and not (e and e.get("std") is not None):
            (ra, na), (rb, nb) = (reached.get(label(p[k]), (0, 0)) for k in ("a", "b"))
            out.append(f"- {at}{a} reached {target[0]}={target[1]:g} in {ra}/{na} run(s), {b} "
                       f"in {rb}/{nb}: too few seeds reached it in both to pair their times.")
            continue
        out.append(f"- {at}{_verdict(e, _f3, 'is faster', 'is slower', b, a)}")
    out += ["", "## Less memory?", ""]
    for p in paired:
        b, a, where = pair_labels(p)
        out.append(f"- {f'{where}: ' if where else ''}Peak training memory (MB), "
                   f"{_verdict(p.get('peak_mem_mb'), _f3, 'uses less', 'uses more', b, a)}")
    out += ["", "## More stable?", ""]
    for g in groups:
        j = g.to_json()
        spread = j["final"]["std"] if j["final"] and j["final"]["std"] is not None else None
        out.append(f"- {g.label}: {fmt_pct(j['divergence_rate'])} of {j['n']} run(s) "
                   f"diverged; {_interval(j['spikes_per_1k'], _f3)} loss spikes per 1000 "
                   f"steps; seed-to-seed std of the final {head.key} "
                   f"{head.fmt(spread) if spread is not None else '-'}.")
    for r in lr_ranges:
        largest = f"{r['largest_stable']:g}" if r["largest_stable"] is not None else "none"
        out.append(f"- Learning rates ({label(r['settings'])}): tried "
                   f"{', '.join(f'{lr:g}' for lr in r['rates'])}; stable "
                   f"{', '.join(f'{lr:g}' for lr in r['stable']) or 'none'} (largest {largest}): "
                   f"every seed finished, none diverged, mean final {head.key} within 1% of "
                   f"the best rate's ({head.fmt(r['best'])}).")
    if not lr_ranges:
        out.append("- No `optim.lr` axis among these runs, so no stable learning-rate range.")
    if not paired:
        out += ["", f"No two groups share two seeds or more: {NO_DIFFERENCE} for any claim."]
    if curves:
        out += ["", "## Curves", "", f"![mean over seeds with a ±1 std band]({curves})"]
    return "\n".join(out) + "\n"


def _f3(v: Any) -> str:
    return fmt_float(v, 3)
