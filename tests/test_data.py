"""Tests for deqctl.data: loaders, limits, errors, deterministic and resumable batching."""

from __future__ import annotations

import dataclasses

import json
import os
import pickle

import numpy as np
import pytest
import torch

from deqctl import recipe as recipes
from deqctl.data import (SOURCES, DataError, DataInfo, Split, augment_batch, build_data,
                         channel_stats, iterate_batches, num_batches)
from deqctl.data.batches import _generator, padding_for
from deqctl.data.idx import encode_idx, parse_idx, read_idx


def DataSettings(**kw):
    """The validated data block of a recipe (defaults: the embedded MNIST subset)."""
    return recipes.validate({"data": kw}).data


@pytest.fixture(scope="module")
def mnist5k():
    return build_data(DataSettings())


def _concat(batches):
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


# --- the embedded default ------------------------------------------------------------


def test_mnist5k_shapes_counts_and_balance(mnist5k):
    info = mnist5k.info
    assert (info.name, info.task, info.inputs, info.shape, info.num_classes) \
        == ("mnist-5k", "classify", "image", (1, 28, 28), 10)
    assert mnist5k.train.inputs.shape == (4000, 1, 28, 28)
    assert mnist5k.test.inputs.shape == (1000, 1, 28, 28)
    assert mnist5k.train.inputs.dtype == torch.uint8
    assert mnist5k.train.targets.dtype == torch.int64
    assert mnist5k.val is None
    assert mnist5k.train.targets.bincount().tolist() == [400] * 10
    assert mnist5k.test.targets.bincount().tolist() == [100] * 10
    # real digits: mostly black background with bright strokes, like full MNIST
    assert 0.10 < info.mean[0] < 0.16 and 0.28 < info.std[0] < 0.34
    assert mnist5k.train.inputs.max() == 255 and mnist5k.train.augment == "shift"


def test_info_as_dict_is_json_and_round_trips(mnist5k):
    d = json.loads(json.dumps(mnist5k.info.as_dict()))
    assert d["shape"] == [1, 28, 28] and d["mean"] == list(mnist5k.info.mean)
    assert DataInfo.from_dict(d) == mnist5k.info


def test_image_descriptions_of_older_checkpoints_still_read(mnist5k):
    old = {"name": "mnist-5k", "kind": "image", "channels": 1, "height": 28, "width": 28,
           "num_classes": 10, "mean": list(mnist5k.info.mean), "std": list(mnist5k.info.std)}
    # the class names came later: an old description reads, its classes named by index
    read = DataInfo.from_dict(old)
    assert read == dataclasses.replace(mnist5k.info, classes=())
    assert [read.class_name(i) for i in range(10)] == list(mnist5k.info.classes)


def test_limits_take_the_first_samples(mnist5k):
    small = build_data(DataSettings(limit_train=100, limit_eval=30))
    assert len(small.train) == 100 and len(small.test) == 30
    assert torch.equal(small.train.inputs, mnist5k.train.inputs[:100])
    assert torch.equal(small.test.targets, mnist5k.test.targets[:30])
    # normalisation comes from the full train split, so limits never change the model
    assert small.info == mnist5k.info
    big = build_data(DataSettings(limit_train=10**6))
    assert len(big.train) == 4000


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(recipes.RecipeError) as err:
        DataSettings(name="imagenet")
    msg = str(err.value).splitlines()[1]
    assert "data.name: unknown data source 'imagenet'" in msg
    assert f"(valid: {', '.join(SOURCES.names())}, or an import path" in msg


# --- batching ------------------------------------------------------------------------


def test_batches_are_float_in_unit_range_in_order(mnist5k):
    split = mnist5k.test
    batches = list(iterate_batches(split, 300, shuffle=False))
    assert num_batches(split, 300, drop_last=False) == len(batches) == 4
    assert [len(y) for _, y in batches] == [300, 300, 300, 100]
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (300, 1, 28, 28) and y.dtype == torch.int64
    assert x.min() == 0.0 and x.max() == 1.0
    xs, ys = _concat(batches)
    assert torch.equal(xs, split.inputs.float() / 255) and torch.equal(ys, split.targets)
    dropped = list(iterate_batches(split, 300, shuffle=False, drop_last=True))
    assert num_batches(split, 300, drop_last=True) == len(dropped) == 3


def test_shuffle_is_a_pure_function_of_seed_and_epoch(mnist5k):
    split = mnist5k.test
    rng_before = torch.get_rng_state()
    a = _concat(iterate_batches(split, 128, shuffle=True, seed=3, epoch=1))
    torch.manual_seed(12345)  # the global RNG must not matter
    b = _concat(iterate_batches(split, 128, shuffle=True, seed=3, epoch=1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.set_rng_state(rng_before)
    other_epoch = _concat(iterate_batches(split, 128, shuffle=True, seed=3, epoch=2))
    other_seed = _concat(iterate_batches(split, 128, shuffle=True, seed=4, epoch=1))
    assert not torch.equal(a[1], other_epoch[1]) and not torch.equal(a[1], other_seed[1])
    # a permutation: every sample exactly once per epoch
    assert torch.equal(a[1].bincount(), split.targets.bincount())
    assert not torch.equal(a[1], split.targets)


def test_iterating_leaves_the_global_rng_alone(mnist5k):
    state = torch.get_rng_state()
    list(iterate_batches(mnist5k.test, 200, shuffle=True, augment=True, seed=1))
    assert torch.equal(torch.get_rng_state(), state)


def test_seed_hash_does_not_alias_nearby_or_large_seeds():
    def draw(*parts: int) -> torch.Tensor:
        return torch.randint(0, 2**30, (4,), generator=_generator(*parts))

    assert not torch.equal(draw(0, 0, 1), draw(0, 1, 0))
    assert not torch.equal(draw(0, 2**32, 0), draw(0, 0, 1))
    assert torch.equal(draw(-1, 5), draw(-1, 5))


@pytest.mark.parametrize("augment", [False, True])
def test_start_resumes_exactly(mnist5k, augment):
    split = mnist5k.test
    kw = dict(shuffle=True, seed=7, epoch=3, augment=augment)
    full = list(iterate_batches(split, 96, **kw))
    k = 4
    resumed = list(iterate_batches(split, 96, start=k, **kw))
    assert len(resumed) == len(full) - k
    for (xa, ya), (xb, yb) in zip(full[k:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert list(iterate_batches(split, 96, start=len(full), **kw)) == []
    with pytest.raises(ValueError, match="start"):
        iterate_batches(split, 96, start=len(full) + 1, **kw)


def test_augment_keeps_shape_and_changes_pixels_deterministically(mnist5k):
    split = mnist5k.test
    kw = dict(shuffle=False, seed=0, epoch=0)
    plain = next(iterate_batches(split, 64, **kw))[0]
    aug = next(iterate_batches(split, 64, augment=True, **kw))[0]
    again = next(iterate_batches(split, 64, augment=True, **kw))[0]
    later = next(iterate_batches(split, 64, augment=True, shuffle=False, seed=0, epoch=1))[0]
    assert aug.shape == plain.shape and aug.dtype == torch.float32
    assert 0.0 <= aug.min() and aug.max() <= 1.0
    assert not torch.equal(aug, plain)
    assert torch.equal(aug, again)
    assert not torch.equal(aug, later)
    # digits: each output is a shift within 2 pixels of its zero-padded input, never flipped
    assert padding_for(split) == 2
    padded = torch.nn.functional.pad(plain, (2, 2, 2, 2))
    for i in range(16):
        crops = [padded[i, :, r:r + 28, c:c + 28] for r in range(5) for c in range(5)]
        assert any(torch.equal(aug[i], crop) for crop in crops)


def test_augment_flips_natural_images_only_when_asked():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4).repeat(16, 1, 1, 1)
    out = augment_batch(x, pad=0, flip=True, generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, xi.flip(2)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    same = augment_batch(x, pad=0, flip=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same, x)
    natural = Split(torch.zeros(1, 3, 32, 32, dtype=torch.uint8),
                    torch.zeros(1, dtype=torch.int64), augment="shift+flip")
    assert padding_for(natural) == 4


def test_split_rejects_wrong_layouts():
    with pytest.raises(ValueError, match="uint8"):
        Split(torch.zeros(2, 1, 4, 4, dtype=torch.float16), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        Split(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        Split(torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2, dtype=torch.int32))


def test_channel_stats_exact():
    x = torch.zeros(4, 2, 3, 3, dtype=torch.uint8)
    x[:2, 0] = 255  # channel 0: half ones -> mean 0.5, std 0.5
    mean, std = channel_stats(x, chunk=3)
    assert mean == (0.5, 0.0) and std == (0.5, 0.001)
    values = torch.tensor([[[1.0, 10.0], [3.0, 30.0]]])          # (N=1, L=2, C=2)
    mean, std = channel_stats(values, dim=2)
    assert mean == (2.0, 20.0) and std == (1.0, 10.0)


# --- IDX -----------------------------------------------------------------------------


def test_idx_round_trip_and_bad_magic(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (3, 5, 7), dtype=np.uint8)
    path = tmp_path / "a-idx3-ubyte"
    path.write_bytes(encode_idx(arr))
    assert torch.equal(read_idx(path), torch.from_numpy(arr))
    labels = np.array([1, -2, 70000], dtype=np.int32)
    assert parse_idx(encode_idx(labels)).tolist() == [1, -2, 70000]
    with pytest.raises(ValueError, match="not an IDX"):
        parse_idx(b"\x01\x02\x08\x01")
    with pytest.raises(ValueError, match="bytes"):
        parse_idx(encode_idx(arr)[:-1])


# --- torchvision datasets, from fake files in torchvision's layouts -------------------


def _write_fake_mnist(raw_dir, rng):
    """Write tiny decompressed IDX files where torchvision's MNIST looks; return them."""
    raw_dir.mkdir(parents=True)
    sets = {}
    for prefix, n in (("train", 30), ("t10k", 12)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (raw_dir / f"{prefix}-images-idx3-ubyte").write_bytes(encode_idx(images))
        (raw_dir / f"{prefix}-labels-idx1-ubyte").write_bytes(encode_idx(labels))
        sets[prefix] = images, labels
    return sets


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_torchvision_mnist_family_reads_files(tmp_path, name, folder):
    sets = _write_fake_mnist(tmp_path / folder / "raw", np.random.default_rng(1))
    bundle = build_data(DataSettings(name=name, root=str(tmp_path), limit_eval=5))
    assert bundle.info.name == name and bundle.info.num_classes == 10
    assert bundle.info.shape == (1, 28, 28)
    images, labels = sets["train"]
    assert torch.equal(bundle.train.inputs[:, 0], torch.from_numpy(images))
    assert bundle.train.targets.tolist() == labels.tolist()
    assert len(bundle.test) == 5 and bundle.val is None and bundle.train.augment == "shift"
    assert bundle.info.mean[0] == pytest.approx(images.mean() / 255, abs=1e-4)


def test_cifar10_reads_files(tmp_path, monkeypatch):
    # torchvision checks CIFAR files against the real archive's md5 sums, which fake
    # files cannot match; only that check is replaced, the reading path is torchvision's.
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(2)
    written = {}
    for fname in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3 * 32 * 32), dtype=np.uint8)  # rows: CHW-flattened
        labels = rng.integers(0, 10, 4).tolist()
        (base / fname).write_bytes(pickle.dumps({"data": data, "labels": labels}))
        written[fname] = data, labels
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))

    bundle = build_data(DataSettings(name="cifar10", root=str(tmp_path)))
    info = bundle.info
    assert (info.shape, info.num_classes) == ((3, 32, 32), 10)
    assert len(info.mean) == 3 and len(bundle.train) == 20 and len(bundle.test) == 4
    data, labels = written["data_batch_1"]
    assert torch.equal(bundle.train.inputs[:4], torch.from_numpy(data).view(4, 3, 32, 32))
    assert bundle.train.targets[:4].tolist() == labels
    assert bundle.train.augment == "shift+flip" and padding_for(bundle.train) == 4
    x, _ = next(iterate_batches(bundle.train, 8, shuffle=True, augment=True))
    assert x.shape == (8, 3, 32, 32)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_missing_data_is_one_line_naming_the_fix(tmp_path, name):
    with pytest.raises(DataError) as err:
        build_data(DataSettings(name=name, root=str(tmp_path), download=False))
    msg = str(err.value)
    assert "\n" not in msg
    assert name in msg and str(tmp_path) in msg
    assert "data.download=true" in msg and "data.root" in msg


def test_default_root_is_expanded_cache_dir():
    from deqctl.data.images import data_root
    assert str(data_root(DataSettings(name="mnist"))) == os.path.expanduser("~/.cache/deqctl/data")
    assert str(data_root(DataSettings(name="mnist", root="~/x"))) == os.path.expanduser("~/x")
