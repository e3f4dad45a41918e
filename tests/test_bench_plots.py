"""bench/plotting.py: labels never overprint, accuracy axes never magnify noise at chance."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from plotting import MIN_ACCURACY_SPAN, accuracy_axis, label_points, spread_positions  # noqa: E402


def test_spread_positions_keeps_order_and_gaps() -> None:
    wanted = [0.50, 0.51, 0.10, 0.505, 0.9]
    placed = spread_positions(wanted, 0.05)
    assert sorted(range(5), key=lambda i: wanted[i]) == sorted(range(5), key=lambda i: placed[i])
    ordered = sorted(placed)
    assert all(b - a >= 0.05 - 1e-12 for a, b in zip(ordered, ordered[1:], strict=False))
    assert placed[2] == pytest.approx(0.10) and placed[4] == pytest.approx(0.9)


def test_accuracy_axis_spans_at_least_the_minimum_and_labels_do_not_overlap() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots()
    axis.plot([1, 2], [0.0996, 0.1012], "o")
    accuracy_axis(axis, [0.0996, 0.1012])
    low, high = axis.get_ylim()
    assert high - low >= MIN_ACCURACY_SPAN - 1e-9 and 0 <= low <= 0.0996 and high >= 0.1012
    points = [(1.0, 0.1 + i * 1e-4, f"row {i}") for i in range(5)]
    label_points(axis, points)
    figure.canvas.draw()
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(text) for text in axis.texts]  # the words only (an Annotation's own box holds its line)
    assert len(boxes) == 5
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(figure)
