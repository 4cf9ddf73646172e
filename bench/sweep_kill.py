"""A sweep killed with SIGKILL at a random moment, then run again (as often as it takes),
ends with every run finished exactly once, bit-identical to an uninterrupted sweep's runs,
with one metrics row per (split, step) (issue 18's target).

    python bench/sweep_kill.py --out DIR [--trials 5] [--seed 0]

The sweep: 4 short CO2 forecaster runs (2 lrs x 2 seeds, --jobs 2, deterministic, one
thread each, a checkpoint every 10 steps). First once uninterrupted (the reference, its
duration D); then per trial the same sweep into a new folder, SIGKILLed at a moment drawn
uniformly in [0.1 D, 0.9 D] (the sweep alone: its points see it die by PR_SET_PDEATHSIG,
as under a scheduler's kill), and run again until it exits 0. Compared per run with the
reference: the final weights byte for byte (model.safetensors), and the metrics rows
value for value apart from the clock's (wall_s, step_time_s, samples_per_s, eval_time_s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "configs/co2-forecast-deq.yaml"
ARGS = ["optim.lr=1e-3,3e-3", "--seeds", "0,1", "--jobs", "2", "--plain"]
FIXED = ["train.max_steps=60", "train.save_every=10", "train.log_every=5",
         "train.eval_every_epoch=false", "train.eval_every=30", "data.limit_eval=200",
         "runtime.deterministic=true"]
CLOCK = {"wall_s", "step_time_s", "samples_per_s", "eval_time_s", "peak_mem_mb"}


def sweep(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deqctl", "sweep", RECIPE, *FIXED, *ARGS,
                             "--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def runs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if (p / "metrics.jsonl").is_file())


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def check(run: Path, ref: Path) -> list[str]:
    """What differs between a run and its reference ([] when nothing does)."""
    problems = []
    got, want = rows(run), rows(ref)
    keys = [(r["split"], r["step"]) for r in got]
    if len(keys) != len(set(keys)):
        problems.append("a (split, step) logged twice")
    strip = [[{k: v for k, v in r.items() if k not in CLOCK} for r in rs] for rs in (got, want)]
    if strip[0] != strip[1]:
        problems.append("metrics rows differ")
    weights = "checkpoints/final/model.safetensors"
    if (run / weights).read_bytes() != (ref / weights).read_bytes():
        problems.append("final weights differ")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out, rng = args.out.resolve(), random.Random(args.seed)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ref = sweep(out / "reference")
    if ref.wait() != 0:
        sys.exit(f"reference sweep failed: {ref.stderr.read()[-400:]}")
    duration = time.perf_counter() - start
    print(f"reference sweep: {len(runs(out / 'reference'))} runs in {duration:.0f} s")
    failures = 0
    for trial in range(args.trials):
        folder, at = out / f"trial-{trial}", rng.uniform(0.1, 0.9) * duration
        proc = sweep(folder)
        time.sleep(at)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        attempts = 1
        while (again := sweep(folder)).wait() != 0:
            attempts += 1
            if attempts > 5:
                sys.exit(f"trial {trial}: still failing: {again.stderr.read()[-400:]}")
        plan = json.loads((folder / "sweep.json").read_text())
        statuses = {p["name"]: (p["status"], p["attempts"]) for p in plan["points"]}
        problems = {r.name: check(r, out / "reference" / r.name) for r in runs(folder)}
        bad = {k: v for k, v in problems.items() if v}
        if len(problems) != len(runs(out / "reference")) or \
                any(s != "finished" for s, _ in statuses.values()):
            bad["sweep"] = [f"statuses {statuses}"]
        failures += bool(bad)
        aside = sorted(p.name for p in folder.glob("*.aborted*"))   # killed before a checkpoint
        print(f"trial {trial}: SIGKILL at {at:.1f} s, finished after {attempts} more "
              f"command(s); points {statuses}{f'; set aside {aside}' if aside else ''}: "
              f"{'identical' if not bad else bad}", flush=True)
    print(f"{args.trials - failures}/{args.trials} trials end bit-identical to the reference "
          f"with one row per (split, step)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
