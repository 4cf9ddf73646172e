"""Image loading at scale: deqctl's loader against torchvision's, in the same run.

    python bench/data.py                      # 2,000 / 20,000 JPEGs of 256 px, 2 workers
    python bench/data.py --images 20000 --many 200000 --workers 8

1. images/s of deqctl's loader (data.workers=N, data.augment=imagenet: RandomResizedCrop
   + flip) against torchvision ImageFolder + DataLoader(num_workers=N) with the same
   transforms, on a generated folder of --images JPEGs (target: >= 0.9x);
2. peak RSS of deqctl's loader iterating a folder of --many JPEGs against one of --images
   (each in a fresh process; memory flat: within 10%).
Not a test: it prints ratios measured in this run. Generated folders are cached in --dir.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIZE, CROP, CLASSES = 256, 224, 10


def make_folder(root: Path, n: int) -> Path:
    """root/{train,test}/cNN/*.jpg: n smooth random 256 px JPEGs (test: 20), made once."""
    from PIL import Image

    done = root / f"done-{n}"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for split, count in (("train", n), ("test", 20)):
        for i in range(count):
            folder = root / split / f"c{i % CLASSES:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            shift = rng.integers(0, 64, 3, dtype=np.uint8)
            im = Image.fromarray(base + shift).resize((SIZE, SIZE), resample=2)
            im.save(folder / f"{i:06d}.jpg", quality=90)
    done.touch()
    return root


def deqctl_rate(root: Path, workers: int, batch: int, limit: int) -> float:
    """Images/s of one deqctl epoch (or `limit` images) with ImageNet augmentation."""
    from deqctl import recipe as recipes
    from deqctl.data import build_data, iterate_batches
    from deqctl.engine.device import budget_threads

    budget_threads(None, workers)
    cfg = recipes.validate({"data": {"name": "imagefolder", "root": str(root), "workers": workers,
                                     "image_size": CROP, "augment": "imagenet"}}).data
    split = build_data(cfg).train
    seen, start = 0, time.perf_counter()
    for x, _ in iterate_batches(split, batch, shuffle=True, seed=0, epoch=0, augment=True):
        seen += len(x)
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def torchvision_rate(root: Path, workers: int, batch: int, limit: int) -> float:
    """Images/s of torchvision ImageFolder + DataLoader with the same transforms."""
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(CROP), transforms.RandomHorizontalFlip(),
                             transforms.PILToTensor()])
    ds = datasets.ImageFolder(str(root / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True,
                                         num_workers=workers)
    seen, start = 0, time.perf_counter()
    for x, _ in loader:
        x = x.float().div_(255.0)        # deqctl hands out float in [0, 1]
        seen += len(x)
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def peak_rss(root: Path, workers: int, batch: int) -> float:
    """Peak RSS (MB) of a fresh process iterating one epoch of `root` with deqctl's loader
    (the process and its workers: ru_maxrss of self and children)."""
    code = (f"import sys, resource; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import data as b; from pathlib import Path; "
            f"b.deqctl_rate(Path({str(root)!r}), {workers}, {batch}, 10**9); "
            f"print(max(resource.getrusage(w).ru_maxrss for w in "
            f"(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--many", type=int, default=20000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dir", type=Path, default=Path("/tmp/deqctl-bench-data"))
    p.add_argument("--skip-memory", action="store_true")
    a = p.parse_args()
    small = make_folder(a.dir / f"n{a.images}", a.images)
    deqctl_rate(small, a.workers, a.batch, 4 * a.batch)           # warm the page cache
    torchvision_rate(small, a.workers, a.batch, 4 * a.batch)
    ours = deqctl_rate(small, a.workers, a.batch, a.images)
    theirs = torchvision_rate(small, a.workers, a.batch, a.images)
    out = {"images": a.images, "workers": a.workers, "deqctl_images_per_s": round(ours, 1),
           "torchvision_images_per_s": round(theirs, 1), "ratio": round(ours / theirs, 3)}
    print(f"throughput: deqctl {ours:.0f} images/s, torchvision {theirs:.0f} images/s: "
          f"{ours / theirs:.2f}x (target >= 0.9x)")
    if not a.skip_memory:
        many = make_folder(a.dir / f"n{a.many}", a.many)
        rss_small, rss_many = peak_rss(small, a.workers, a.batch), peak_rss(many, a.workers, a.batch)
        out.update(rss_mb={str(a.images): round(rss_small), str(a.many): round(rss_many)},
                   rss_ratio=round(rss_many / rss_small, 3))
        print(f"peak RSS: {rss_many:.0f} MB for {a.many} images, {rss_small:.0f} MB for "
              f"{a.images}: {rss_many / rss_small:.2f}x (target <= 1.10x)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
