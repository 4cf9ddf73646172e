"""Does more test-time compute help, and for which training mode? (issue 32, item 4)

One cell trained three ways on easy instances, then given more iterations on harder ones:
- deq: deq.mode=implicit, the recipe as it is (a forward solve of at most D iterations,
  implicit gradients);
- recurrent: deq.mode=recurrent, a Poisson-lognormal depth of mean D per step, gradients
  through the last --backprop applications (Huginn's training);
- twin: deq.mode=unrolled at depth D, backprop through every application.
D is the recipe's deq.forward.max_iter (40 on prefix sums). Every model is trained with
each of --seeds by one `deqctl sweep` (--jobs runs at a time, runtime.threads=1 each).

On the harder split (prefix sums: data.test_length=64; mazes: the recipe's own, data.test_size):
- `solved` at k = m x D test-time iterations for each m in --iters: `deqctl eval
  --sweep-iters` (for the DEQ k is a budget: its solve stops at the eval tolerance; the
  recurrent model and the twin apply their cell k times).
- path independence: `deqctl solve-trace --solvers fixed_point --starts S --max-iter K`
  (K the largest k): the share of samples whose prediction is the same from every random
  start, and the share that reach one fixed point from every start.
Figures are means over seeds with the 95% interval `deqctl compare` reports
(deqctl.inspect.stats, cut to [0, 1]); "gain" is the paired difference per seed between
the largest k and k = D. DIR/test_time.json and DIR/test_time.md hold the result; finished
runs and evaluations under DIR are read, not redone.

    python bench/test_time.py                                   # ~30 min on 2 cores
    python bench/test_time.py --harder data.test_length=64,128 --dir bench-test-time
    python bench/test_time.py --data mazes
    python bench/test_time.py --smoke                           # tiny: a test's run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import yaml

from deqctl.inspect.groups import FRACTION
from deqctl.inspect.stats import Estimate, estimate, paired

ROOT = Path(__file__).resolve().parents[1]
METRIC = "solved"                 # the tag task's headline: every position right
MODES = {"deq": "implicit", "recurrent": "recurrent", "twin": "unrolled"}


@dataclass(frozen=True)
class DataSet:
    recipe: str
    harder: str                   # KEY=V1,V2: the harder test splits ("": the recipe's own)
    smoke: tuple[str, ...]        # overrides that make a run take seconds


DATASETS = {
    "prefix-sums": DataSet("configs/prefix-sums-deq.yaml", "data.test_length=64", (
        "data.train_size=64", "data.val_size=16", "data.test_size=16", "data.length=6",
        "data.eval_batch_size=16", "deq.forward.max_iter=4", "deq.backward.max_iter=4",
        "deq.eval.max_iter=8", "train.log_every=1")),
    "mazes": DataSet("configs/mazes-deq.yaml", "", (
        "data.train_mazes=64", "data.val_mazes=16", "data.test_mazes=16", "data.size=4",
        "data.eval_batch_size=16", "deq.forward.max_iter=4", "deq.backward.max_iter=4",
        "deq.eval.max_iter=8", "train.log_every=1")),
}
SMOKE = {"steps": 2, "seeds": "0,1", "iters": "1,2", "starts": 2, "batch": 4,
         "harder": {"prefix-sums": "data.test_length=12", "mazes": "data.test_size=6"}}


def deqctl(*args: Any) -> subprocess.CompletedProcess:
    """Run `deqctl ARGS` in the repository; exit with its last lines when it fails."""
    done = subprocess.run([sys.executable, "-m", "deqctl", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    if done.returncode != 0:
        sys.exit(f"deqctl {' '.join(map(str, args[:2]))} failed ({done.returncode}): "
                 f"{(done.stderr or done.stdout).strip()[-600:]}")
    return done


def harder_splits(text: str) -> list[list[str]]:
    """`KEY=V1,V2` as one override list per harder split; "" is the recipe's own test split."""
    if not text:
        return [[]]
    key, _, values = text.partition("=")
    if not key.startswith("data.") or not values:
        sys.exit(f"--harder: expected data.KEY=V1,V2 like data.test_length=64,128 (got {text!r})")
    return [[f"{key}={v.strip()}"] for v in values.split(",")]


def train_all(recipe: str, fixed: list[str], backprop: int, seeds: str, jobs: int,
              out: Path) -> dict[tuple[str, int], Path]:
    """Train every model for every seed in one sweep; {(model, seed): run directory}.
    The twin's depth and the recurrent model's mean depth are left unset: both are then
    deq.forward.max_iter, the DEQ's training budget."""
    deqctl("sweep", recipe, f"deq.mode={','.join(MODES.values())}", *fixed,
           "deq.recurrent.distribution=poisson-lognormal", f"deq.recurrent.backprop={backprop}",
           "--seeds", seeds, "--out", out, "--jobs", jobs, "--plain")
    plan = json.loads((out / "sweep.json").read_text())
    model_of = {mode: name for name, mode in MODES.items()}
    runs = {}
    for point in plan["points"]:
        keys = dict(o.split("=", 1) for o in point["overrides"])
        runs[model_of[keys["deq.mode"]], int(keys["seed"])] = out / point["name"]
    return runs


def cached(path: Path, compute) -> Any:
    """compute()'s JSON, kept at `path`: a bench run again reads what it finished."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return value


def sweep_iters(run: Path, harder: list[str], ks: list[int]) -> list[dict]:
    """[{max_iter, solved, accuracy, fwd_nfe}] of the run on the harder split, per k."""
    keep = ("max_iter", METRIC, "accuracy", "fwd_nfe", "fwd_converged")
    done = deqctl("eval", run, *harder, "runtime.threads=1",
                  "--sweep-iters", ",".join(map(str, ks)), "--json")
    return [{k: r.get(k) for k in keep} for r in json.loads(done.stdout)["sweep"]]


def starts(run: Path, harder: list[str], starts_: int, max_iter: int, batch: int,
           out: Path) -> dict:
    """solve-trace's path-independence summary of the run on the harder split (kept in
    `out`: read again, not redone)."""
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        deqctl("solve-trace", run, *harder, "runtime.threads=1", "--solvers", "fixed_point",
               "--starts", starts_, "--max-iter", max_iter, "--batch", batch, "--json", out)
    return json.loads(out.read_text())["starts"]


def summarise(solved: dict[int, dict[int, float]], ks: list[int],
              paths: dict[int, dict]) -> dict[str, Any]:
    """One model on one split: `solved` {k: {seed: value}}, `paths` {seed: starts summary}
    -> the estimate per k, the paired gain from the first k to the last, the best k, and
    the path-independence figures, each an Estimate over seeds as JSON."""
    by_k = {k: estimate(solved[k].values(), FRACTION) for k in ks}
    # paired by seed, as compare pairs two groups; a difference of fractions is in [-1, 1]
    shared = paired(solved[ks[0]], solved[ks[-1]])[1]
    gain = estimate((solved[ks[-1]][s] - solved[ks[0]][s] for s in shared), (-1.0, 1.0))
    best = max(ks, key=lambda k: by_k[k].mean if by_k[k] else -1.0)
    return {"by_iters": {str(k): _json(by_k[k]) for k in ks}, "gain": _json(gain),
            "rises": rises(gain), "best_iters": best, "best": _json(by_k[best]),
            **{f"starts_{key}": _json(estimate((p[key] for p in paths.values()), FRACTION))
               for key in ("prediction_agreement", "unique", "converged")}}


def _json(e: Estimate | None) -> dict | None:
    return e.to_json() if e is not None else None


def rises(gain: Estimate | None) -> str:
    """Whether accuracy rises with iterations, as far as the seeds show it."""
    if gain is None:
        return "-"
    if gain.excludes_zero():
        return "rises" if gain.mean > 0 else "falls"
    if gain.ci95 is None:
        return "rises (1 seed)" if gain.mean > 0 else "falls (1 seed)" if gain.mean < 0 else "flat"
    return "flat" if gain.mean == 0 and gain.std == 0 else "not shown at this n"


def cell(e: dict | None, points: bool = False) -> str:
    """An estimate as `mean [low, high]` in percent (or signed points for a difference)."""
    if e is None:
        return "-"
    f = "{:+.1f}" if points else "{:.1f}"
    ci = f" [{f.format(100 * e['ci95'][0])}, {f.format(100 * e['ci95'][1])}]" if e["ci95"] else ""
    return f.format(100 * e["mean"]) + ("" if points else "%") + ci


def table(result: dict) -> tuple[list[str], list[list[str]]]:
    """The result's header and rows: one row per (split, model)."""
    ks = result["iters"]
    head = ["split", "model", *(f"k={k}" for k in ks), f"gain {ks[-1]} vs {ks[0]} (pts)",
            "more iters", "starts agree", "one fixed point"]
    rows = []
    for split, models in result["splits"].items():
        for model, s in models.items():
            rows.append([split.removeprefix("data.") or "test", model, *(cell(s["by_iters"][str(k)]) for k in ks),
                         cell(s["gain"], points=True), s["rises"],
                         cell(s["starts_prediction_agreement"]), cell(s["starts_unique"])])
    return head, rows


def markdown(result: dict) -> str:
    head, rows = table(result)
    lines = [f"| {' | '.join(head)} |", f"|{'---|' * len(head)}"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    return "\n".join([result["title"], "", *lines, "", *result["answers"], ""])


def answers(result: dict) -> list[str]:
    """The two questions of issue 32, answered from the figures."""
    out = []
    for split, models in result["splits"].items():
        trend = ", ".join(f"{m} {s['rises']} ({cell(s['gain'], points=True)} pts)"
                          for m, s in models.items())
        top = [f"{m} ({cell(s['best'])} at k={s['best_iters']})" for m, s in models.items()
               if s["best"] and s["best"]["mean"] >= 0.95]
        out.append(f"- {split or 'test'}: solved from k={result['iters'][0]} to "
                   f"k={result['iters'][-1]}: {trend}.")
        out.append(f"- {split or 'test'}: mean solved >= 95% at some k: "
                   f"{', '.join(top) if top else 'no model'}.")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=list(DATASETS), default="prefix-sums")
    ap.add_argument("--recipe", default=None, help="the recipe (default: the data's)")
    ap.add_argument("--harder", default=None, help="harder test splits as data.KEY=V1,V2 "
                    "(default: data.test_length=64 on prefix sums; the recipe's own on mazes)")
    ap.add_argument("--steps", type=int, default=None, help="train.max_steps (default: the recipe's)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iters", default="1,2,3,4,6,8", help="test-time iterations as multiples "
                    "of the training depth D")
    ap.add_argument("--backprop", type=int, default=8, help="the recurrent model's "
                    "deq.recurrent.backprop")
    ap.add_argument("--starts", type=int, default=8, help="solve-trace --starts")
    ap.add_argument("--batch", type=int, default=64, help="solve-trace --batch")
    ap.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    ap.add_argument("--dir", type=Path, default=None, help="run directories and results "
                    "(default: a new temporary folder)")
    ap.add_argument("--smoke", action="store_true", help="tiny runs: seconds, not figures")
    a = ap.parse_args()
    data = DATASETS[a.data]
    recipe = str(Path(a.recipe).resolve()) if a.recipe else data.recipe
    if not (ROOT / recipe).is_file():
        sys.exit(f"{'--recipe' if a.recipe else '--data ' + a.data}: {recipe} not found")
    fixed = ["runtime.threads=1"]
    harder = a.harder
    if a.smoke:
        fixed += list(data.smoke)
        a.steps, a.seeds, a.iters = SMOKE["steps"], SMOKE["seeds"], SMOKE["iters"]
        a.starts, a.batch = SMOKE["starts"], SMOKE["batch"]
        harder = harder if harder is not None else SMOKE["harder"].get(a.data, "")
        a.backprop = 2
    harder = data.harder if harder is None else harder
    fixed += [f"train.max_steps={a.steps}"] if a.steps else []
    out = (a.dir or Path(tempfile.mkdtemp(prefix="deqctl-test-time-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    console = Console() if Console().is_terminal else Console(width=200)
    console.print(f"{recipe} {' '.join(fixed)}, seeds {a.seeds}: runs in {out}")
    runs = train_all(recipe, fixed, a.backprop, a.seeds, a.jobs, out / "runs")
    trained = yaml.safe_load((next(iter(runs.values())) / "recipe.yaml").read_text())
    depth = trained["deq"]["forward"]["max_iter"]
    ks = [round(float(m) * depth) for m in a.iters.split(",")]
    console.print(f"trained at D = {depth}; test-time iterations k = {ks}")
    result = {"recipe": recipe, "fixed": fixed, "depth": depth, "iters": ks,
              "backprop": a.backprop, "seeds": a.seeds, "starts": a.starts, "splits": {},
              "title": f"Test-time compute: {recipe} ({', '.join(fixed)}), trained at D = "
                       f"{depth}; mean solved over seeds {a.seeds} [95% interval]"}
    for split in harder_splits(harder):
        tag = "-".join(split) or "test"
        models = {}
        for model in MODES:
            seeds = {seed: run for (m, seed), run in runs.items() if m == model}
            rows = {s: cached(out / "evals" / f"{r.name}_{tag}_{'-'.join(map(str, ks))}.json",
                              lambda: sweep_iters(r, split, ks)) for s, r in seeds.items()}
            paths = {s: starts(r, split, a.starts, ks[-1], a.batch,
                               out / "traces" / f"{r.name}_{tag}.json") for s, r in seeds.items()}
            solved = {k: {s: next(x[METRIC] for x in rows[s] if x["max_iter"] == k)
                          for s in seeds} for k in ks}
            models[model] = summarise(solved, ks, paths)
        result["splits"][" ".join(split)] = models
    result["answers"] = answers(result)
    head, rows = table(result)
    t = Table(title=result["title"])
    for h in head:
        t.add_column(h, justify="left" if h in ("split", "model") else "right")
    for r in rows:
        t.add_row(*r)
    console.print(t)
    for line in result["answers"]:
        console.print(line)
    (out / "test_time.json").write_text(json.dumps(result, indent=1))
    (out / "test_time.md").write_text(markdown(result))
    console.print(f"result: {out / 'test_time.json'}, {out / 'test_time.md'}")


if __name__ == "__main__":
    main()
