"""Forgetting events and the fixed-size coreset drawn by them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from edgeplug.plugin_api import DataError, atomic_file

from .examples import Examples, concatenate, load_arrays, save_arrays


def forgetting_counts(records: np.ndarray, never_learned: int) -> np.ndarray:
    """Forgetting counts per example from correctness records [bit-widths, times, examples].

    A forgetting event is correct -> incorrect between consecutive records; an example
    never correct at a bit-width gets `never_learned` for it. Counts add over bit-widths.
    """
    records = np.asarray(records, dtype=bool)
    if records.ndim != 3:
        raise ValueError("records must be [bit-widths, times, examples]")
    events = (records[:, :-1] & ~records[:, 1:]).sum(axis=1)
    never = ~records.any(axis=1)
    return (events + never * never_learned).sum(axis=0).astype(np.int64)


def sampling_weights(counts: np.ndarray) -> np.ndarray:
    """Probabilities proportional to forgetting counts (uniform when every count is zero)."""
    counts = np.asarray(counts, dtype=np.float64)
    if np.any(counts < 0):
        raise ValueError("forgetting counts cannot be negative")
    total = counts.sum()
    return counts / total if total > 0 else np.full(len(counts), 1.0 / len(counts))


def draw(counts: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` distinct indices by weighted sampling on forgetting counts; never-forgotten examples
    (weight 0) fill the remaining places uniformly only when too few examples were ever forgotten."""
    counts = np.asarray(counts)
    size = min(size, len(counts))
    forgotten = np.flatnonzero(counts > 0)
    if len(forgotten) >= size:
        return np.sort(rng.choice(len(counts), size=size, replace=False, p=sampling_weights(counts)))
    rest = rng.choice(np.flatnonzero(counts == 0), size=size - len(forgotten), replace=False)
    return np.sort(np.concatenate([forgotten, rest]))


def draw_reserved(counts: np.ndarray, origin: np.ndarray, size: int, reserve: float, rng: np.random.Generator) -> np.ndarray:
    """`draw`, with `round(reserve * size)` places kept for training-data examples (origin 0) while the pool holds them.

    Misclassified stream examples enter with the never-learned count, the largest there is, so a plain draw
    soon fills the coreset with the stream: then nothing protects the training domain any more (on the VADER
    stream one training tweet was left after seven chunks, none after nine). The reserved places are drawn by forgetting
    counts among the training examples, the rest by forgetting counts among every other example."""
    counts, origin = np.asarray(counts), np.asarray(origin)
    size = min(size, len(counts))
    training = np.flatnonzero(origin == 0)
    reserved = min(int(round(reserve * size)), len(training))
    if reserved == 0:
        return draw(counts, size, rng)
    kept = training[draw(counts[training], reserved, rng)]
    if reserved == size:
        return np.sort(kept)
    others = np.setdiff1d(np.arange(len(counts)), kept)
    return np.sort(np.concatenate([kept, others[draw(counts[others], size - reserved, rng)]]))


def coreset_size(option: float | int, total: int) -> int:
    """A count (integer >= 1) or a fraction of the training data (0 < f < 1)."""
    if isinstance(option, float) and option < 1:
        return max(1, int(round(option * total)))
    return int(option)


class Stacked:
    """Arrays read as one along the first axis without being copied into one: the coreset followed by a
    chunk, for the device loop, which only ever reads batches (slices) and the rows it keeps."""

    def __init__(self, *parts: np.ndarray) -> None:
        self.parts = parts
        self.ends = np.cumsum([len(part) for part in parts])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index: slice | np.ndarray) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("Stacked slices step by 1")
            pieces, begin = [], 0
            for part, end in zip(self.parts, self.ends):
                low, high = max(start, begin), min(stop, int(end))
                if low < high:
                    pieces.append(part[low - begin:high - begin])
                begin = int(end)
            if not pieces:
                return self.parts[0][:0]
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        rows = np.asarray(index)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        which = np.searchsorted(self.ends, rows, side="right")
        out = np.empty((len(rows), *self.parts[0].shape[1:]), self.parts[0].dtype)
        begin = 0
        for number, (part, end) in enumerate(zip(self.parts, self.ends)):
            mine = which == number
            out[mine] = part[rows[mine] - begin]
            begin = int(end)
        return out


@dataclasses.dataclass
class Coreset:
    """The examples kept for calibration, with their forgetting counts and last correctness."""

    x: Any  # np.ndarray, or Examples for a model with several inputs; or a Stacked view (`pooled(..., stacked=True)`)
    y: np.ndarray
    counts: np.ndarray
    correct: np.ndarray
    origin: np.ndarray  # chunk the example came from: 0 = training data, k = k-th stream chunk

    def __len__(self) -> int:
        return len(self.y)

    def save(self, path: Path) -> None:
        with atomic_file(path) as staged, open(staged, "wb") as handle:
            arrays: dict[str, Any] = {**save_arrays("x", self.x), "y": self.y, "counts": self.counts, "correct": self.correct,
                                      "origin": self.origin}
            np.savez(handle, **arrays)

    @classmethod
    def load(cls, path: Path) -> Coreset:
        if not path.is_file():
            raise DataError(f"coreset not found: {path}; run 'edgeplug quantize OUT --data train.npz' first")
        with np.load(path, allow_pickle=False) as archive:
            return cls(load_arrays("x", archive), archive["y"], archive["counts"], archive["correct"].astype(bool), archive["origin"])

    def pooled(self, x: Any, y: np.ndarray, origin: int, *, stacked: bool = False) -> Coreset:
        """This coreset followed by new examples that have no record yet (`stacked`: the inputs are not
        copied into one array but read through a `Stacked` view)."""
        n = len(y)
        inputs: Any
        if not stacked:
            inputs = concatenate([self.x, x])
        elif isinstance(self.x, Examples):
            inputs = Examples({name: Stacked(self.x.arrays[name], x.arrays[name]) for name in self.x.names})
        else:
            inputs = Stacked(self.x, x)
        return Coreset(inputs, np.concatenate([self.y, y]),
                       np.concatenate([self.counts, np.zeros(n, np.int64)]), np.concatenate([self.correct, np.zeros(n, bool)]),
                       np.concatenate([self.origin, np.full(n, origin, np.int64)]))

    def subset(self, indices: np.ndarray) -> Coreset:
        return Coreset(self.x[indices], self.y[indices], self.counts[indices], self.correct[indices], self.origin[indices])


def recount(pool: Coreset, correct_now: np.ndarray, new: np.ndarray, never_learned: int) -> Coreset:
    """Add this record: a forgetting event for every old example that went correct -> incorrect;
    new examples start at `never_learned` when misclassified, 0 otherwise."""
    counts = pool.counts + (pool.correct & ~correct_now & ~new)
    counts = np.where(new, np.where(correct_now, 0, never_learned), counts)
    return dataclasses.replace(pool, counts=counts.astype(np.int64), correct=correct_now.astype(bool))
