"""Terminal and file output for humans: the live training view, residual plots, sparklines."""

from deqctl.ui.live import TrainView
from deqctl.ui.plot import plot_groups, plot_runs, plot_starts, plot_traces, sparkline

__all__ = ["TrainView", "plot_groups", "plot_runs", "plot_starts", "plot_traces", "sparkline"]
