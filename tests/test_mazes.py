"""Mazes (data.name: mazes) and per-pixel tagging: the generated perfect mazes and their
shortest-path labels, the task `tag` on images, the image DEQ that tags every pixel at
any maze size, and a tiny model trained on small mazes and evaluated on larger ones from
the CLI."""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path

import pytest
import torch

from deqctl import recipe as recipes
from deqctl.cli import app
from deqctl.data import build_data
from deqctl.models import ModelError, build_model
from deqctl.tasks import task_for

from cli_helpers import CONFIGS, rows, runner

RECIPE = str(CONFIGS / "mazes-deq.yaml")
pytestmark = pytest.mark.usefixtures("one_thread")


def data(**keys):
    return build_data(recipes.validate({"data": {"name": "mazes", **keys}}).data)


def bfs_path(open_: list[list[bool]], start: tuple[int, int], goal: tuple[int, int]
             ) -> list[tuple[int, int]]:
    """A shortest path of open pixels from start to goal (4-neighbours), start and goal
    included; [] when there is none."""
    h, w = len(open_), len(open_[0])
    came = {start: None}
    todo = deque([start])
    while todo:
        r, c = todo.popleft()
        for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if 0 <= nr < h and 0 <= nc < w and open_[nr][nc] and (nr, nc) not in came:
                came[(nr, nc)] = (r, c)
                todo.append((nr, nc))
    if goal not in came:
        return []
    path, at = [], goal
    while at is not None:
        path.append(at)
        at = came[at]
    return path


def reachable(open_: list[list[bool]], start: tuple[int, int]) -> int:
    """How many open pixels can be reached from start."""
    seen, todo = {start}, [start]
    while todo:
        r, c = todo.pop()
        for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if 0 <= nr < len(open_) and 0 <= nc < len(open_[0]) and open_[nr][nc] \
                    and (nr, nc) not in seen:
                seen.add((nr, nc))
                todo.append((nr, nc))
    return len(seen)


def pixel(channel: torch.Tensor) -> tuple[int, int]:
    (r, c), = channel.nonzero().tolist()
    return r, c


@pytest.mark.parametrize("size", [2, 5, 9])
def test_each_maze_is_perfect_and_labelled_with_its_one_shortest_path(size):
    bundle = data(size=size, train_mazes=60, val_mazes=0, test_mazes=1)
    x, y = bundle.train.inputs, bundle.train.targets
    side = 2 * size + 1
    assert x.dtype == torch.uint8 and tuple(x.shape) == (60, 3, side, side)
    assert y.dtype == torch.int64 and tuple(y.shape) == (60, side, side)
    assert set(x.unique().tolist()) <= {0, 255} and set(y.unique().tolist()) <= {0, 1}
    for maze, labels in zip(x, y):
        open_ = (maze[0] == 255).tolist()
        start, goal = pixel(maze[1]), pixel(maze[2])
        assert start != goal and open_[start[0]][start[1]] and open_[goal[0]][goal[1]]
        # a perfect maze: every cell reachable, and as many open pixels as a spanning tree
        # of size^2 cells has (its cells and the size^2 - 1 passages between them), so
        # there are no loops and the path between two cells is unique
        cells = size * size
        assert sum(map(sum, open_)) == 2 * cells - 1 == reachable(open_, start)
        path = bfs_path(open_, start, goal)
        marked = {tuple(p) for p in labels.nonzero().tolist()}
        assert marked == set(path) and start in marked and goal in marked
        assert int(labels.sum()) == len(path)          # the labels are the path, no more


def test_mazes_are_a_pure_function_of_the_seed_a_stream_per_split():
    a = data(size=4, test_size=6, train_mazes=30, val_mazes=10, test_mazes=20)
    b = data(size=4, test_size=6, train_mazes=30, val_mazes=10, test_mazes=20)
    for part in ("train", "val", "test"):
        assert torch.equal(a.split(part).inputs, b.split(part).inputs)
        assert torch.equal(a.split(part).targets, b.split(part).targets)
    assert not torch.equal(a.train.inputs, data(size=4, train_mazes=30, seed=1).train.inputs)
    assert not torch.equal(a.train.inputs[:10], a.val.inputs)
    # one split's count or size leaves the others' mazes alone
    other = data(size=3, test_size=6, train_mazes=7, test_mazes=20)
    assert torch.equal(a.test.inputs, other.test.inputs)
    # the mazes differ from one another, and start and goal move around
    assert len({m.numpy().tobytes() for m in a.train.inputs}) == 30
    assert len({pixel(m[1]) for m in a.train.inputs}) > 5


def test_train_and_val_take_the_size_test_the_test_size():
    bundle = data(size=3, test_size=5, train_mazes=12, val_mazes=4, test_mazes=6)
    assert tuple(bundle.train.inputs.shape) == (12, 3, 7, 7)
    assert tuple(bundle.val.inputs.shape) == (4, 3, 7, 7)
    assert tuple(bundle.test.inputs.shape) == (6, 3, 11, 11)
    assert tuple(bundle.test.targets.shape) == (6, 11, 11)
    info = bundle.info
    assert (info.task, info.inputs, info.shape, info.num_classes) == ("tag", "image", (3, 7, 7), 2)
    assert bundle.facts["maze_size"] == {"train": 3, "val": 3, "test": 5}
    assert data(val_mazes=0, train_mazes=2, test_mazes=2).val is None
    defaults = data()
    assert (len(defaults.train), len(defaults.val), len(defaults.test)) == (10_000, 1000, 1000)
    assert defaults.train.inputs.shape[-1] == 19 and defaults.test.inputs.shape[-1] == 27


def test_tag_on_images_judges_every_pixel():
    task = task_for(data(size=2, train_mazes=2, test_mazes=2).info)
    assert task.name == "tag" and task.headline.key == "solved"
    # two 2x2 images; the second gets one pixel wrong
    y = torch.tensor([[[0, 1], [1, 1]], [[1, 0], [0, 0]]])
    logits = torch.nn.functional.one_hot(y, 2).float() * 3
    logits[1, 1, 1] = torch.tensor([0.0, 1.0])
    expected = -sum(math.log(torch.softmax(logits[i, r, c], 0)[y[i, r, c]].item())
                    for i in range(2) for r in range(2) for c in range(2)) / 8
    assert task.loss(logits, y).item() == pytest.approx(expected, rel=1e-6)
    stats = task.stats(logits, None, y)
    assert stats["accuracy"].item() == pytest.approx(7 / 8)
    assert stats["solved"].item() == pytest.approx(1 / 2)
    other = logits.clone()
    other[0, 1, 0] = torch.tensor([3.0, 0.0])       # image 0 changes one pixel's answer
    assert task.agree(logits, other).tolist() == [False, True]


def maze_model(**options):
    recipe = recipes.validate({"data": {"name": "mazes", "size": 3},
                               "model": {"name": "resnet_deq", "channels": 8,
                                         "inner_channels": 8, **options},
                               "deq": {"forward": {"max_iter": 4}}})
    return build_model(recipe, data(size=3, train_mazes=2, test_mazes=2).info)


def test_the_image_deq_tags_every_pixel_at_any_maze_size():
    torch.manual_seed(0)
    model = maze_model().eval()
    with torch.no_grad():
        for size in (3, 6):
            x = data(size=size, train_mazes=2, test_mazes=2).train.inputs.float() / 255
            logits = model(x)
            assert tuple(logits.shape) == (2, 2 * size + 1, 2 * size + 1, 2)
            assert torch.isfinite(logits).all()


def test_a_tagger_refuses_a_downsampling_stem_in_one_line():
    with pytest.raises(ModelError) as err:
        maze_model(stem_stride=2)
    assert "model.stem_stride=2" in str(err.value) and "\n" not in str(err.value)


def test_the_baseline_mode_on_mazes_says_there_is_none_in_one_line():
    recipe = recipes.validate({"data": {"name": "mazes", "size": 3},
                               "deq": {"mode": "baseline"}})
    with pytest.raises(ModelError) as err:
        build_model(recipe, data(size=3, train_mazes=2, test_mazes=2).info)
    assert "deq.mode=baseline" in str(err.value) and "\n" not in str(err.value)


TINY = ["data.size=3", "data.test_size=5", "data.train_mazes=64", "data.val_mazes=16",
        "data.test_mazes=16", "data.batch_size=32", "data.eval_batch_size=16",
        "model.channels=8", "model.inner_channels=8", "deq.forward.max_iter=6",
        "deq.backward.max_iter=6", "deq.eval.max_iter=10", "train.max_steps=3",
        "train.log_every=1", "train.eval_every=0", "runtime.threads=1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The recipe trained 3 steps on mazes of 3x3 cells, tested on 5x5."""
    out = tmp_path_factory.mktemp("mazes") / "run"
    result = runner.invoke(app, ["train", RECIPE, *TINY, "--out", str(out), "--plain"])
    assert result.exit_code == 0, result.output
    return out


def test_a_tiny_model_trains_on_small_mazes_and_sweeps_iterations_on_larger(tiny_run):
    written = rows(tiny_run)
    assert [r["step"] for r in written if r["split"] == "train"] == [1, 2, 3]
    last = written[-1]
    assert last["split"] == "test" and 0 <= last["solved"] <= last["accuracy"] <= 1
    assert math.isfinite(last["loss"])
    result = runner.invoke(app, ["eval", str(tiny_run), "--json", "--sweep-iters", "2,10",
                                 "data.test_size=7", "runtime.threads=1"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["data"]["maze_size"]["test"] == 7
    assert [p["max_iter"] for p in out["sweep"]] == [2, 10]
    assert all(0 <= p["solved"] <= p["accuracy"] <= 1 for p in out["sweep"])


@pytest.mark.parametrize("override, says", [
    ("data.size=1", "data.size"),
    ("data.test_size=0", "data.test_size"),
    ("data.size=5000", "data.size"),
    ("data.train_mazes=2000000", "data.train_mazes: 2,000,000 mazes of 7x7 pixels"),
    ("model.stem_stride=2", "model.stem_stride=2: a tagger predicts at every pixel"),
    ("model={name: mdeq}", "model.name=mdeq takes image inputs for classify; data mazes is "
                        "image for tag (use resnet_deq)"),
])
def test_bad_sizes_are_one_line_exit_2(override, says, tmp_path):
    # a whole model block replaces the tiny model's keys
    tiny = [o for o in TINY if not (override.startswith("model=") and o.startswith("model."))]
    result = runner.invoke(app, ["train", RECIPE, *tiny, override, "--out",
                                 str(tmp_path / "run"), "--plain"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert any(says in line for line in lines), result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
