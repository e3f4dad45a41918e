"""Shared plot fixes for the bench figures: labels that never overprint each other, and accuracy axes that
cannot make two results near chance look far apart."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

MIN_ACCURACY_SPAN = 0.1
"""An accuracy axis spans at least this much: 0.0996 and 0.1012 must look the same, not a full axis apart."""


def accuracy_axis(axis: Any, values: Iterable[float | None], *, chance: float | None = None, which: str = "y") -> None:
    """Limits of an accuracy axis: the data (and chance, when given) with a margin, at least MIN_ACCURACY_SPAN wide,
    inside [0, 1]."""
    shown = [v for v in values if v is not None] + ([chance] if chance is not None else [])
    if not shown:
        return
    low, high = min(shown), max(shown)
    margin = max(0.05 * (high - low), 0.01)
    low, high = low - margin, high + margin
    if high - low < MIN_ACCURACY_SPAN:
        middle = (low + high) / 2
        low, high = middle - MIN_ACCURACY_SPAN / 2, middle + MIN_ACCURACY_SPAN / 2
    if low < 0:
        low, high = 0.0, max(high - low, MIN_ACCURACY_SPAN)
    if high > 1:
        low, high = min(low - (high - 1), 1 - MIN_ACCURACY_SPAN), 1.0
    (axis.set_ylim if which == "y" else axis.set_xlim)(max(0.0, low), min(1.0, high))
    if chance is not None:
        (axis.axhline if which == "y" else axis.axvline)(chance, color="grey", linestyle=":", linewidth=1)


def spread_positions(wanted: Sequence[float], gap: float) -> list[float]:
    """Positions as close as possible to `wanted` (any order) with at least `gap` between any two, keeping their order."""
    order = sorted(range(len(wanted)), key=lambda i: wanted[i])
    placed = [float(wanted[i]) for i in order]
    for index in range(1, len(placed)):  # push up what is too close to the one below
        placed[index] = max(placed[index], placed[index - 1] + gap)
    overshoot = placed[-1] - max(wanted) if placed else 0.0
    if overshoot > 0:  # then shift the whole stack down by half the overshoot, still keeping the gaps
        placed = [p - overshoot / 2 for p in placed]
        for index in range(len(placed) - 2, -1, -1):
            placed[index] = min(placed[index], placed[index + 1] - gap)
    result = [0.0] * len(wanted)
    for rank, original in enumerate(order):
        result[original] = placed[rank]
    return result


def label_points(axis: Any, points: Sequence[tuple[float, float, str]], *, fontsize: int = 8) -> None:
    """Label each (x, y) point to its right (to its left near the right edge); labels that would overlap are moved apart vertically (in axis
    fraction, one text line apart) and joined to their point by a thin line."""
    if not points:
        return
    axis.figure.canvas.draw()  # the data limits are final: place in axis fraction
    to_axes = axis.transAxes.inverted()
    fractions = [to_axes.transform(axis.transData.transform((x, y))) for x, y, _ in points]
    line = fontsize * axis.figure.dpi / 72 * 1.35 / (axis.bbox.height or 1)  # one text line, in axis fraction
    heights = spread_positions([float(f[1]) for f in fractions], line)
    for (x, y, text), fraction, height in zip(points, fractions, heights, strict=True):
        right = float(fraction[0]) < 0.75  # labels of points near the right edge go to their left
        axis.annotate(text, (x, y), xytext=(float(fraction[0]) + (0.04 if right else -0.04), height), textcoords="axes fraction",
                      fontsize=fontsize, va="center", ha="left" if right else "right",
                      arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.5, "shrinkA": 0, "shrinkB": 3})
