"""Do DEQs converge faster, use less memory and train more stably than their explicit
twins? The study on this machine, as sweeps over seeds answered by `deqctl compare
--report` (issue 18).

    python bench/evidence.py --out bench-evidence                 # every study, ~75 min
    python bench/evidence.py --only co2,overhead --out bench-evidence

Studies (each a `deqctl sweep`, then `deqctl compare --report OUT/STUDY.md`):
- co2: the CO2 forecaster, implicit against unrolled (`deq.mode`), 5 seeds; target MASE 0.35;
- mnist: the default MNIST recipe, implicit against unrolled, 3 seeds; target 97% accuracy;
- lr: the CO2 recipe over optim.lr in {1e-3, 3e-3, 1e-2, 3e-2} x both modes x 2 seeds, for
  the stable learning-rate range of each mode;
- overhead: 4 CO2 runs of 150 steps (about 20 s each) as one sweep and as 4 `deqctl
  train` commands by hand, back to back; target: the sweep at most 5% slower. Its cost
  is fixed (one more start-up: the sweep imports torch to validate every point before
  any runs), so shorter runs show it larger.
Sweeps run 2 points at a time in plan order (one thread each, one core each on 2 cores), so
every run trains in the same conditions; times are compared between the runs of one sweep,
never with another session's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CO2, MNIST = "configs/co2-forecast-deq.yaml", "configs/mnist-deq.yaml"
STUDIES = {
    "co2": (CO2, ["deq.mode=implicit,unrolled"], "0,1,2,3,4", "mase=0.35"),
    "mnist": (MNIST, ["deq.mode=implicit,unrolled"], "0,1,2", "accuracy=0.97"),
    "lr": (CO2, ["optim.lr=1e-3,3e-3,1e-2,3e-2", "deq.mode=implicit,unrolled"], "0,1",
           "mase=0.35"),
}


def deqctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "deqctl", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    if check and done.returncode not in (0, 1):      # 1: a point failed (diverged): evidence
        sys.exit(f"deqctl {args[0]} failed: {(done.stderr or done.stdout).strip()[-400:]}")
    return done


def study(name: str, out: Path, jobs: int) -> Path:
    recipe, axes, seeds, target = STUDIES[name]
    start = time.perf_counter()
    sweep = deqctl("sweep", recipe, *axes, "--seeds", seeds, "--out", out / name,
                   "--jobs", str(jobs), "--plain")
    print(f"## {name}: sweep of {recipe} {' '.join(axes)} --seeds {seeds} "
          f"({time.perf_counter() - start:.0f} s)\n{sweep.stdout.strip().splitlines()[-1]}")
    report = out / f"{name}.md"
    table = deqctl("compare", out / name, "--target", target, "--report", report, "--force")
    print(table.stdout)
    return report


def overhead(out: Path, steps: int = 150) -> None:
    """4 runs as a sweep and by hand, back to back, in the order sweep, hand, hand, sweep
    (a drift of the machine's speed over the measurement then falls on both alike)."""
    fixed = [f"train.max_steps={steps}", "train.eval_every_epoch=false", "data.limit_eval=200"]
    times = {"sweep": [], "hand": []}
    for rep, how in enumerate(["sweep", "hand", "hand", "sweep"]):
        start = time.perf_counter()
        if how == "sweep":
            deqctl("sweep", CO2, *fixed, "--seeds", "0,1,2,3", "--out",
                   out / f"overhead-sweep-{rep}", "--plain")
        else:
            for seed in range(4):
                deqctl("train", CO2, *fixed, f"seed={seed}", "--out",
                       out / f"overhead-hand-{rep}" / f"seed={seed}", "--plain")
        times[how].append(time.perf_counter() - start)
    ratio = sum(times["sweep"]) / sum(times["hand"])
    print(f"## overhead: 4 runs of {steps} steps as a sweep "
          f"{', '.join(f'{t:.1f}' for t in times['sweep'])} s; by hand "
          f"{', '.join(f'{t:.1f}' for t in times['hand'])} s; sweep / hand {ratio:.3f} "
          f"(target <= 1.05: {'met' if ratio <= 1.05 else 'NOT met'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-evidence"))
    ap.add_argument("--only", default="co2,mnist,lr,overhead")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    reports = []
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        if name == "overhead":
            overhead(args.out)
        elif name in STUDIES:
            reports.append(study(name, args.out, args.jobs))
        else:
            sys.exit(f"--only: {name!r} is not a study (valid: {', '.join([*STUDIES, 'overhead'])})")
    for r in reports:
        print(f"report: {r}")


if __name__ == "__main__":
    main()
