"""The off-home-data benchmark's own parts (bench/seqsets.py, bench/baselines.py): the
generated sets are what `data.name=npz` reads, balanced and reproducible; the accuracy at
a training time is the model held then, not the best so far; one plan per folder."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import baselines  # noqa: E402
import seqsets  # noqa: E402

SHAPES = {"synthetic_control": ((60,), 6), "cbf": ((128,), 3), "two_patterns": ((128,), 4),
          "bump_order": ((100, 3), 6)}


def test_the_sets_are_balanced_reproducible_npz_files(tmp_path):
    paths = seqsets.write(tmp_path / "a", 60, 36, seed=0)
    again = seqsets.write(tmp_path / "b", 60, 36, seed=0)
    assert [p.stem for p in paths] == list(SHAPES)
    for path, other in zip(paths, again):
        shape, classes = SHAPES[path.stem]
        with np.load(path) as z, np.load(other) as w:
            assert z["x"].shape == (60, *shape) and z["x_test"].shape == (36, *shape)
            assert z["x"].dtype == np.float32 and z["y"].dtype == np.int64
            for split in ("y", "y_test"):
                assert set(np.bincount(z[split], minlength=classes)) == {len(z[split]) // classes}
            assert all(np.array_equal(z[k], w[k]) for k in z.files)
            assert not np.array_equal(z["x"][:36], z["x_test"])   # drawn independently


def test_the_accuracy_at_a_time_is_the_last_evaluation_by_then_not_the_best():
    rows = [{"split": "train", "wall_s": 1.0, "accuracy": 1.0},
            {"split": "test", "wall_s": 2.0, "accuracy": 0.9},
            {"split": "test", "wall_s": 4.0, "accuracy": 0.7},
            {"split": "test", "wall_s": 6.0, "accuracy": 0.95}]
    assert baselines.at_time(rows, 1.9) is None
    assert baselines.at_time(rows, 4.0) == 0.7 and baselines.at_time(rows, 5.9) == 0.7
    assert baselines.at_time(rows, 60.0) == 0.95


def test_one_plan_per_folder(tmp_path):
    plan = {"size": 400, "test_size": 2000, "eval_every": 63}
    baselines.check_plan(tmp_path, plan)
    baselines.check_plan(tmp_path, plan)                   # the same again: read on
    with pytest.raises(SystemExit, match="use another --out"):
        baselines.check_plan(tmp_path, {**plan, "test_size": 400})
