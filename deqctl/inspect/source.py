"""Opening a model to inspect: from a run directory, a checkpoint, a safetensors export or
(for solve-trace) a recipe, with the overrides that make sense at test time."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
import torch

from .. import recipe as recipes
from ..data import DataBundle, DataInfo, Split, build_data, iterate_batches
from ..engine.checkpoint import open_model, resolve
from ..engine.rundir import in_progress
from ..engine.device import pick_device
from ..models import DEQModel, build_model
from ..tasks import Task, task_for

# A trained model's weights fix its architecture and training; test time may change only
# what data it sees, how hard its fixed point is solved, and where it runs.
EVAL_OVERRIDES = ("data", "deq.eval", "runtime")
RECIPE_SUFFIXES = (".yaml", ".yml")


@dataclass
class Source:
    """A model ready to inspect, with everything needed to feed it."""

    model: DEQModel                 # eval mode, on `device`
    recipe: recipes.Recipe          # overrides applied
    info: DataInfo                  # what the model was built for
    device: torch.device
    device_reason: str
    label: str                      # what was loaded, for headers
    _data: DataBundle | None = field(default=None, repr=False)
    progress: str | None = None     # "RUN is still being trained ...", for a run in progress

    @property
    def task(self) -> Task:
        return task_for(self.info)

    def data(self) -> DataBundle:
        """Return the recipe's data (built on first call: a trained model may be
        inspected without ever touching its dataset), tokenized and checked for the model."""
        if self._data is None:
            self._data = build_data(self.recipe.data, like=self.info)
        return self._data

    def split(self, name: str) -> Split:
        """Return the named split; DataError when the data has none."""
        return self.data().split(name)

    def batch(self, split: str = "test", n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the first `n` samples of a split as (inputs, targets) on the device."""
        return next(iter(iterate_batches(self.split(split), n, shuffle=False,
                                         device=self.device)))


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


def open_source(path: str | Path, overrides: list[str] = (), *, allow_recipe: bool = False,
                trust_code: bool = False, allowed: tuple[str, ...] = EVAL_OVERRIDES) -> Source:
    """Return the Source for a run dir, checkpoint or safetensors export (or a recipe, when
    `allow_recipe`: an untrained model initialised from recipe.seed). User code a run or
    checkpoint names is imported only with `trust_code`; a recipe's always (its user
    chose to run it). A trained model takes overrides of the `allowed` sections only.

    Applies runtime.threads and picks runtime.device; raises RecipeError, CheckpointError,
    DataError or ModelError (all one line) for bad input.
    """
    overrides = list(overrides)
    if allow_recipe and is_recipe(path):
        recipe = recipes.load(path, overrides)
        _apply_threads(recipe)
        data = build_data(recipe.data)
        torch.manual_seed(recipe.seed)       # the same untrained weights on every call
        model = build_model(recipe, data.info).eval()
        label = f"untrained model from recipe {path}"
    else:
        check_overrides(overrides, allowed)
        model, recipe, _ = open_model(path, overrides, trust_code=trust_code)
        _apply_threads(recipe)
        data = None
        label = f"{path}"
    progress = in_progress(Path(path), resolve(path)) if Path(path).is_dir() else None
    device, reason = pick_device(recipe.runtime.device)
    return Source(model.to(device), recipe, model.info, device, reason, label, data, progress)


def _apply_threads(recipe: recipes.Recipe) -> None:
    if recipe.runtime.threads:
        torch.set_num_threads(recipe.runtime.threads)
