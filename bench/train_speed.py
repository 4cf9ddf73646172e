"""Training speed after the data-at-scale work (issue 30): ms/step of the default recipe
(configs/mnist-deq.yaml), ratios measured in the same run.

1. small path: the recipe as is (embedded MNIST held in memory) at git revision --base,
   checked out in a temporary `git worktree`, against the working tree (target: the
   ratio new / base within 1 +- 0.02);
2. workers: the same 4000 digits written to an image folder (28x28 grey PNGs, a folder per
   class) and read with data.workers=2, and with 0, against the digits in memory
   (target: workers=2 / memory <= 1.10). Beside the runs at --threads, one with
   data.workers=2 and runtime.threads unset shows the share deqctl picks itself;
3. decoding: where the workers are busy: 4000 RGB JPEGs of 160x160 pixels, decoded with
   data.augment=imagenet (RandomResizedCrop to 28) by 2 workers, torch at 2 threads against
   torch at 1 (the cores less the workers). Whether torch should give the workers its cores.

Every run is `deqctl train` in a fresh process, --steps steps, no evaluation before the
final one (100 test samples). Runs are interleaved (A, B, A, B, ...), --repeats each; a
run's figure is the median step_time_s of its train rows (the first, warm-up, left out),
a variant's the median over its runs; the spread is the range of the per-repeat ratios.

    python bench/train_speed.py                   # 3 repeats of 100 steps: ~18 min on 2 cores
    python bench/train_speed.py --only workers --repeats 5
    python bench/train_speed.py --only decoding

Needs git (the base worktree), Linux (/proc/stat) and a machine otherwise idle: each run
says how many cores other processes kept busy meanwhile. Two torch threads on 2 cores slow
several-fold while anything else computes, so a run with others above ~0.1 is not a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "configs/mnist-deq.yaml"


def export_digits(root: Path) -> Path:
    """root/{train,test}/<digit>/NNNNN.png: the embedded mnist-5k digits the recipe trains on."""
    from PIL import Image

    from deqctl import recipe as recipes
    from deqctl.data import build_data

    bundle = build_data(recipes.validate({"data": {"name": "mnist-5k"}}).data)
    for part, split in (("train", bundle.train), ("test", bundle.test)):
        for i, (x, y) in enumerate(zip(split.inputs, split.targets.tolist())):
            folder = root / part / str(y)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[0].numpy()).save(folder / f"{i:05d}.png")
    return root


def export_photos(root: Path, n: int = 4000, side: int = 160) -> Path:
    """root/{train,test}/<class>/NNNNN.jpg: `n` smooth random RGB pictures (a tenth for
    test) in 10 classes, JPEG-encoded, so that decoding and cropping cost what photos do."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        part = "test" if i % 10 == 0 else "train"
        folder = root / part / str(i % 7)
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, size=(side // 8, side // 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((side, side), Image.BICUBIC).save(folder / f"{i:05d}.jpg",
                                                                         quality=90)
    return root


def others_cpu(since: tuple[float, float, float] | None = None):
    """Cores the rest of the machine kept busy since `since` (a reading of this function):
    CPU time of all processes (/proc/stat) less that of this one's finished children, per
    second. Without `since`, the reading itself. The load average would count the run's
    own threads."""
    with open("/proc/stat") as fh:
        user, nice, system, _, _, irq, softirq, steal = map(int, fh.readline().split()[1:9])
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    now = ((user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"),
           kids.ru_utime + kids.ru_stime, time.monotonic())
    if since is None:
        return now
    return ((now[0] - since[0]) - (now[1] - since[1])) / (now[2] - since[2])


def train(code: Path, overrides: list[str], out: Path) -> dict:
    """One `deqctl train` of the recipe with the package under `code` (cwd outside any
    checkout, so `python -m` imports that one): median and mean ms/step of its train rows
    after the first, mean forward NFE, the device line, and the cores others kept busy."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(code)
    before = others_cpu()
    done = subprocess.run([sys.executable, "-m", "deqctl", "train", str(code / RECIPE), *overrides,
                           "--plain", "--out", str(out)], cwd=out.parent, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{out.name} failed: {(done.stdout + done.stderr).strip()[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, *steps = [r for r in rows if r["split"] == "train"]
    if not steps:
        sys.exit("--steps: too few for two train rows (log_every of the recipe: 10)")
    last = steps[-1]
    return {"ms": 1000 * statistics.median(r["step_time_s"] for r in steps),
            "mean_ms": 1000 * (last["wall_s"] - first["wall_s"]) / (last["step"] - first["step"]),
            "nfe": statistics.fmean(r["fwd_nfe"] for r in steps),
            "device": next(line for line in done.stdout.splitlines()
                           if line.startswith("device:")),
            "others": others_cpu(before)}


def interleaved(variants: dict[str, tuple[Path, list[str]]], repeats: int, tmp: Path) -> dict:
    """Each variant's runs, taken in turn: the machine's drift falls on all of them alike."""
    runs = {name: [] for name in variants}
    for i in range(repeats):
        for name, (code, overrides) in variants.items():
            run = train(code, overrides, tmp / f"{name}-{i}")
            runs[name].append(run)
            print(f"  {name} #{i + 1}: {run['ms']:.0f} ms/step (mean {run['mean_ms']:.0f}), "
                  f"fwd nfe {run['nfe']:.1f}, others busy {run['others']:.2f} cores",
                  file=sys.stderr, flush=True)
    return runs


def report(runs: dict, reference: str, by: str = "ms") -> dict:
    """Print each variant's ms/step (`by`: "ms", the median step_time_s of a run's rows, or
    "mean_ms", its wall time per step) and its ratio to `reference` with the range of the
    per-repeat ratios; return them."""
    ref = statistics.median(r[by] for r in runs[reference])
    out = {}
    for name, rs in runs.items():
        ms = statistics.median(r[by] for r in rs)
        per_repeat = [r[by] / base[by] for r, base in zip(rs, runs[reference])]
        out[name] = {"ms_per_step": round(statistics.median(r["ms"] for r in rs), 1),
                     "mean_ms_per_step": round(statistics.median(r["mean_ms"] for r in rs), 1),
                     "ratio": round(ms / ref, 4),
                     "spread": [round(min(per_repeat), 4), round(max(per_repeat), 4)],
                     "fwd_nfe": round(statistics.fmean(r["nfe"] for r in rs), 2),
                     "others_cores": round(max(r["others"] for r in rs), 2),
                     "threads": rs[0]["device"]}
        print(f"{name:>16}: {ms:6.0f} ms/step  {ms / ref:.3f}x {reference} (per repeat "
              f"{min(per_repeat):.3f}-{max(per_repeat):.3f}); fwd nfe {out[name]['fwd_nfe']:.1f}; "
              f"others busy <= {out[name]['others_cores']:.2f} cores; {rs[0]['device']}")
    return out


def where(code: Path) -> str:
    """The deqctl.__file__ a run with `code` on PYTHONPATH imports."""
    done = subprocess.run([sys.executable, "-c", "import deqctl; print(deqctl.__file__)"],
                          cwd=tempfile.gettempdir(), env={**os.environ, "PYTHONPATH": str(code)},
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


def small_path(rev: str, overrides: list[str], repeats: int, tmp: Path) -> dict:
    """The recipe at `rev` (a temporary worktree, removed after) against the working tree."""
    base = tmp / "base"
    git = ["git", "-C", str(ROOT), "worktree"]
    subprocess.run(git + ["add", "--detach", str(base), rev], check=True, capture_output=True)
    try:
        print(f"base {rev}: {where(base)}\nnew: {where(ROOT)}")
        runs = interleaved({"base": (base, overrides), "new": (ROOT, overrides)}, repeats, tmp)
    finally:
        subprocess.run(git + ["remove", "--force", str(base)], check=True)
    out = report(runs, "base")
    print(f"small path: new / base {out['new']['ratio']:.3f} (target 0.98-1.02)")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="8eff31f", help="the revision before the data work")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="runtime.threads of every run")
    p.add_argument("--only", choices=["small", "workers", "decoding"])
    a = p.parse_args()
    quiet = [f"train.max_steps={a.steps}", "train.eval_every_epoch=false", "train.eval_every=0",
             "data.limit_eval=100"]
    common = quiet + [f"runtime.threads={a.threads}"]
    out = {}
    with tempfile.TemporaryDirectory(prefix="deqctl-train-speed-") as tmp:
        tmp = Path(tmp)
        if a.only in (None, "small"):
            out["small"] = small_path(a.base, common, a.repeats, tmp)
        if a.only in (None, "workers"):
            folder = ["data.name=imagefolder", f"data.root={export_digits(tmp / 'digits')}"]
            runs = interleaved({"memory": (ROOT, common),
                                "folder-workers2": (ROOT, common + folder + ["data.workers=2"]),
                                "folder-workers0": (ROOT, common + folder + ["data.workers=0"]),
                                "folder-w2-budget": (ROOT, quiet + folder + ["data.workers=2"])},
                               a.repeats, tmp)
            out["workers"] = report(runs, "memory")
            print(f"workers: folder (2 workers) / memory "
                  f"{out['workers']['folder-workers2']['ratio']:.3f} (target <= 1.10)")
        if a.only in (None, "decoding"):
            photos = ["data.name=imagefolder", f"data.root={export_photos(tmp / 'photos')}",
                      "data.augment=imagenet", "data.image_size=28", "data.workers=2"]
            runs = interleaved({"torch-2-threads": (ROOT, quiet + photos + ["runtime.threads=2"]),
                                "torch-1-thread": (ROOT, quiet + photos + ["runtime.threads=1"]),
                                "workers-0": (ROOT, quiet + photos[:-1] + ["data.workers=0",
                                                                           "runtime.threads=2"])},
                               a.repeats, tmp)
            out["decoding"] = report(runs, "torch-2-threads")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
