"""Tasks by name: classify, lm, forecast, tag. The data decides the task (DataInfo.task); a
new task is one module with a Task subclass, registered here."""

from __future__ import annotations

from ..data import DataInfo
from .base import Metric, Task
from .classify import Classify
from .forecast import Forecast
from .lm import LanguageModel
from .tag import Tag

TASKS: dict[str, type[Task]] = {"classify": Classify, "lm": LanguageModel, "forecast": Forecast,
                                "tag": Tag}


def task_for(info: DataInfo) -> Task:
    """Return the task of data described by `info`."""
    return TASKS[info.task](info)


__all__ = ["Task", "Metric", "TASKS", "task_for"]
