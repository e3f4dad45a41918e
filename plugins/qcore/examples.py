"""Examples of a model with several inputs (token ids and attention mask), indexed as one array.

A single-input model's examples are a plain array; a model with several graph inputs gets an
`Examples`: one array per input, all with the same first axis, that slices, takes rows, stacks and
concatenates like one array. The runner feeds every array to the input of the same name, so
nothing downstream (coreset, device loop, backprop baseline) has to know how many inputs there are.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np


class Examples:
    """Aligned arrays, one per graph input (in the model's input order), read as one along the first axis."""

    def __init__(self, arrays: Mapping[str, Any]) -> None:
        if not arrays:
            raise ValueError("Examples needs at least one array")
        self.arrays = dict(arrays)
        lengths = {len(value) for value in self.arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"the input arrays differ in length: {({k: len(v) for k, v in self.arrays.items()})}")

    @property
    def names(self) -> list[str]:
        return list(self.arrays)

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index: Any) -> Examples:
        return Examples({name: value[index] for name, value in self.arrays.items()})

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return iter(self.arrays.items())

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k} {getattr(v, 'shape', len(v))}" for k, v in self.arrays.items())
        return f"Examples({shapes})"


Inputs = Any
"""A plain array (one-input model) or `Examples` (several inputs)."""


def of(inputs: Mapping[str, np.ndarray]) -> Inputs:
    """The examples of a dataset's inputs (name -> array): the array itself when there is one."""
    if len(inputs) == 1:
        return next(iter(inputs.values()))
    return Examples(inputs)


def concatenate(parts: Sequence[Inputs]) -> Inputs:
    """np.concatenate for plain arrays and for `Examples` (input by input)."""
    if isinstance(parts[0], Examples):
        return Examples({name: np.concatenate([part.arrays[name] for part in parts]) for name in parts[0].names})
    return np.concatenate(parts)


def feeds(inputs: Inputs, default_name: str, wanted: set[str] | None = None) -> dict[str, np.ndarray]:
    """Feed dict of a batch: a plain array goes to `default_name`; an `Examples` feeds each array to the input
    of its name (only those in `wanted`, when given: a session cut from the model may need fewer)."""
    if isinstance(inputs, Examples):
        return {name: np.asarray(value) for name, value in inputs.arrays.items() if wanted is None or name in wanted}
    return {default_name: inputs}


def save_arrays(prefix: str, inputs: Inputs) -> dict[str, np.ndarray]:
    """npz entries for `inputs`: `prefix` for a plain array, `prefix/<input name>` per array of an `Examples`."""
    if isinstance(inputs, Examples):
        return {f"{prefix}/{name}": np.asarray(value) for name, value in inputs.arrays.items()}
    return {prefix: np.asarray(inputs)}


def load_arrays(prefix: str, archive: Any) -> Inputs:
    """What `save_arrays` wrote, read back from an open npz archive (input order as written)."""
    if prefix in archive.files:
        return archive[prefix]
    named = {key.split("/", 1)[1]: archive[key] for key in archive.files if key.startswith(prefix + "/")}
    if not named:
        raise KeyError(prefix)
    return Examples(named)
