"""Train the shipped recipes and check each against its target (issue 8): the final test
metric and the wall time of the whole `deqctl train` command, start-up, data loading and
every evaluation included.

    python bench/recipes.py                       # all three, one after another (~30 min)
    python bench/recipes.py --only co2            # one of: co2, sequential-mnist, shakespeare
    python bench/recipes.py --out bench-runs      # where the runs go (default: a temp dir)

Run it on an otherwise idle machine: the budgets are wall-clock times on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Target:
    recipe: str
    metric: str
    bound: float          # the metric must be <= bound (lower is better) or >= (higher)
    higher_is_better: bool
    budget_s: float       # wall time of the whole command

    def met(self, value: float) -> bool:
        return value >= self.bound if self.higher_is_better else value <= self.bound


TARGETS = {
    "co2": Target("configs/co2-forecast-deq.yaml", "mase", 0.30, False, 180),
    "sequential-mnist": Target("configs/sequential-mnist-deq.yaml", "accuracy", 0.97, True, 600),
    "shakespeare": Target("configs/shakespeare-deq.yaml", "bpc", 2.5, False, 900),
}


def run(name: str, target: Target, out: Path) -> dict:
    run_dir = out / name
    cmd = [sys.executable, "-m", "deqctl", "train", str(ROOT / target.recipe), "--out",
           str(run_dir), "--plain"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"name": name, "error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["split"] == "test"][-1]
    value = final[target.metric]
    return {"name": name, "metric": target.metric, "value": value, "wall_s": wall,
            "metric_ok": target.met(value), "time_ok": wall <= target.budget_s,
            "converged": final["fwd_converged"], "fwd_nfe": final["fwd_nfe"],
            "run": str(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(TARGETS), help="comma-separated targets")
    parser.add_argument("--out", type=Path, default=None, help="run directories (default: temp)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="deqctl-bench-"))
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target {', '.join(unknown)} (valid: {', '.join(TARGETS)})")
    print(f"{'target':<18} {'metric':<9} {'value':>8} {'bound':>7} {'wall s':>7} {'budget':>7} "
          f"{'conv':>6} {'NFE':>5}  verdict")
    for name in names:
        t = TARGETS[name]
        r = run(name, t, out)
        if "error" in r:
            print(f"{name:<18} failed: {' '.join(r['error'])}")
            continue
        verdict = "PASS" if r["metric_ok"] and r["time_ok"] else (
            "MISS (" + ", ".join(k for k, ok in (("metric", r["metric_ok"]), ("time", r["time_ok"]))
                                 if not ok) + ")")
        sign = ">=" if t.higher_is_better else "<="
        print(f"{name:<18} {t.metric:<9} {r['value']:>8.4f} {sign}{t.bound:>5g} {r['wall_s']:>7.0f} "
              f"{t.budget_s:>7.0f} {r['converged']:>6.1%} {r['fwd_nfe']:>5.1f}  {verdict}", flush=True)
    print(f"runs in {out}")


if __name__ == "__main__":
    main()
