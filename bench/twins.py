"""Do DEQs converge faster? Each recipe against its explicit twin (`deq.mode=unrolled`, the
same cell applied a fixed number of times with backprop through all), trained here, one
after the other, and compared with `deqctl compare` (issue 9).

    python bench/twins.py                      # mnist, memory (~10 min); add lm (~30 min)
    python bench/twins.py --only mnist,memory,lm --out bench-twins

- mnist: the default recipe and its twin at the same depth (deq.forward.max_iter), evaluated
  every 21 steps; target: the DEQ's training time to 97% test accuracy <= 1.25x the twin's.
- memory: peak training memory of the DEQ (30 forward iterations) and of its twin at depth
  30, 20 steps each, no evaluation; target: DEQ <= 0.5x the twin.
- lm: the Shakespeare recipe and its twin at the depth of its forward solve, the twin given
  as many steps as fit in the DEQ's training time (from a 30-step calibration run); target:
  DEQ test bpc within 0.1 of the twin's.

Run it on an otherwise idle machine: both sides of every ratio are wall-clock times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MNIST = "configs/mnist-deq.yaml"
LM = "configs/shakespeare-deq.yaml"


def train(recipe: str, run: Path, *overrides: str) -> list[dict]:
    """Run `deqctl train` to completion and return its metrics rows."""
    cmd = [sys.executable, "-m", "deqctl", "train", str(ROOT / recipe), *overrides,
           "--out", str(run), "--plain"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        sys.exit(f"{run.name}: deqctl train failed: {' '.join(tail)}")
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def compare(runs: list[Path], target: str, plot: Path) -> dict:
    """Print the `deqctl compare` table and return its JSON."""
    base = [sys.executable, "-m", "deqctl", "compare", *map(str, runs), "--target", target]
    table = subprocess.run([*base, "--plot", str(plot)], capture_output=True, text=True,
                           cwd=ROOT, env={**os.environ, "COLUMNS": "160"})
    print(table.stdout.rstrip() or table.stderr.rstrip())
    js = subprocess.run([*base, "--json"], capture_output=True, text=True, cwd=ROOT, check=True)
    return {r["name"]: r for r in json.loads(js.stdout)["runs"]}


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def mnist(out: Path) -> None:
    deq, twin = out / "mnist-deq", out / "mnist-twin"
    train(MNIST, deq, "train.eval_every=21")
    train(MNIST, twin, "train.eval_every=21", "deq.mode=unrolled")
    got = compare([deq, twin], "accuracy=0.97", out / "mnist.png")
    t_deq, t_twin = got[deq.name]["target_wall_s"], got[twin.name]["target_wall_s"]
    if t_deq is None or t_twin is None:
        print(f"time to 97%: DEQ {t_deq}, twin {t_twin} (a run never reached it)")
        return
    ratio = t_deq / t_twin
    print(f"time to 97%: DEQ {t_deq:.0f} s, twin {t_twin:.0f} s: ratio {ratio:.2f} "
          f"(target <= 1.25: {verdict(ratio <= 1.25)})\n")


def memory(out: Path) -> None:
    short = ("train.max_steps=20", "train.eval_every_epoch=false", "train.log_every=5")
    deq, twin = out / "memory-deq", out / "memory-twin"
    peaks = {}
    for run, extra in ((deq, ("deq.forward.max_iter=30",)),
                       (twin, ("deq.mode=unrolled", "deq.unrolled.depth=30"))):
        rows = train(MNIST, run, *short, *extra)
        peaks[run.name] = max(r["peak_mem_mb"] for r in rows if r["split"] == "train")
    ratio = peaks[deq.name] / peaks[twin.name]
    print(f"peak training memory at depth 30: DEQ {peaks[deq.name]:.0f} MB, twin "
          f"{peaks[twin.name]:.0f} MB: ratio {ratio:.2f} (target <= 0.5: {verdict(ratio <= 0.5)})\n")


def lm(out: Path) -> None:
    deq, twin, calib = out / "lm-deq", out / "lm-twin", out / "lm-twin-calibration"
    rows = train(LM, deq)
    wall = max(r["wall_s"] for r in rows)
    recipe_rows = train(LM, calib, "deq.mode=unrolled", "train.max_steps=30",
                        "train.log_every=10", "train.eval_every_epoch=false")
    step_s = [r["step_time_s"] for r in recipe_rows if r["split"] == "train"][-1]
    steps = max(1, int(wall / step_s))
    print(f"lm: DEQ trained {wall:.0f} s; twin at {step_s:.3f} s/step gets {steps} steps")
    train(LM, twin, "deq.mode=unrolled", f"train.max_steps={steps}")
    got = compare([deq, twin], "bpc=2.6", out / "lm.png")
    gap = got[deq.name]["final"] - got[twin.name]["final"]
    print(f"test bpc at equal training time: DEQ {got[deq.name]['final']:.3f}, twin "
          f"{got[twin.name]['final']:.3f}: gap {gap:+.3f} (target <= 0.1: {verdict(gap <= 0.1)})\n")


BENCHES = {"mnist": mnist, "memory": memory, "lm": lm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="mnist,memory", help="comma-separated: mnist, memory, lm")
    parser.add_argument("--out", type=Path, default=None, help="run directories (default: temp)")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)} (valid: {', '.join(BENCHES)})")
    out = args.out or Path(tempfile.mkdtemp(prefix="deqctl-twins-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"runs and plots in {out}\n")
    for name in names:
        BENCHES[name](out)


if __name__ == "__main__":
    main()
