"""Each row's learning rate, chosen per episode on the validation shots.

Why: one fixed learning rate favours some rows and ruins others (full fine-tuning wants
about 1e-4, a last layer 1e-2). Each row trains once per candidate on the episode's
training shots; the candidate with the best validation accuracy (then the lowest
validation loss, then the smaller learning rate) is the row's result for that episode.
The query set never takes part in the choice: candidates may carry their query accuracy
for the record (how much the choice mattered), but `choose_lr` does not look at it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Candidate:
    """What one learning rate gave on this episode. `query_*` are recorded, never compared."""

    lr: float
    validation_accuracy: float
    validation_loss: float
    query_accuracy: float | None = None
    query_loss: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def _key(self) -> tuple[float, float, float]:
        loss = self.validation_loss if math.isfinite(self.validation_loss) else math.inf
        accuracy = self.validation_accuracy if math.isfinite(self.validation_accuracy) else -math.inf
        return (-accuracy, loss, self.lr)


@dataclasses.dataclass(frozen=True)
class LrChoice:
    """The chosen candidate and every candidate tried (the per-episode record)."""

    chosen: Candidate
    candidates: tuple[Candidate, ...]

    @property
    def lr(self) -> float:
        return self.chosen.lr

    def to_dict(self) -> dict[str, Any]:
        return {"chosen_lr": self.chosen.lr, "criterion": "validation accuracy, then validation loss, then smaller lr",
                "candidates": [dataclasses.asdict(c) for c in self.candidates]}


def choose_lr(candidates: Sequence[Candidate]) -> LrChoice:
    """Best validation accuracy; ties go to the lower validation loss, then to the smaller lr.
    A candidate whose training diverged (NaN loss/accuracy) loses to any finite one."""
    if not candidates:
        raise ValueError("no learning-rate candidates")
    lrs = [c.lr for c in candidates]
    if len(set(lrs)) != len(lrs):
        raise ValueError(f"duplicate learning rates among candidates: {lrs}")
    return LrChoice(min(candidates, key=Candidate._key), tuple(candidates))


def search_lr(grid: Sequence[float], train_and_validate: Callable[[float], Candidate]) -> LrChoice:
    """Run `train_and_validate(lr)` for every lr of the grid (each from the same initial
    weights) and choose on validation."""
    if not grid or any(not (lr > 0 and math.isfinite(lr)) for lr in grid):
        raise ValueError(f"the learning-rate grid must hold positive numbers, got {list(grid)}")
    return choose_lr([train_and_validate(float(lr)) for lr in grid])


def log_grid(center: float, *, factor: float = 10.0, points: int = 3) -> list[float]:
    """`points` learning rates spaced by `factor` around `center` (e.g. 1e-3 -> 1e-4, 1e-3, 1e-2)."""
    if points < 1:
        raise ValueError("a grid needs at least one point")
    first = -(points - 1) / 2
    return [float(f"{center * factor ** (first + i):.3g}") for i in range(points)]
