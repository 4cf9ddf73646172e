"""Recurrent-depth training's step time (issue 32, item 1): `deq.mode=recurrent` against the
unrolled twin at the same mean depth D, on the default recipe (configs/mnist-deq.yaml),
ratios measured in the same run.

- twin: deq.mode=unrolled, depth D (backprop through all D applications): the reference;
- fixed: deq.mode=recurrent, depth D, backprop D: the twin's computation through the
  recurrent code path (target: fixed / twin <= 1.05);
- poisson: a Poisson-lognormal depth with mean D (sigma 0.5), backprop through every drawn
  application: the twin's cost on average (target: poisson / twin <= 1.05);
- with --backprop K, also poisson-kK: the same draw with gradients through the last K
  applications only (Huginn's setting; cheaper, no target).

Every run is `deqctl train` in a fresh process (bench/train_speed.py's `train` and
`interleaved`: runs taken in turn, A, B, C, A, B, C, ...), --steps steps, no evaluation
before the final one. A drawn depth varies from step to step, so the ratios compare mean
ms/step (training wall time over steps, the first logged interval left out); the median of
the logged intervals is printed beside them. The spread is the range of per-repeat ratios.

    python bench/recurrent.py                       # D = 20, 3 repeats of 100 steps
    python bench/recurrent.py --depth 32 --backprop 8 --repeats 5
    python bench/recurrent.py --steps 2 --repeats 1 --log-every 1     # a smoke run

Run it on an otherwise idle machine (each run prints the cores others kept busy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from train_speed import ROOT, interleaved


def variants(depth: int, backprop: int | None) -> dict[str, list[str]]:
    """Each variant's deq.* overrides, the twin first."""
    rec = ["deq.mode=recurrent", f"deq.recurrent.depth={depth}", f"deq.eval.max_iter={depth}"]
    poisson = [*rec, "deq.recurrent.distribution=poisson-lognormal"]
    out = {"twin": ["deq.mode=unrolled", f"deq.unrolled.depth={depth}"],
           "fixed": [*rec, f"deq.recurrent.backprop={depth}"],
           "poisson": poisson}
    if backprop is not None:
        out[f"poisson-k{backprop}"] = [*poisson, f"deq.recurrent.backprop={backprop}"]
    return out


def report(runs: dict[str, list[dict]], reference: str = "twin") -> dict:
    """Print each variant's mean and median ms/step and its mean-ms ratio to `reference`
    with the range of the per-repeat ratios; return them."""
    ref = statistics.median(r["mean_ms"] for r in runs[reference])
    out = {}
    for name, rs in runs.items():
        mean_ms = statistics.median(r["mean_ms"] for r in rs)
        per_repeat = [r["mean_ms"] / base["mean_ms"] for r, base in zip(rs, runs[reference])]
        out[name] = {"mean_ms_per_step": round(mean_ms, 1), "ratio": round(mean_ms / ref, 4),
                     "spread": [round(min(per_repeat), 4), round(max(per_repeat), 4)],
                     "median_ms_per_step": round(statistics.median(r["ms"] for r in rs), 1),
                     "fwd_nfe": round(statistics.fmean(r["nfe"] for r in rs), 2),
                     "others_cores": round(max(r["others"] for r in rs), 2),
                     "device": rs[0]["device"]}
        print(f"{name:>12}: {mean_ms:7.1f} ms/step (median interval "
              f"{out[name]['median_ms_per_step']:.1f})  {mean_ms / ref:.3f}x {reference} "
              f"(per repeat {min(per_repeat):.3f}-{max(per_repeat):.3f}); mean depth "
              f"{out[name]['fwd_nfe']:.1f}; others busy <= {out[name]['others_cores']:.2f} cores")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=20, help="D: the twin's depth and the mean "
                   "depth of the recurrent runs (default: the recipe's forward max_iter)")
    p.add_argument("--backprop", type=int, default=None,
                   help="also a Poisson-lognormal run with gradients through the last K")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="runtime.threads of every run")
    p.add_argument("--device", default=None, help="runtime.device (default: deqctl picks)")
    p.add_argument("--log-every", type=int, default=None,
                   help="train.log_every (default: the recipe's, 10)")
    a = p.parse_args()
    common = [f"train.max_steps={a.steps}", "train.eval_every_epoch=false",
              "train.eval_every=0", "data.limit_eval=100", f"runtime.threads={a.threads}"]
    common += [f"runtime.device={a.device}"] if a.device else []
    common += [f"train.log_every={a.log_every}"] if a.log_every else []
    print(f"configs/mnist-deq.yaml, depth {a.depth}, {a.steps} steps, {a.repeats} repeats")
    with tempfile.TemporaryDirectory(prefix="deqctl-recurrent-") as tmp:
        runs = interleaved({name: (ROOT, common + extra)
                            for name, extra in variants(a.depth, a.backprop).items()},
                           a.repeats, Path(tmp))
    out = report(runs)
    for name in ("fixed", "poisson"):
        print(f"{name} / twin {out[name]['ratio']:.3f} (target <= 1.05)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
