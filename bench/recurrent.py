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
import tempfile
from pathlib import Path

from train_speed import ROOT, interleaved, report


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
    out = report(runs, "twin", by="mean_ms")   # the drawn depth changes every step
    for name in ("fixed", "poisson"):
        print(f"{name} / twin {out[name]['ratio']:.3f} (target <= 1.05)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
