"""`forecast`: values over a horizon (or any float targets). The loss is the mean squared
error in units of each target channel's training std; MAE and RMSE are reported in the
data's own units, and where the targets continue input channels, next to the naive
(last value) and seasonal-naive (same point one season earlier) forecasts of the same
windows, with MASE = MAE / seasonal-naive MAE (below 1 beats it)."""

from __future__ import annotations

import math

import torch

from ..data import DataInfo
from ..ui.fmt import fmt_float
from .base import Metric, Task

BASELINES = ("naive", "snaive")


def seasonal_positions(length: int, horizon: int, season: int) -> torch.Tensor:
    """Window positions the seasonal-naive forecast copies: step h (1-based) takes the value
    k seasons before it, k the fewest whole seasons that reach back into the window."""
    h = torch.arange(1, horizon + 1)
    return length - 1 + h - season * torch.div(h + season - 1, season, rounding_mode="floor")


class Forecast(Task):
    name = "forecast"
    output_name = "forecast"
    distribution = False         # values, not class scores: nothing for a readout stop

    def __init__(self, info: DataInfo):
        super().__init__(info)
        metrics = [Metric("mae", "mae", fmt_float), Metric("rmse", "rmse", fmt_float)]
        if info.baselines:
            metrics += [Metric("mase", "mase", fmt_float),
                        Metric("naive_mae", "naive mae", fmt_float, column=False),
                        Metric("naive_rmse", "naive rmse", fmt_float, column=False),
                        Metric("snaive_mae", "snaive mae", fmt_float, column=False),
                        Metric("snaive_rmse", "snaive rmse", fmt_float, column=False)]
            self._seasonal = seasonal_positions(info.length, info.target_shape[0],
                                                info.season).tolist()
        self.metrics = tuple(metrics)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scale = self.constant("scale", self.info.target_std, y.device)
        return (((out.float() - y) / scale) ** 2).mean()

    def stats(self, out, x, y):
        out = out.float()
        stats = _errors("", out, y)
        if self.info.baselines:
            past = x[:, :, list(self.info.target_channels)]                # (N, L, C)
            naive = past[:, -1:].expand(-1, self.info.target_shape[0], -1)
            seasonal = past[:, self.constant("seasonal", self._seasonal, x.device)]
            stats.update(_errors("naive_", naive.reshape(y.shape), y))
            stats.update(_errors("snaive_", seasonal.reshape(y.shape), y))
        return stats

    def finish(self, row, split=None):
        for prefix in ("", *(f"{b}_" for b in BASELINES)):
            if f"{prefix}mse" in row:
                row[f"{prefix}rmse"] = math.sqrt(row.pop(f"{prefix}mse"))
        if "snaive_mae" in row:
            row["mase"] = row["mae"] / row["snaive_mae"] if row["snaive_mae"] > 0 else math.inf
        return row

    def agree(self, a, b):
        # the same prediction: every value within 1% of its channel's spread
        scale = self.constant("scale", self.info.target_std, a.device)
        return ((a.float() - b.float()).abs() <= 0.01 * scale).flatten(1).all(dim=1)

    def summary(self, row):
        text = f"mae {fmt_float(row.get('mae'))}, rmse {fmt_float(row.get('rmse'))}"
        if "mase" in row:
            text += (f" | naive mae {fmt_float(row.get('naive_mae'))}, seasonal-naive mae "
                     f"{fmt_float(row.get('snaive_mae'))} | mase {fmt_float(row.get('mase'))}")
        return text


def _errors(prefix: str, pred: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    diff = pred - y
    return {f"{prefix}mae": diff.abs().mean(), f"{prefix}mse": (diff * diff).mean()}
