"""Property-based tests (hypothesis): any override a user can type either gives a recipe of
the declared types or a RecipeError naming the key; any damage to a checkpoint's files gives
a one-line error (or, for harmless damage, a normal evaluation) and changes nothing."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from deqctl import recipe as recipes
from deqctl.cli import app

from cli_helpers import RECIPE, runner, tiny

ROOT = Path(__file__).parents[1]
RAW = recipes.load_raw(RECIPE)
BASE = recipes.validate(RAW)


def load(override: str) -> recipes.Recipe:
    return recipes.validate(recipes.apply_overrides(RAW, [override]), source="overrides")


def _scalar_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _scalar_keys(v, f"{prefix}{k}.")
        elif not isinstance(v, list):
            out.append(f"{prefix}{k}")
    return out


KEYS = _scalar_keys(BASE.model_dump(mode="json"))
VALUES = st.one_of(
    st.integers(-2**40, 2**40).map(str), st.floats(allow_nan=True).map(repr),
    st.sampled_from(["true", "false", "on", "off", "yes", "no", "null", "~", ".inf", "-.inf",
                     ".nan", "1e-3", "1.0e-3", "0", "-1", "[]", "{}", "[1, 2]", "anderson",
                     "'", "\"", ":", "- a", "0x10", "1_000"]),
    st.text(max_size=12))


def _get(recipe: recipes.Recipe, key: str):
    node = recipe
    for part in key.split("."):
        node = getattr(node, part)
    return node


@settings(max_examples=200, deadline=None, derandomize=True)   # CI: the same cases each run
@given(key=st.sampled_from(KEYS), value=VALUES)
@example(key="data.name", value="[]")            # found by this test: a TypeError once
@example(key="seed", value="2147483648.0")
def test_any_override_is_a_typed_recipe_or_a_recipe_error_naming_the_key(key, value):
    try:
        recipe = load(f"{key}={value}")
    except recipes.RecipeError as exc:
        assert key.rsplit(".", 1)[0] in str(exc) or "override" in str(exc), str(exc)
        return
    got, default = _get(recipe, key), _get(BASE, key)
    if isinstance(default, bool):
        assert isinstance(got, bool)
    elif isinstance(default, int) and not isinstance(got, type(None)):
        limit = 2**63 if key == "seed" else 2**31      # a seed may be any 64-bit value
        assert isinstance(got, int) and not isinstance(got, bool) and abs(got) < limit
    if isinstance(got, float):
        assert math.isfinite(got)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(key=st.text(min_size=1, max_size=20), value=st.text(max_size=10))
def test_any_key_gives_a_recipe_or_a_recipe_error(key, value):
    try:
        load(f"{key}={value}")
    except recipes.RecipeError:
        pass


# --- checkpoint fuzzing --------------------------------------------------------------------

SMALLEST = [*tiny(train=32, eval=16), "train.max_steps=1", "model.channels=4",
            "model.inner_channels=8", "model.groups=2", "data.batch_size=16",
            "deq.eval.max_iter=4"]
FILES = ["model.safetensors", "meta.json", "recipe.yaml", "trainer.json", "trainer.safetensors"]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "run"
    result = runner.invoke(app, ["train", RECIPE, *SMALLEST, "--out", str(out), "--plain"])
    assert result.exit_code == 0, result.output
    return out / "checkpoints" / "final"


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(FILES), how=st.sampled_from(["truncate", "flip", "empty"]),
       where=st.floats(0, 1), bit=st.integers(0, 7))
def test_damaged_checkpoint_files_give_one_line_and_change_nothing(good, tmp_path, name, how,
                                                                    where, bit):
    folder = tmp_path / f"ckpt-{name}-{how}-{where:.3f}-{bit}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(good, folder)
    data = bytearray((folder / name).read_bytes())
    i = min(int(where * len(data)), len(data) - 1)
    if how == "truncate":
        data = data[:i]
    elif how == "flip":
        data[i] ^= 1 << bit
    else:
        data = bytearray()
    (folder / name).write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    result = runner.invoke(app, ["eval", str(folder), "--json"])
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
