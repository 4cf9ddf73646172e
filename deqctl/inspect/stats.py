"""Estimates over seeds: mean, standard deviation and a 95% confidence interval from
Student's t distribution, for one group of runs or for paired differences between two.

The t quantile is computed here (the regularised incomplete beta function by its continued
fraction, then bisection), so that deqctl needs no scipy; it matches published tables to
every printed digit (12.706 for 1 degree of freedom, 2.776 for 4, 1.960 in the limit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from ..numbers import finite


@dataclass(frozen=True)
class Estimate:
    """mean, std (sample, n - 1) and the 95% interval of the mean; std and ci95 are None
    for a single value."""

    mean: float
    std: float | None
    ci95: tuple[float, float] | None
    n: int

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std,
                "ci95": list(self.ci95) if self.ci95 else None, "n": self.n}

    def excludes_zero(self) -> bool:
        """True when the interval holds no difference (both ends on one side of 0)."""
        return self.ci95 is not None and (self.ci95[0] > 0 or self.ci95[1] < 0)


def estimate(values: Iterable[float | None],
             within: tuple[float | None, float | None] = (None, None)) -> Estimate | None:
    """The Estimate of the finite values given (None when there are none). `within`: bounds
    the mean cannot leave (a rate is >= 0, a fraction <= 1); the interval is cut to them,
    which keeps its coverage (the true mean was never outside them)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return None
    mean = math.fsum(xs) / n
    if n == 1:
        return Estimate(mean, None, None, 1)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
    low, high = within
    return Estimate(mean, std, (mean - half if low is None else max(mean - half, low),
                                mean + half if high is None else min(mean + half, high)), n)


def paired(a: dict[Any, float | None], b: dict[Any, float | None]) -> tuple[Estimate | None, list]:
    """The Estimate of b - a over the keys (seeds) both hold a finite value for, and
    those keys."""
    shared = [k for k in a if k in b and finite(a[k]) is not None and finite(b[k]) is not None]
    return estimate(b[k] - a[k] for k in shared), shared


def t_quantile(p: float, df: int) -> float:
    """The p quantile (0.5 < p < 1) of Student's t distribution with `df` degrees of freedom."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for t >= 0: 1 - I_x(df/2, 1/2) / 2 with x = df / (df + t^2)."""
    return 1.0 - 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) (Lentz's continued fraction,
    on the side of x where it converges fast)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f / a
