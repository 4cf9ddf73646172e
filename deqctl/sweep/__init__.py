"""Sweeps: a grid of ordinary runs (`plan`), run N at a time and resumable (`runner`)."""

from .plan import Plan, Point, SweepError, continue_plan, make_plan, validate_points
from .runner import SweepLock, SweepRunner, last_rows, shell_command

__all__ = ["Plan", "Point", "SweepError", "SweepLock", "SweepRunner", "continue_plan",
           "last_rows", "make_plan", "shell_command", "validate_points"]
