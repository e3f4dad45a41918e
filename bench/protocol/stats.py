"""Paired comparisons over the same episodes, with confidence intervals.

Why paired: every row trains on the same episodes, and episodes differ far more from
each other (domain, ways, shots) than rows do on one episode. The difference per episode
removes that spread; its mean and a 95% interval say whether a row beats another.
A table must not name a winner whose interval includes zero: `winner` returns None then,
and `verdict` says "no difference shown".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """mean(a - b) over n paired observations with a `confidence` interval [low, high]."""

    a: str
    b: str
    n: int
    mean: float
    low: float
    high: float
    confidence: float
    method: str  # "t" or "bootstrap"
    p_value: float | None = None  # two-sided paired t-test (method "t" only)

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def interval_text(self, digits: int = 3) -> str:
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def _pairs(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must be two 1-D sequences of equal length, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired samples contain NaN or infinity")
    return x - y


def paired_t(a: Sequence[float], b: Sequence[float], *, names: tuple[str, str] = ("a", "b"),
             confidence: float = 0.95) -> PairedDifference:
    """Student-t interval of the mean paired difference (and the paired t-test's p-value).

    With fewer than 2 pairs the interval is (-inf, inf): nothing can be concluded.
    """
    from scipy import stats

    d = _pairs(a, b)
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return PairedDifference(*names, n, mean, -math.inf, math.inf, confidence, "t", None)
    sd = float(d.std(ddof=1))
    if sd == 0.0:  # identical differences: the interval collapses onto the mean
        return PairedDifference(*names, n, mean, mean, mean, confidence, "t", 1.0 if mean == 0 else 0.0)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    t = mean / (sd / math.sqrt(n))
    p = float(2 * stats.t.sf(abs(t), n - 1))
    return PairedDifference(*names, n, mean, mean - half, mean + half, confidence, "t", p)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, names: tuple[str, str] = ("a", "b"),
                     confidence: float = 0.95, resamples: int = 10_000, seed: int = 0,
                     groups: Sequence[Any] | None = None) -> PairedDifference:
    """Percentile bootstrap interval of the mean paired difference, resampling episodes.

    `groups` (e.g. the domain of each episode) resamples within each group, keeping the
    groups' shares fixed, so that a table over several domains is not reweighted by chance.
    """
    d = _pairs(a, b)
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return PairedDifference(*names, n, mean, -math.inf, math.inf, confidence, "bootstrap")
    rng = np.random.default_rng(seed)
    if groups is None:
        means = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    else:
        labels = np.asarray(groups)
        if len(labels) != n:
            raise ValueError(f"groups has {len(labels)} entries for {n} pairs")
        sizes = {group: int((labels == group).sum()) for group in np.unique(labels)}
        if min(sizes.values()) < 2:
            raise ValueError(f"resampling within groups needs at least 2 pairs per group, got {sizes}: a group of one "
                             "has no spread and would shrink the interval; resample without groups")
        total = np.zeros(resamples)
        for group in np.unique(labels):
            members = d[labels == group]
            total += members[rng.integers(0, len(members), size=(resamples, len(members)))].sum(axis=1)
        means = total / n
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return PairedDifference(*names, n, mean, float(low), float(high), confidence, "bootstrap")


def winner(difference: PairedDifference) -> str | None:
    """The better of the two only when the interval excludes zero; otherwise None."""
    if difference.low > 0:
        return difference.a
    if difference.high < 0:
        return difference.b
    return None


def verdict(difference: PairedDifference, *, digits: int = 3) -> str:
    """One phrase for a table cell: who is better and by how much, or that no difference is shown."""
    name = winner(difference)
    interval = difference.interval_text(digits)
    if name is None:
        return f"no difference shown ({interval}, interval includes 0)"
    return f"{name} better ({interval})"


def summary(values: Sequence[float], *, confidence: float = 0.95) -> dict[str, float]:
    """Mean with a t interval (for a single row's accuracy; comparisons use the paired functions)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "low": -math.inf, "high": math.inf, "std": math.nan}
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half, "std": sd}
