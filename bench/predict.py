"""Is `deqctl predict` as fast as `deqctl eval` on the same inputs, and are its
predictions eval's? (issue 17). A trained image classifier's test split is written out as
an image folder (one PNG per digit, in class subfolders) and as an .npz; both commands
then run on each, back to back, as subprocesses.

    deqctl train configs/mnist-deq.yaml --out runs/mnist-deq
    python bench/predict.py runs/mnist-deq                   # ~2 min on 2 CPU cores

Per input kind it prints each command's wall time (start-up, reading and decoding the
inputs, the model) and samples/s as each reports it: eval's counts the model's loop only,
its split being in memory already; predict's counts everything after the model is loaded,
decoding every PNG included, so the ratio of those favours eval. Target: predict's
samples/s within 10% of eval's (ratio >= 0.9). On the folder, the accuracy computed from
predict's rows must equal eval's exactly.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from deqctl.inspect import open_source


def deqctl(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "deqctl", *map(str, args)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"deqctl {args[0]} failed: {(done.stderr or done.stdout).strip()[-300:]}")
    return done, time.perf_counter() - start


def write_inputs(run: str, folder: Path) -> tuple[Path, Path, int]:
    """The run's test split as folder/{train,test}/<class>/NNNN.png (train: one image per
    class, which an image folder needs) and as folder/test.npz; returns both and n."""
    src = open_source(run)
    data = src.data()
    names = [src.info.class_name(i) for i in range(src.info.num_classes)]
    for part, split in (("train", data.train), ("test", data.test)):
        seen = set()
        for i, (x, y) in enumerate(zip(split.inputs, split.targets.tolist())):
            if part == "train" and y in seen:
                continue
            seen.add(y)
            d = folder / part / names[y]
            d.mkdir(parents=True, exist_ok=True)
            pixels = x.numpy()
            Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
                            ).save(d / f"{i:05d}.png")
    x, y = data.test.inputs.numpy(), data.test.targets.numpy()
    np.savez(folder / "test.npz", x=x, y=y, x_test=x, y_test=y)
    return folder, folder / "test.npz", len(y)


def rate(stderr: str) -> float:
    return float(re.search(r"\((\d+)/s\)", stderr).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a trained image classifier's run or checkpoint")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, npz, n = write_inputs(args.run, Path(tmp))
        print(f"{args.run}: {n} test images")
        for kind, eval_data, predict_input in (
                ("image folder", ["data.name=imagefolder", f"data.root={root}"], root / "test"),
                ("npz", ["data.name=npz", f"data.path={npz}"], npz)):
            ev, t_eval = deqctl("eval", args.run, *eval_data, "--json")
            out = Path(tmp) / f"{kind.replace(' ', '-')}.csv"
            pr, t_pred = deqctl("predict", args.run, predict_input, "--out", out)
            report = json.loads(ev.stdout)
            rows = list(csv.DictReader(out.open()))
            ratio = rate(pr.stderr) / report["samples_per_s"]
            print(f"{kind}: eval {t_eval:.1f} s wall, {report['samples_per_s']:.0f} samples/s; "
                  f"predict {t_pred:.1f} s wall, {rate(pr.stderr):.0f} samples/s; ratio "
                  f"{ratio:.2f} (target >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'}), "
                  f"wall ratio eval/predict {t_eval / t_pred:.2f}")
            if kind == "image folder":
                correct = sum(r["prediction"] == r["input"].split("/")[0] for r in rows)
                same = correct == round(report["accuracy"] * n)
                print(f"  accuracy from predict's rows {correct}/{n}, eval's "
                      f"{report['accuracy']:.4f}: {'equal' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
