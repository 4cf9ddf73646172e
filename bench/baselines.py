"""Does the shipped sequence-classification recipe hold up off its home data? Each set of
bench/seqsets.py is trained by configs/sequential-mnist-deq.yaml moved there by `data.*`
overrides alone (as a new user would), and by the same recipe with deq.mode=baseline (a
GRU), both by the same loop on the same machine in turn (issue 18, part 7).

    python bench/baselines.py --out DIR [--sets cbf,two_patterns] [--seeds 0]

Per set: each side's final test accuracy and training time, and both at the same training
time T (the shorter of the two), read off their per-epoch evaluations: the best accuracy
each had reached by T. Target: the DEQ at least the GRU's accuracy at T.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import seqsets  # noqa: E402

RECIPE = "configs/sequential-mnist-deq.yaml"
SIDES = {"deq": [], "gru": ["deq.mode=baseline"]}


def train(out: Path, data: Path, extra: list[str], seed: int) -> list[dict]:
    if not (out / "checkpoints" / "final").is_dir():
        done = subprocess.run(
            [sys.executable, "-m", "deqctl", "train", RECIPE, "data.name=npz",
             f"data.path={data}", f"seed={seed}", *extra, "--out", str(out), "--plain"],
            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
        if done.returncode != 0:
            sys.exit(f"{out}: {(done.stderr or done.stdout).strip()[-400:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def by_time(rows: list[dict], t: float) -> float:
    """The best test accuracy reached within training time t."""
    return max((r["accuracy"] for r in rows if r["split"] == "test" and r["wall_s"] <= t + 1e-9),
               default=float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sets", default=",".join(seqsets.SETS))
    ap.add_argument("--seeds", default="0")
    args = ap.parse_args()
    out = args.out.resolve()
    seqsets.write(out / "data", 600, 600, 0)
    print("| set | seed | DEQ final | DEQ time (s) | GRU final | GRU time (s) | T (s) | "
          "DEQ by T | GRU by T | DEQ >= GRU at T |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.sets.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            runs = {side: train(out / f"{name}-{side}-{seed}", out / "data" / f"{name}.npz",
                                extra, seed) for side, extra in SIDES.items()}
            final = {s: [r for r in rows if r["split"] == "test"][-1] for s, rows in runs.items()}
            t = min(final[s]["wall_s"] for s in runs)
            at = {s: by_time(rows, t) for s, rows in runs.items()}
            print(f"| {name} | {seed} | {final['deq']['accuracy']:.1%} | "
                  f"{final['deq']['wall_s']:.0f} | {final['gru']['accuracy']:.1%} | "
                  f"{final['gru']['wall_s']:.0f} | {t:.0f} | {at['deq']:.1%} | "
                  f"{at['gru']:.1%} | {'yes' if at['deq'] >= at['gru'] else 'no'} |",
                  flush=True)


if __name__ == "__main__":
    main()
