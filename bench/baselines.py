"""Does the shipped sequence-classification recipe hold up off its home data? Each set of
bench/seqsets.py is trained by configs/sequential-mnist-deq.yaml moved there by `data.*`
overrides alone (as a new user would), and by the same recipe with deq.mode=baseline (a
GRU), both by the same loop on the same machine in turn (issue 18, part 7).

    python bench/baselines.py --out DIR [--sets cbf,two_patterns] [--seeds 0]
                              [--size 400] [--test-size 2000] [--eval-every 63]

Per set: each side's final test accuracy and training time after the recipe's steps, and
both at the same training time T (the shorter of the two, the GRU's): the accuracy of the
model each held at T, i.e. its last evaluation at or before T. Not the best evaluation by
T: the faster side has more evaluations by then, and the best of more noisy readings is
biased upwards. Evaluations come every `--eval-every` steps (train.eval_every: when to
evaluate, not how to train; training is bit-identical whatever it is, see
tests/test_cli_train.py) on `--test-size` held-out sequences, so that a reading at T is at
most a few seconds old and one sequence is a small fraction of a point. Target: the DEQ at
least the GRU's accuracy at T. With several seeds, a second table gives per set the mean
over seeds of each side at T and the paired difference DEQ - GRU with its 95% Student-t
interval (deqctl.inspect.stats). Runs already finished under DIR are read, not retrained;
DIR/plan.json records the sizes and evaluation cadence they were made with, and another
plan for the same DIR is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import seqsets  # noqa: E402

from deqctl.inspect.stats import Estimate, estimate, paired  # noqa: E402

RECIPE = "configs/sequential-mnist-deq.yaml"
SIDES = {"deq": [], "gru": ["deq.mode=baseline"]}


def train(out: Path, data: Path, extra: list[str], seed: int, eval_every: int) -> list[dict]:
    if not (out / "checkpoints" / "final").is_dir():
        done = subprocess.run(
            [sys.executable, "-m", "deqctl", "train", RECIPE, "data.name=npz",
             f"data.path={data}", f"seed={seed}", *extra, f"train.eval_every={eval_every}",
             "--out", str(out), "--plain"],
            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
        if done.returncode != 0:
            sys.exit(f"{out}: {(done.stderr or done.stdout).strip()[-400:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_plan(out: Path, plan: dict) -> None:
    """Record the data and evaluation settings DIR's runs were made with; refuse others,
    since finished runs are read back rather than retrained."""
    path = out / "plan.json"
    if path.is_file() and json.loads(path.read_text()) != plan:
        sys.exit(f"{out} holds runs made with {path.read_text().strip()}, not {plan}: "
                 "use another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan))


def at_time(rows: list[dict], t: float) -> float | None:
    """The test accuracy of the model held at training time t: the last evaluation at or
    before t (None: no evaluation yet)."""
    held = [r["accuracy"] for r in rows if r["split"] == "test" and r["wall_s"] <= t + 1e-9]
    return held[-1] if held else None


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def points(e: Estimate | None) -> str:
    """An estimate of accuracy as percentage points: mean [low, high]."""
    if e is None:
        return "-"
    ci = f" [{100 * e.ci95[0]:+.1f}, {100 * e.ci95[1]:+.1f}]" if e.ci95 else ""
    return f"{100 * e.mean:+.2f}{ci}"


def verdict(e: Estimate | None) -> str:
    if e is None:
        return "-"
    if e.mean >= 0:
        return "yes"
    return "no (behind)" if e.excludes_zero() else "no (mean behind; not shown at this n)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sets", default="synthetic_control,two_patterns,bump_order,cbf")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--size", type=int, default=400, help="training sequences of each set")
    ap.add_argument("--test-size", type=int, default=2000, help="test sequences of each set")
    ap.add_argument("--eval-every", type=int, default=63, help="steps between evaluations")
    args = ap.parse_args()
    out = args.out.resolve()
    check_plan(out, {"size": args.size, "test_size": args.test_size,
                     "eval_every": args.eval_every})
    seqsets.write(out / "data", args.size, args.test_size, 0)
    seeds = [int(s) for s in args.seeds.split(",")]
    # (set, side, "at T" | "final") -> {seed: accuracy}
    seen: dict[tuple[str, str, str], dict[int, float | None]] = defaultdict(dict)
    print("| set | seed | DEQ final | DEQ time (s) | GRU final | GRU time (s) | DEQ final >= "
          "GRU final | T (s) | DEQ at T | GRU at T | DEQ >= GRU at T |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.sets.split(","):
        for seed in seeds:
            runs = {side: train(out / f"{name}-{side}-{seed}", out / "data" / f"{name}.npz",
                                extra, seed, args.eval_every) for side, extra in SIDES.items()}
            final = {s: [r for r in rows if r["split"] == "test"][-1] for s, rows in runs.items()}
            t = min(final[s]["wall_s"] for s in runs)
            at = {s: at_time(rows, t) for s, rows in runs.items()}
            for side in runs:
                seen[name, side, "at T"][seed] = at[side]
                seen[name, side, "final"][seed] = final[side]["accuracy"]
            print(f"| {name} | {seed} | {final['deq']['accuracy']:.1%} | "
                  f"{final['deq']['wall_s']:.0f} | {final['gru']['accuracy']:.1%} | "
                  f"{final['gru']['wall_s']:.0f} | "
                  f"{'yes' if final['deq']['accuracy'] >= final['gru']['accuracy'] else 'no'} | "
                  f"{t:.0f} | {pct(at['deq'])} | {pct(at['gru'])} | "
                  f"{'yes' if (at['deq'] or 0) >= (at['gru'] or 0) else 'no'} |",
                  flush=True)
    if len(seeds) > 1:
        print(f"\nOver seeds {args.seeds}: mean accuracy, and DEQ - GRU in points (95% "
              "interval, paired by seed)\n")
        print("| set | n | DEQ at T | GRU at T | DEQ - GRU at T | DEQ >= GRU at T | DEQ final | "
              "GRU final | DEQ - GRU final |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in args.sets.split(","):
            mean = {(side, when): estimate(seen[name, side, when].values())
                    for side in SIDES for when in ("at T", "final")}
            diff = {when: paired(seen[name, "gru", when], seen[name, "deq", when])
                    for when in ("at T", "final")}
            print(f"| {name} | {len(diff['at T'][1])} | {pct(mean['deq', 'at T'].mean)} | "
                  f"{pct(mean['gru', 'at T'].mean)} | {points(diff['at T'][0])} | "
                  f"{verdict(diff['at T'][0])} | {pct(mean['deq', 'final'].mean)} | "
                  f"{pct(mean['gru', 'final'].mean)} | {points(diff['final'][0])} |")


if __name__ == "__main__":
    main()
