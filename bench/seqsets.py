"""Sequence-classification sets built from code, for trying recipes off their home data
(issue 18, part 7): the classic synthetic sets of the time-series classification
literature, generated as their papers define them, and one multichannel set of our own.

    python bench/seqsets.py --out DIR [--train 600 --test 600 --seed 0]
    -> DIR/synthetic_control.npz, DIR/cbf.npz, DIR/two_patterns.npz, DIR/bump_order.npz

Each .npz holds x (N, L) or (N, L, C) float32, y int64, x_test, y_test: what
`data.name=npz data.path=FILE` reads. Classes are balanced; train and test are drawn
independently from the same generator.

| set | L | C | classes | what tells the classes apart |
|---|---|---|---|---|
| synthetic_control (Alcock & Manolopoulos 1999) | 60 | 1 | 6 | level, trend, cycle or shift of a noisy chart |
| cbf, Cylinder-Bell-Funnel (Saito 1994) | 128 | 1 | 3 | the shape of one plateau at a random place and width |
| two_patterns (Geurts 2001) | 128 | 1 | 4 | the order of an up and a down step in noise |
| bump_order (ours) | 100 | 3 | 6 | the order in which three channels each show one bump |
"""

from __future__ import annotations

import argparse
from itertools import permutations
from pathlib import Path

import numpy as np


def synthetic_control(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Normal, cyclic, increasing, decreasing, upward shift, downward shift (m=30, s=2)."""
    L, y = 60, np.arange(n) % 6
    t = np.arange(L, dtype=np.float64)
    x = 30 + 2 * rng.uniform(-3, 3, (n, L))
    for i, c in enumerate(y):
        if c == 1:
            x[i] += rng.uniform(10, 15) * np.sin(2 * np.pi * t / rng.uniform(10, 15))
        elif c in (2, 3):
            x[i] += (1 if c == 2 else -1) * rng.uniform(0.2, 0.5) * t
        elif c in (4, 5):
            x[i] += (1 if c == 4 else -1) * rng.uniform(7.5, 20) * (t >= rng.uniform(L / 3, 2 * L / 3))
    return x, y


def cbf(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cylinder, bell, funnel: (6 + eta) times a plateau, a ramp up or a ramp down on
    [a, b], a ~ U[16, 32], b - a ~ U[32, 96], plus N(0, 1) noise."""
    L, y = 128, np.arange(n) % 3
    t = np.arange(1, L + 1, dtype=np.float64)
    x = rng.standard_normal((n, L))
    for i, c in enumerate(y):
        a = rng.uniform(16, 32)
        b = a + rng.uniform(32, 96)
        on = (t >= a) & (t <= b)
        shape = {0: on, 1: on * (t - a) / (b - a), 2: on * (b - t) / (b - a)}[c]
        x[i] += (6 + rng.standard_normal()) * shape
    return x, y


def two_patterns(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two steps, each up (-5 then +5) or down (+5 then -5), of widths U[8, 24] at random
    non-overlapping places in N(0, 1) noise; the class is (first, second) in
    {up-up, up-down, down-up, down-down}."""
    L, y = 128, np.arange(n) % 4
    x = rng.standard_normal((n, L))
    for i, c in enumerate(y):
        w1, w2 = rng.integers(8, 25, size=2)
        s1 = rng.integers(0, L - w1 - w2 - 8)
        s2 = rng.integers(s1 + w1 + 4, L - w2 + 1)
        for start, width, up in ((s1, w1, c in (0, 1)), (s2, w2, c in (0, 2))):
            half = width // 2
            x[i, start:start + half] = -5 if up else 5
            x[i, start + half:start + width] = 5 if up else -5
    return x, y


def bump_order(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Three noisy channels, each with one Gaussian bump (height 3, width 3) at its own
    time, at least 10 apart; the class is the order of the bumps (3! = 6 classes)."""
    L, y = 100, np.arange(n) % 6
    orders = list(permutations(range(3)))
    t = np.arange(L, dtype=np.float64)
    x = rng.standard_normal((n, L, 3))
    for i, c in enumerate(y):
        times = np.sort(rng.choice(np.arange(8, L - 8, 10), size=3, replace=False)
                        + rng.integers(0, 5, size=3))
        for rank, channel in enumerate(orders[c]):
            x[i, :, channel] += 3 * np.exp(-0.5 * ((t - times[rank]) / 3) ** 2)
    return x, y


SETS = {"synthetic_control": synthetic_control, "cbf": cbf, "two_patterns": two_patterns,
        "bump_order": bump_order}


def write(out: Path, train: int, test: int, seed: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (name, make) in enumerate(SETS.items()):
        rng = np.random.default_rng([seed, k])
        (x, y), (xt, yt) = make(train, rng), make(test, rng)
        order, order_t = rng.permutation(train), rng.permutation(test)
        path = out / f"{name}.npz"
        np.savez(path, x=x[order].astype(np.float32), y=y[order].astype(np.int64),
                 x_test=xt[order_t].astype(np.float32), y_test=yt[order_t].astype(np.int64))
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--test", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for path in write(args.out, args.train, args.test, args.seed):
        with np.load(path) as z:
            print(f"{path}: x {z['x'].shape}, x_test {z['x_test'].shape}, "
                  f"{len(np.unique(z['y']))} classes")


if __name__ == "__main__":
    main()
