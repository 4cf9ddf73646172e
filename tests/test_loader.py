"""Images decoded as they are used (the "papers' scale" issue): image folders and Hugging
Face image sets hold file references, decoded in DataLoader workers; ImageNet augmentation
a pure function of (seed, epoch, index); each rank reads only its slice of a batch."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deqctl import recipe as recipes
from deqctl.data import DataError, build_data, iterate_batches
from deqctl.data import loader
from deqctl.engine.distributed import Group, shard

from cli_helpers import RECIPE, train
from test_hostile import one_line_exit_2

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def data(**kw):
    return recipes.validate({"data": kw}).data


def folder(root: Path, train_n: int = 10, test_n: int = 4, jpeg: bool = False) -> Path:
    """root/{train,test}/{a,b}/*: RGB images of a few sizes (9..11 x 7)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train_n), ("test", test_n)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n // 2):
                im = Image.fromarray(rng.integers(0, 256, (9 + i % 3, 7, 3), dtype=np.uint8))
                im.save(root / split / c / (f"{i}.jpg" if jpeg else f"{i}.png"))
    return root


def digest(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        for t in b:
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --- what a split holds --------------------------------------------------------------


def test_an_image_folder_holds_paths_not_pixels(tmp_path):
    b = build_data(data(name="imagefolder", root=str(folder(tmp_path)), image_size=8))
    files = b.train.inputs
    assert not isinstance(files, torch.Tensor)
    assert files.name(0) == str(tmp_path / "train" / "a" / "0.png")
    assert files.shape == (10, 3, 8, 8) and files.dtype == torch.uint8
    # indexing decodes (what inspection and tests use), views read nothing
    assert files[[0, 9]].shape == (2, 3, 8, 8)
    assert b.train.rows(slice(2, 5)).inputs.name(0) == files.name(2)


def test_small_in_memory_sets_and_folders_keep_today_s_batches(tmp_path):
    """Digests recorded before the change: mnist-5k (in memory) is untouched, and an
    image folder, now decoded lazily, gives the same pixels, statistics and batches."""
    m = build_data(data(name="mnist-5k"))
    assert isinstance(m.train.inputs, torch.Tensor)
    assert digest(list(iterate_batches(m.train, 64, shuffle=True, seed=3, epoch=1, start=5,
                                       augment=True, with_index=True))[:3]) == "d466087b36fd8fac"
    b = build_data(data(name="imagefolder", root=str(folder(tmp_path)), image_size=8))
    assert (b.info.mean, b.info.std) == ((0.501, 0.4958, 0.4846), (0.188, 0.1882, 0.1855))
    assert digest(iterate_batches(b.train, 4, shuffle=True, seed=3, epoch=1, augment=True,
                                  with_index=True)) == "6cb07b8c867f82b5"
    assert digest(iterate_batches(b.test, 3, shuffle=False)) == "394b7497e41d0b43"


# --- workers and resume --------------------------------------------------------------


@pytest.mark.parametrize("augment", ["imagenet", True])
def test_the_same_batches_with_0_1_2_workers_and_from_mid_epoch(tmp_path, augment):
    root = folder(tmp_path, train_n=12, jpeg=True)
    seen = []
    for workers in (0, 1, 2):
        b = build_data(data(name="imagefolder", root=str(root), image_size=6, augment=augment,
                            workers=workers))
        full = list(iterate_batches(b.train, 5, shuffle=True, seed=1, epoch=2,
                                    augment=augment, with_index=True))
        later = list(iterate_batches(b.train, 5, shuffle=True, seed=1, epoch=2, start=1,
                                     augment=augment, with_index=True))
        assert digest(later) == digest(full[1:])
        seen.append(digest(full))
    assert len(set(seen)) == 1 and full[0][0].shape == (5, 3, 6, 6)


def test_imagenet_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    root = folder(tmp_path, train_n=12)
    b = build_data(data(name="imagefolder", root=str(root), image_size=6, augment="imagenet"))

    def by_index(batch_size: int, seed: int = 1, epoch: int = 0) -> dict[int, torch.Tensor]:
        out = {}
        for x, _, index in iterate_batches(b.train, batch_size, shuffle=True, seed=seed,
                                           epoch=epoch, augment=True, with_index=True):
            out.update(zip(index.tolist(), x))
        return out
    a, other_batches = by_index(4), by_index(5)     # each sample sits elsewhere in its batch
    assert all(torch.equal(a[i], other_batches[i]) for i in a)
    assert not all(torch.equal(a[i], v) for i, v in by_index(4, epoch=1).items())
    assert not all(torch.equal(a[i], v) for i, v in by_index(4, seed=2).items())
    # evaluation: Resize + CenterCrop, no randomness at all
    first = [x for x, _ in iterate_batches(b.test, 2, shuffle=False)]
    again = [x for x, _ in iterate_batches(b.test, 3, shuffle=False)]
    assert torch.equal(torch.cat(first), torch.cat(again))


def test_imagenet_augmentation_needs_an_image_size_and_lazy_images(tmp_path):
    root = folder(tmp_path)
    with pytest.raises(DataError, match="data.image_size"):
        build_data(data(name="imagefolder", root=str(root), augment="imagenet"))
    with pytest.raises(recipes.RecipeError, match="data.augment"):
        data(name="mnist-5k", augment="imagenet")


# --- bad input -----------------------------------------------------------------------


def test_a_corrupt_image_in_a_worker_is_named_in_one_line(tmp_path):
    root = folder(tmp_path / "imgs", train_n=16)
    bad = root / "train" / "b" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])      # the header reads; the pixels do not
    result = train(RECIPE, "data.name=imagefolder", f"data.root={root}", "data.image_size=8",
                   "data.workers=1", "data.batch_size=4", "model.channels=8",
                   "model.inner_channels=16", "train.max_steps=8", "runtime.threads=1",
                   "--out", str(tmp_path / "run"), "--plain")
    line = one_line_exit_2(result)
    assert f"{bad}: not a readable image" in line


def test_a_hung_worker_stops_the_run_in_one_line(tmp_path, monkeypatch):
    b = build_data(data(name="imagefolder", root=str(folder(tmp_path)), image_size=8,
                        workers=1))
    monkeypatch.setattr(loader, "WORKER_TIMEOUT_S", 1)
    monkeypatch.setattr(loader, "_decode_one", lambda *a, **k: __import__("time").sleep(30))
    with pytest.raises(DataError, match="data.workers") as err:
        list(iterate_batches(b.train, 4, shuffle=False))
    assert "\n" not in str(err.value)


# --- ranks ---------------------------------------------------------------------------

RANK_SCRIPT = """
import json, sys
import torch
from deqctl import recipe as recipes
from deqctl.data import build_data, iterate_batches, loader
from deqctl.engine.distributed import join, leave

group = join("cpu")
count = [0]
decode = loader._decode_one
def counted(*a, **k):
    count[0] += 1
    return decode(*a, **k)
loader._decode_one = counted
cfg = recipes.validate({"data": {"name": "imagefolder", "root": sys.argv[1], "image_size": 6,
                                 "augment": "imagenet"}}).data
b = build_data(cfg)
count[0] = 0
out = [[int(i) for i in index] + [float(x.sum())] for x, _, index in iterate_batches(
    b.train, 5, shuffle=True, seed=1, epoch=0, augment=True, with_index=True,
    shard=(group.rank, group.world))]
print("RESULT", json.dumps({"rank": group.rank, "read": count[0], "batches": out}))
leave(group)
"""


def test_each_of_two_ranks_reads_only_its_slice_of_each_batch(tmp_path):
    root = folder(tmp_path / "imgs", train_n=12)
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), str(root)], capture_output=True,
                          text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    got = sorted((json.loads(line.split("RESULT ", 1)[1]) for line in done.stdout.splitlines()
                  if "RESULT " in line), key=lambda r: r["rank"])
    assert [r["read"] for r in got] == [5, 7]        # batches of 5, 5, 2: 2+2+1 and 3+3+1
    b = build_data(data(name="imagefolder", root=str(root), image_size=6, augment="imagenet"))
    for i, (x, _, index) in enumerate(iterate_batches(b.train, 5, shuffle=True, seed=1,
                                                      augment=True, with_index=True)):
        for r in (0, 1):
            part = shard(Group(r, 2), len(index))
            row = got[r]["batches"][i]
            assert row[:-1] == index[part].tolist()
            assert row[-1] == pytest.approx(float(x[part].sum()), rel=1e-6)


def test_a_run_may_resume_with_another_number_of_workers():
    from deqctl.engine.resume import check_changes

    saved = recipes.validate({"data": {"name": "imagefolder", "root": "x", "workers": 0}})
    wanted = recipes.validate({"data": {"name": "imagefolder", "root": "x", "workers": 4}})
    assert check_changes(saved, wanted) == []            # batches are the same with any
    with pytest.raises(recipes.RecipeError, match="data.augment"):
        check_changes(saved, recipes.validate({"data": {"name": "imagefolder", "root": "x",
                                                        "augment": "imagenet"}}))


def test_torch_keeps_the_cores_on_the_cpu_and_gives_them_to_the_workers_beside_a_gpu(monkeypatch):
    """On the CPU the model computes all the time and a worker sleeps once a batch ahead:
    torch at 1 of 2 threads beside 2 workers was 1.5x slower (bench/train_speed.py --only
    decoding). Beside a GPU the CPU is the workers'. runtime.threads wins either way."""
    from deqctl.engine import device

    monkeypatch.setattr(device.torch, "set_num_threads", lambda n: seen.append(n))
    monkeypatch.setattr(device.torch, "get_num_threads", lambda: seen[-1])
    cpu, gpu = device.torch.device("cpu"), device.torch.device("cuda", 0)
    seen = [4]
    assert device.budget_threads(None, 2, cpu) == "4 threads + 2 data workers of 1 thread"
    assert seen == [4]
    seen = [4]
    assert device.budget_threads(None, 2, gpu) == "2 threads + 2 data workers of 1 thread"
    seen = [4]
    assert device.budget_threads(None, 8, gpu) == "1 thread + 8 data workers of 1 thread"
    for where in (cpu, gpu):
        seen = [4]
        assert device.budget_threads(3, 2, where) == "3 threads + 2 data workers of 1 thread"
        seen = [4]
        assert device.budget_threads(None, 0, where) == "4 threads" and seen == [4]
