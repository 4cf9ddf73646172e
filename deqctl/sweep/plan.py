"""A sweep's plan: the cartesian product of comma lists of override values (and seeds),
each point an ordinary run directory named by its settings, the whole written to
DIR/sweep.json with each point's status.

    deqctl sweep RECIPE optim.lr=1e-3,3e-3 deq.mode=implicit,unrolled --seeds 0,1 --out DIR
    -> DIR/lr=1e-3_mode=implicit_seed=0, DIR/lr=1e-3_mode=implicit_seed=1, ...

A value holding a comma stays whole inside brackets, braces or quotes
(data.columns=[a,b],[c] is two values). The plan is the recipe's path and content, the fixed
overrides, the axes and the seeds: running the same command again continues the sweep; a
changed plan is refused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import recipe as recipes
from ..errors import quote
from ..files import read_json, write_atomic

FORMAT = "deqctl-sweep/1"
PLAN_FILE = "sweep.json"
POINT_LIMIT = 10_000           # a grid beyond this is a typo (an axis pasted twice)
STATUSES = ("pending", "running", "finished", "interrupted", "failed")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


class SweepError(ValueError):
    """A sweep that cannot be planned or continued; str() is one line (or a header and
    one line per bad point) saying what to change."""


@dataclass
class Point:
    """One run of the sweep: its folder name under DIR, its overrides, and how it went."""

    name: str
    overrides: list[str]
    status: str = "pending"
    exit_code: int | None = None
    message: str | None = None           # the last line a failed run printed
    attempts: int = 0


@dataclass
class Plan:
    recipe: str                          # the recipe's path, as given
    recipe_sha256: str
    fixed: list[str]                     # overrides every point shares
    axes: list[tuple[str, list[str]]]    # (key, values as written)
    seeds: list[int] | None
    points: list[Point] = field(default_factory=list)

    def identity(self) -> dict[str, Any]:
        """What makes two plans the same sweep (statuses aside)."""
        return {"recipe": self.recipe, "recipe_sha256": self.recipe_sha256,
                "fixed": self.fixed, "axes": [[k, v] for k, v in self.axes],
                "seeds": self.seeds}

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **self.identity(),
                "points": [asdict(p) for p in self.points]}

    def save(self, folder: Path) -> None:
        """Write DIR/sweep.json in one step (a crash leaves the old plan or the new)."""
        write_atomic(folder / PLAN_FILE, json.dumps(self.to_json(), indent=1) + "\n")


def split_values(text: str) -> list[str]:
    """The comma-separated values of an axis; commas inside [], {} or quotes do not split."""
    values, depth, quote_char, start = [], 0, None, 0
    for i, c in enumerate(text):
        if quote_char:
            quote_char = None if c == quote_char else quote_char
        elif c in "'\"":
            quote_char = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        elif c == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return [v.strip() for v in values]


def make_plan(recipe_path: str, args: list[str], seeds: list[int] | None) -> Plan:
    """The plan of `deqctl sweep RECIPE ARGS --seeds ...`: each `key=a,b` an axis, each
    `key=value` a fixed override. Raises SweepError for an argument that is no override,
    a key given twice, an empty value or a grid beyond POINT_LIMIT points."""
    path = Path(recipe_path)
    try:
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise SweepError(f"{recipe_path}: cannot read the recipe ({exc.strerror or exc})") from None
    fixed, axes, seen = [], [], set()
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise SweepError(f"{quote(arg)}: expected key.sub=value or key.sub=a,b,c")
        if key in seen or (key == "seed" and seeds is not None):
            raise SweepError(f"{key}: given twice" + (" (and in --seeds)" if key == "seed" else ""))
        seen.add(key)
        values = split_values(value)
        if any(v == "" for v in values):
            raise SweepError(f"{key}: an empty value in {quote(value)}")
        if len(values) == 1:
            fixed.append(f"{key}={values[0]}")
        else:
            axes.append((key, values))
    grid = list(itertools.product(*(v for _, v in axes), *([seeds] if seeds else [])))
    if len(grid) > POINT_LIMIT:
        raise SweepError(f"{len(grid)} points; a sweep holds at most {POINT_LIMIT}")
    keys = [k for k, _ in axes] + (["seed"] if seeds else [])
    short = _short_names(keys)
    points = [Point(_name(short, combo), [*fixed, *(f"{k}={v}" for k, v in zip(keys, combo))])
              for combo in grid]
    if len({p.name.lower() for p in points}) < len(points):
        points = [Point(_name(keys, combo), p.overrides) for p, combo in zip(points, grid)]
    return Plan(recipe_path, sha, fixed, axes, seeds, points)


def _short_names(keys: list[str]) -> list[str]:
    """Each key by its last part (optim.lr -> lr), or whole where two would share one."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return [s if last.count(s) == 1 else k for s, k in zip(last, keys)]


def _name(keys: list[str], combo: tuple) -> str:
    """A folder name from settings, safe on every filesystem: lr=1e-3_mode=unrolled_seed=0."""
    name = "_".join(f"{k}={v}" for k, v in zip(keys, combo)) or "run"
    return _UNSAFE.sub("-", name).strip("-.")[:200] or "run"


def validate_points(plan: Plan) -> None:
    """Every point's recipe, validated before anything runs: SweepError naming each bad
    point with its first problem."""
    bad = []
    for p in plan.points:
        try:
            recipes.load(plan.recipe, p.overrides)
        except recipes.RecipeError as exc:
            lines = str(exc).splitlines()
            bad.append(f"{p.name}: {(lines[1] if len(lines) > 1 else lines[0]).strip()}")
    if bad:
        raise SweepError(f"{len(bad)} of {len(plan.points)} point(s) are not valid recipes; "
                         f"nothing was run\n  " + "\n  ".join(bad[:20]) +
                         (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""))


def continue_plan(folder: Path, plan: Plan) -> Plan:
    """The plan to run: `plan` with the statuses DIR/sweep.json holds when the sweep was
    begun before with the same plan; SweepError when DIR holds another one."""
    stored_path = folder / PLAN_FILE
    if not stored_path.exists():
        return plan
    try:
        stored = read_json(stored_path, 64 * 2**20)
        if not isinstance(stored, dict) or stored.get("format") != FORMAT:
            raise ValueError("not a deqctl sweep plan")
        identity = {k: stored.get(k) for k in plan.identity()}
    except (OSError, ValueError) as exc:
        raise SweepError(f"{stored_path}: unreadable ({exc}); move it aside to start "
                         f"another sweep there") from None
    if identity != json.loads(json.dumps(plan.identity())):
        what = [k for k, v in plan.identity().items()
                if json.loads(json.dumps(v)) != identity[k]]
        raise SweepError(f"{folder} holds another sweep ({', '.join(what)} changed since it "
                         f"began); run it as it was, or use another --out")
    known = {p.get("name"): p for p in stored.get("points", []) if isinstance(p, dict)}
    for p in plan.points:
        old = known.get(p.name, {})
        status = old.get("status")
        p.status = status if status in STATUSES else "pending"
        p.exit_code, p.message = old.get("exit_code"), old.get("message")
        p.attempts = old.get("attempts") if isinstance(old.get("attempts"), int) else 0
    return plan
