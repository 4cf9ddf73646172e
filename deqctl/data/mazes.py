"""`mazes`: generated perfect mazes whose label at every pixel says whether it lies on the
path from start to goal, the easy-to-hard task of Schwarzschild et al. 2021 ("Can you
learn an algorithm?") and Anil et al. 2022: train on small mazes, test on larger ones,
where a model that iterates to an answer needs more iterations.

A maze of `size` x `size` cells is drawn by a randomised depth-first search (the
recursive backtracker) from a random cell, so it is a spanning tree of the grid: every
cell is reachable and the path between two cells is unique, hence the shortest. It is
drawn as an image of (2 size + 1) pixels a side: cell (r, c) at pixel (2r + 1, 2c + 1),
a wall or a passage between neighbouring cells, and walls around. Three channels, 0 or
255 (batches read them as 0.0 or 1.0): open pixels, the start pixel, the goal pixel;
start and goal are two different cells drawn at random. The target is class 1 on the
path's pixels (start and goal included), 0 elsewhere (task `tag`, every pixel).

Nothing is downloaded or read: each split is a pure function of (data.seed, split), a
NumPy stream per split and per block of mazes, so train, val and test never share a
stream, changing one split leaves the others as they were, and the first k mazes of a
split are the same whatever its count. The search runs in lockstep over a block of mazes
(every maze takes one step per round), so Python loops once per step, not per maze.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from ..options import Int
from .base import DataBundle, DataError, DataInfo, Split
from .registry import source
from .settings import DataBase

MAX_SIZE = 256                     # cells a side
MAX_PIXELS = 2**26                 # pixels per split (uint8 inputs, int64 targets: ~740 MB)
BLOCK = 512                        # mazes drawn together at most, each block its own stream
BLOCK_PIXELS = 2**18               # ... and fewer of larger mazes: memory follows what is asked
_STREAMS = {"train": 0, "val": 1, "test": 2}
_MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))


class MazesData(DataBase):
    """Generated perfect mazes labelled with the path from start to goal."""

    size: Int = Field(9, ge=2, le=MAX_SIZE, description="cells a side of train and val "
                      "mazes (2 size + 1 pixels)")
    test_size: Int = Field(13, ge=2, le=MAX_SIZE, description="cells a side of test mazes "
                           "(larger than size: harder than training)")
    train_mazes: Int = Field(10_000, ge=1, description="training mazes")
    val_mazes: Int = Field(1_000, ge=0, description="val mazes, at the training size "
                           "(0: no val split)")
    test_mazes: Int = Field(1_000, ge=1, description="test mazes, at test_size")
    seed: Int = Field(0, ge=0, description="the mazes are a pure function of it")


def _neighbours(size: int) -> np.ndarray:
    """(cells, 4) the cell up, down, left and right of each cell; -1 off the grid."""
    r, c = np.divmod(np.arange(size * size), size)
    out = np.full((size * size, 4), -1, dtype=np.int64)
    for i, (dr, dc) in enumerate(_MOVES):
        inside = (0 <= r + dr) & (r + dr < size) & (0 <= c + dc) & (c + dc < size)
        out[inside, i] = ((r + dr) * size + c + dc)[inside]
    return out


def _spanning_trees(rng: np.random.Generator, n: int, size: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Randomised depth-first search on n grids at once; returns (parent, depth), both
    (n, cells): each cell's parent in its maze's tree (-1 at the root) and its distance
    from the root. Each round every maze either steps to a random unvisited neighbour of
    the cell on top of its stack or backtracks; every maze is done after
    2 cells - 2 rounds (cells - 1 steps forward, as many back)."""
    cells = size * size
    nbr = _neighbours(size)
    rows = np.arange(n)
    root = rng.integers(0, cells, n)
    visited = np.zeros((n, cells), dtype=bool)
    visited[rows, root] = True
    stack = np.zeros((n, cells), dtype=np.int64)
    stack[:, 0] = root
    top = np.ones(n, dtype=np.int64)                     # stack height
    parent = np.full((n, cells), -1, dtype=np.int64)
    depth = np.zeros((n, cells), dtype=np.int64)
    for _ in range(2 * cells - 2):
        here = stack[rows, top - 1]
        near = nbr[here]                                 # (n, 4)
        free = (near >= 0) & ~visited[rows[:, None], np.maximum(near, 0)]
        keys = np.where(free, rng.random((n, 4)), -1.0)
        step = free.any(axis=1)
        nxt = near[rows, keys.argmax(axis=1)]
        m, to, at = rows[step], nxt[step], here[step]
        visited[m, to] = True
        parent[m, to] = at
        depth[m, to] = depth[m, at] + 1
        stack[m, top[step]] = to
        top += np.where(step, 1, -1)
    return parent, depth


def _pixel(cell: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    r, c = np.divmod(cell, size)
    return 2 * r + 1, 2 * c + 1


def _block(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """n mazes: uint8 (n, 3, side, side) images and int64 (n, side, side) path labels."""
    cells, side = size * size, 2 * size + 1
    start = rng.integers(0, cells, n)
    goal = (start + rng.integers(1, cells, n)) % cells   # any other cell
    parent, depth = _spanning_trees(rng, n, size)
    rows = np.arange(n)
    x = np.zeros((n, 3, side, side), dtype=np.uint8)
    y = np.zeros((n, side, side), dtype=np.int64)
    # open every cell, and the passage from every cell but the root to its parent
    pr, pc = _pixel(np.arange(cells), size)
    x[:, 0, pr[None, :], pc[None, :]] = 255
    m, child = np.nonzero(parent >= 0)
    (cr, cc), (ar, ac) = _pixel(child, size), _pixel(parent[m, child], size)
    x[m, 0, (cr + ar) // 2, (cc + ac) // 2] = 255
    for channel, cell in ((1, start), (2, goal)):
        x[(rows, channel, *_pixel(cell, size))] = 255
    # the path: walk the deeper of the two ends up the tree until they meet, marking
    # each cell left behind and the passage it leaves by; the meeting cell last
    a, b = start.copy(), goal.copy()
    while True:
        apart = a != b
        if not apart.any():
            break
        up_a = apart & (depth[rows, a] >= depth[rows, b])
        up_b = apart & ~up_a
        for ends, up in ((a, up_a), (b, up_b)):
            m = rows[up]
            here, there = ends[up], parent[m, ends[up]]
            (hr, hc), (tr, tc) = _pixel(here, size), _pixel(there, size)
            y[m, hr, hc] = 1
            y[m, (hr + tr) // 2, (hc + tc) // 2] = 1
            ends[up] = there
    y[(rows, *_pixel(a, size))] = 1
    return x, y


def mazes(seed: int, split: str, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return `n` mazes of `split` with `size` x `size` cells: uint8 (n, 3, 2 size + 1,
    2 size + 1) images (open, start, goal; 0 or 255) and int64 (n, 2 size + 1,
    2 size + 1) labels (1 on the path). The same for the same arguments on every machine
    (NumPy's PCG64 seeded by (seed, split, block)); the first k of n are the first k of
    any larger n."""
    block = max(1, min(BLOCK, BLOCK_PIXELS // (2 * size + 1) ** 2))   # a function of size
    parts = [_block(np.random.default_rng([seed, _STREAMS[split], i]), block, size)
             for i in range(-(-n // block))]
    return (np.concatenate([p[0] for p in parts])[:n],
            np.concatenate([p[1] for p in parts])[:n])


def _split(cfg, part: str, n: int, size: int) -> Split:
    count = f"data.{part}_mazes"
    side = 2 * size + 1
    if n * side * side > MAX_PIXELS:
        key = "data.test_size" if part == "test" else "data.size"
        raise DataError(f"{count}: {n:,} mazes of {side}x{side} pixels is more than "
                        f"{MAX_PIXELS:,} pixels in one split; lower {count} or {key}")
    x, y = mazes(cfg.seed, part, n, size)
    return Split(torch.from_numpy(x), torch.from_numpy(y))


@source("mazes", MazesData)
def load_mazes(cfg, like: DataInfo | None = None) -> DataBundle:
    """Return data.train_mazes and data.val_mazes mazes of data.size cells a side and
    data.test_mazes of data.test_size, each labelled at every pixel with whether it lies
    on the path from start to goal (task `tag`, 2 classes per pixel)."""
    train = _split(cfg, "train", cfg.train_mazes, cfg.size)
    val = _split(cfg, "val", cfg.val_mazes, cfg.size) if cfg.val_mazes else None
    test = _split(cfg, "test", cfg.test_mazes, cfg.test_size)
    side = 2 * cfg.size + 1
    # the channels are indicators already: no scaling, so that the statistics of larger
    # mazes (a start pixel is a smaller fraction of them) do not move the model's inputs
    info = DataInfo(name="mazes", task="tag", inputs="image", shape=(3, side, side),
                    num_classes=2, classes=("off", "path"), mean=(0.0,) * 3, std=(1.0,) * 3)
    sizes = {"train": cfg.size, "test": cfg.test_size,
             **({"val": cfg.size} if val is not None else {})}
    return DataBundle(info=info, train=train, test=test, val=val, facts={"maze_size": sizes})
