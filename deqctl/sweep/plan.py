"""A sweep's plan: the cartesian product of comma lists of override values (and seeds),
each point an ordinary run directory named by its settings, the whole written to
DIR/sweep.json with each point's status.

    deqctl sweep RECIPE optim.lr=1e-3,3e-3 deq.mode=implicit,unrolled --seeds 0,1 --out DIR
    -> DIR/lr=1e-3_mode=implicit_seed=0, DIR/lr=1e-3_mode=implicit_seed=1, ...

A value holding a comma stays whole inside brackets, braces or quotes
(data.columns=[a,b],[c] is two values). Two points never share a folder: where the
settings' names would fold to one (a/b and a:b, two values cut at the length limit, A and
a on a case-insensitive disk), each of those gets a short hash of its overrides. The plan
is the recipe's path and content, the fixed overrides, the axes and the seeds: running the
same command again continues the sweep; a changed plan is refused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import recipe as recipes
from ..errors import quote
from ..files import FileRefused, read_bytes, read_json, write_atomic
from ..yamlio import MAX_BYTES

FORMAT = "deqctl-sweep/1"
PLAN_FILE = "sweep.json"
POINT_LIMIT = 10_000           # a grid beyond this is a typo (an axis pasted twice)
STATUSES = ("pending", "running", "finished", "interrupted", "failed")
NAME_LIMIT = 200               # a point folder's name, in characters
HASH_CHARS = 10                # the suffix that sets apart names that fold to one
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
    `key=value` a fixed override. Raises SweepError for a recipe that is no regular file
    (read as train reads one: a FIFO or device is refused at once), an argument that is no
    override, a key given twice, an empty value or a grid beyond POINT_LIMIT points."""
    try:     # the recipe files' rule: a FIFO or device is refused, never waited on or read
        sha = hashlib.sha256(read_bytes(recipe_path, MAX_BYTES)).hexdigest()
    except FileRefused as exc:
        raise SweepError(str(exc)) from None
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
    overrides = [[*fixed, *(f"{k}={v}" for k, v in zip(keys, combo))] for combo in grid]
    names = _names(keys, grid, overrides)
    return Plan(recipe_path, sha, fixed, axes, seeds,
                [Point(n, o) for n, o in zip(names, overrides)])


def _names(keys: list[str], grid: list[tuple], overrides: list[list[str]]) -> list[str]:
    """Each point's folder name, no two alike even on a case-insensitive disk: by short
    keys (by whole keys if short ones clash); and where names still fold to one (values
    differing only in characters a name drops, or past its length limit), those get a
    hash of their overrides. A name already unique stays what it always was."""
    names = [_name(_short_names(keys), combo) for combo in grid]
    if _clashes(names):
        names = [_name(keys, combo) for combo in grid]
    clash = _clashes(names)
    names = [_hashed(n, o) if n.lower() in clash else n for n, o in zip(names, overrides)]
    clash = _clashes(names)
    if clash:              # a value spelling another's hash: refused, never shared
        raise SweepError(f"two points would share the folder {quote(clash.pop())}; change "
                         f"a value")
    return names


def _clashes(names: list[str]) -> set[str]:
    """The names (lowercased) that more than one point would have."""
    return {n for n, count in Counter(n.lower() for n in names).items() if count > 1}


def _hashed(name: str, overrides: list[str]) -> str:
    digest = hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:HASH_CHARS]
    return f"{name[:NAME_LIMIT - HASH_CHARS - 1]}-{digest}"


def _short_names(keys: list[str]) -> list[str]:
    """Each key by its last part (optim.lr -> lr), or whole where two would share one."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return [s if last.count(s) == 1 else k for s, k in zip(last, keys)]


def _name(keys: list[str], combo: tuple) -> str:
    """A folder name from settings, safe on every filesystem: lr=1e-3_mode=unrolled_seed=0."""
    name = "_".join(f"{k}={v}" for k, v in zip(keys, combo)) or "run"
    return _UNSAFE.sub("-", name).strip("-.")[:NAME_LIMIT] or "run"


def sweep_overrides(plan: Plan, folder: Path) -> list[str]:
    """What the sweep in `folder` adds to every point's overrides: log.group = the
    folder's name (quoted: a name like 2024 stays text), so a sweep's runs are one MLflow
    experiment / W&B group, unless the plan names its own. A label, not a setting of the
    model: a sweep folder renamed since goes on."""
    keys = [o.split("=", 1)[0].strip() for o in plan.fixed] + [k for k, _ in plan.axes]
    return [] if "log.group" in keys else [f"log.group={json.dumps(folder.name)}"]


def point_overrides(plan: Plan, point: Point, folder: Path) -> list[str]:
    """The overrides a point's run in the sweep folder `folder` is trained with."""
    return [*point.overrides, *sweep_overrides(plan, folder)]


def planned_recipe(plan: Plan, point: Point, folder: Path) -> recipes.Recipe:
    """The resolved recipe of a point's run in the sweep folder `folder`: what its run
    directory must hold to be that point. Imports the user code the plan names."""
    return recipes.load(plan.recipe, point_overrides(plan, point, folder))


def validate_points(plan: Plan) -> list[recipes.Recipe]:
    """Every point's recipe, validated before anything runs (importing the user code the
    plan names); returns them, or raises SweepError naming each bad point with its first
    problem."""
    bad, valid = [], []
    for p in plan.points:
        try:
            valid.append(recipes.load(plan.recipe, p.overrides))
        except recipes.RecipeError as exc:
            lines = str(exc).splitlines()
            bad.append(f"{p.name}: {(lines[1] if len(lines) > 1 else lines[0]).strip()}")
    if bad:
        raise SweepError(f"{len(bad)} of {len(plan.points)} point(s) are not valid recipes; "
                         f"nothing was run\n  " + "\n  ".join(bad[:20]) +
                         (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""))
    return valid


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
