"""No cost for openness (issue 16): the default recipe with its model named by short name
(`resnet_deq`) and by import path (`deqctl.models.image:ResNetDEQ`), trained back to back
in alternating pairs; prints each pair's ms/step and the median ratio (path / name).

    python bench/open_cost.py                  # 3 pairs of 60 steps: ~6 min
    python bench/open_cost.py --pairs 5 --steps 40

The same model is built either way (same seed, same weights, same losses: checked), so
the ratio measures only what resolving a part by import path costs per step: nothing is
expected, and a ratio within this machine's pair-to-pair noise is the target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = {"short name": "model.name=resnet_deq",
         "import path": "model.name=deqctl.models.image:ResNetDEQ"}


def train(run: Path, model: str, steps: int) -> list[dict]:
    """Train the default recipe for `steps` steps (no evaluation); its train rows."""
    cmd = [sys.executable, "-m", "deqctl", "train", str(ROOT / "configs/mnist-deq.yaml"),
           model, f"train.max_steps={steps}", f"train.log_every={steps // 3}",
           "data.limit_eval=100", "--out", str(run), "--plain"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {(done.stderr or done.stdout).strip()[-500:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def ms_per_step(rows: list[dict]) -> float:
    """Training time per step after the first row (start-up and first steps excluded)."""
    first, last = rows[0], rows[-1]
    return 1000 * (last["wall_s"] - first["wall_s"]) / (last["step"] - first["step"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            order = list(NAMES.items()) if i % 2 == 0 else list(NAMES.items())[::-1]
            ms, losses = {}, {}
            for label, override in order:
                rows = train(Path(tmp) / f"{i}-{label.replace(' ', '-')}", override, args.steps)
                ms[label], losses[label] = ms_per_step(rows), [r["loss"] for r in rows]
            if losses["short name"] != losses["import path"]:
                sys.exit("the two names built different models: losses differ")
            ratios.append(ms["import path"] / ms["short name"])
            print(f"pair {i + 1}: short name {ms['short name']:.1f} ms/step, import path "
                  f"{ms['import path']:.1f} ms/step, ratio {ratios[-1]:.3f}", flush=True)
    spread = max(ratios) - min(ratios)
    print(f"median ratio (import path / short name): {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f} .. {max(ratios):.3f}, spread {spread:.3f}), losses "
          f"identical in every pair")


if __name__ == "__main__":
    main()
