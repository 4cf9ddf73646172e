"""Inspecting trained (or untrained) DEQs: opening a model with its data, solver comparison
traces, the spectral radius of df/dz at the fixed point and the observed linear rate."""

from .source import EVAL_OVERRIDES, Source, check_overrides, is_recipe, open_source
from .spectral import linear_rate, spectral_radius
from .trace import SolverTrace, TraceReport, compare_solvers, trace_model

__all__ = ["EVAL_OVERRIDES", "Source", "check_overrides", "is_recipe", "open_source",
           "linear_rate", "spectral_radius", "SolverTrace", "TraceReport", "compare_solvers",
           "trace_model"]
