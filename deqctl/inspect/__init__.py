"""Inspecting trained (or untrained) DEQs: solver comparison traces, the spectral radius
of df/dz at the fixed point, the observed linear rate, and what the task's metrics are."""

from .source import EVAL_OVERRIDES, Source, check_overrides, is_recipe, open_source
from .spectral import linear_rate, spectral_radius
from .task import (input_description, input_name, is_classifier, predictions, quality_metrics,
                   quality_names)
from .trace import SolverTrace, TraceReport, compare_solvers, trace_model

__all__ = ["EVAL_OVERRIDES", "Source", "check_overrides", "is_recipe", "open_source",
           "linear_rate", "spectral_radius", "input_description", "input_name",
           "is_classifier", "predictions", "quality_metrics", "quality_names", "SolverTrace",
           "TraceReport", "compare_solvers", "trace_model"]
