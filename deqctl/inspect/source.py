"""Opening a model to inspect: from a run directory, a checkpoint, a safetensors export or
(for solve-trace) a recipe, with the overrides that make sense at test time."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import recipe as recipes
from ..api import load_with_recipe
from ..data import DataBundle, DataError, Split, build_data, iterate_batches
from ..engine.device import pick_device
from ..models import DEQModel, build_model

# A trained model's weights fix its architecture and training; test time may change only
# what data it sees, how hard its fixed point is solved, and where it runs.
EVAL_OVERRIDES = ("data", "deq.eval", "runtime")
RECIPE_SUFFIXES = (".yaml", ".yml")


@dataclass
class Source:
    """A model ready to inspect, with everything needed to feed it."""

    model: DEQModel                 # eval mode, on `device`
    recipe: recipes.Recipe          # overrides applied
    data_info: dict[str, Any]
    device: torch.device
    device_reason: str
    label: str                      # what was loaded, for headers
    _data: DataBundle | None = field(default=None, repr=False)

    def data(self) -> DataBundle:
        """Return the recipe's data (built on first call: a trained model may be
        inspected without ever touching its dataset)."""
        if self._data is None:
            data = build_data(self.recipe.data)
            _check_fits(data.info.as_dict(), self.data_info)
            self._data = data
        return self._data

    def split(self, name: str) -> Split:
        """Return the named split ("test" or "val"); DataError when the data has none."""
        bundle = self.data()
        split = bundle.test if name == "test" else getattr(bundle, name, None)
        if split is None:
            raise DataError(f"{bundle.info.name} has no {name} split; use --split test")
        return split

    def batch(self, split: str = "test", n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the first `n` samples of a split as (inputs, targets) on the device."""
        return next(iter(iterate_batches(self.split(split), n, shuffle=False,
                                         device=self.device)))


def _check_fits(new: dict[str, Any], trained: dict[str, Any]) -> None:
    """Raise DataError unless data of shape `new` can feed a model trained on `trained`."""
    keys = ("kind", "channels", "height", "width", "num_classes", "vocab_size")
    diff = [f"{k} {new.get(k)} vs {trained.get(k)}" for k in keys if new.get(k) != trained.get(k)]
    if diff:
        raise DataError(f"data {new['name']} does not fit a model trained on {trained['name']} "
                        f"({', '.join(diff)})")


def check_overrides(overrides: list[str], allowed: tuple[str, ...] = EVAL_OVERRIDES) -> None:
    """Raise RecipeError naming every override whose key is outside `allowed` sections."""
    bad = []
    for text in overrides:
        key = text.partition("=")[0]
        if not any(key == a or key.startswith(a + ".") for a in allowed):
            bad.append(key)
    if bad:
        sections = ", ".join(f"{a}.*" for a in allowed)
        raise recipes.RecipeError(
            f"override {', '.join(bad)}: a trained model accepts only {sections} overrides "
            f"(the weights fix the rest)")


def is_recipe(path: str | Path) -> bool:
    """Return True when `path` names a YAML recipe rather than a run or checkpoint."""
    return Path(path).suffix in RECIPE_SUFFIXES


def open_source(path: str | Path, overrides: list[str] = (), *, allow_recipe: bool = False
                ) -> Source:
    """Return the Source for a run dir, checkpoint or safetensors export (or a recipe, when
    `allow_recipe`: an untrained model initialised from recipe.seed).

    Applies runtime.threads and picks runtime.device; raises RecipeError, CheckpointError,
    DataError or ModelError (all one line) for bad input.
    """
    overrides = list(overrides)
    if allow_recipe and is_recipe(path):
        recipe = recipes.load(path, overrides)
        _apply_threads(recipe)
        data = build_data(recipe.data)
        torch.manual_seed(recipe.seed)       # the same untrained weights on every call
        info = data.info.as_dict()
        model = build_model(recipe, info).eval()
        label = f"untrained model from recipe {path}"
    else:
        check_overrides(overrides)
        model, recipe, info = load_with_recipe(path, overrides)
        _apply_threads(recipe)
        data = None
        label = f"{path}"
    device, reason = pick_device(recipe.runtime.device)
    return Source(model.to(device), recipe, info, device, reason, label, data)


def _apply_threads(recipe: recipes.Recipe) -> None:
    if recipe.runtime.threads:
        torch.set_num_threads(recipe.runtime.threads)
