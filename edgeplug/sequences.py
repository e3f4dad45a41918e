"""Variable-length sequences: trim each batch to its longest attention mask.

Text data is padded to a fixed length when it is prepared (arrays must be rectangular), but
a batch of short questions padded to 128 tokens makes every step compute (and keep for
backward) mostly padding. A model whose sequence axis is dynamic can take each batch cut to
its longest real sequence instead: columns past the last 1 of every row of the attention
mask are dropped from every input that has that axis. A model that masks padding (masked
attention, masked pooling) computes the same outputs either way, up to the order of float
sums; one that does not would change, so the trainer checks one batch before it trims.

Which input is the mask, and which axes are the sequence: the integer input of rank 2 whose
name says mask (`attention_mask`, `input_mask`, ...) with a named (dynamic) second axis; every
input axis with the same name is trimmed with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from edgeplug.data import TensorSpec

CHECK_TOLERANCE = 1e-4  # relative to the output's largest magnitude: float sums reordered, nothing more


@dataclasses.dataclass(frozen=True)
class SequenceAxes:
    """The mask input, the name of its sequence dimension, and the axis of that dimension in every input."""

    mask: str
    dimension: str
    axes: Mapping[str, int]

    def length(self, batch: Mapping[str, np.ndarray]) -> int:
        """Columns up to the last one any row of the batch's mask keeps (at least 1)."""
        mask = np.asarray(batch[self.mask])
        used = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=0)) if mask.size else np.array([], dtype=np.int64)
        return int(used[-1]) + 1 if used.size else 1

    def trim(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch with every sequence axis cut to `length(batch)` (the same arrays when nothing is cut)."""
        length = self.length(batch)
        out = dict(batch)
        for name, axis in self.axes.items():
            array = out.get(name)
            if array is not None and array.shape[axis] > length:
                index: list[Any] = [slice(None)] * array.ndim
                index[axis] = slice(0, length)
                out[name] = array[tuple(index)]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"mask": self.mask, "dimension": self.dimension, "axes": dict(self.axes)}


def find_sequence_axes(specs: Sequence[TensorSpec]) -> SequenceAxes | None:
    """The attention mask and the inputs' sequence axes, or None when the model has no such mask."""
    for spec in specs:
        kind = np.dtype(spec.dtype).kind
        if kind not in "iub" or len(spec.shape) != 2 or "mask" not in spec.name.lower():
            continue
        dimension = spec.shape[1]
        if not isinstance(dimension, str) or not dimension:
            continue  # a fixed length cannot be trimmed
        axes = {s.name: axis for s in specs for axis, d in enumerate(s.shape) if axis > 0 and d == dimension}
        return SequenceAxes(spec.name, dimension, axes)
    return None


def axis_lengths(specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
    """The length each named dynamic axis (besides the batch) has in the data: what to count a step at."""
    lengths: dict[str, int] = {}
    for spec in specs:
        array = inputs.get(spec.name)
        if array is None:
            continue
        for axis, dim in enumerate(spec.shape):
            if axis > 0 and isinstance(dim, str) and dim and axis < array.ndim:
                lengths[dim] = max(lengths.get(dim, 0), int(array.shape[axis]))
    return lengths


def data_axis_lengths(model: onnx.ModelProto, given: Mapping[str, int] | None,
                      calibration: Mapping[str, np.ndarray] | None) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Lengths of the data inputs' named dynamic axes besides the batch, for passes that count or build at a
    fixed length: `given` (a pass's `dims` option) first, else the calibration arrays' widths (the padded
    length the data was prepared at). Returns the lengths and, for each axis found in neither, its inputs."""
    lengths = dict(given or {})
    initializers = {t.name for t in model.graph.initializer}
    missing: dict[str, list[str]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if axis == 0 or dim.HasField("dim_value") or not dim.dim_param or dim.dim_param in lengths:
                continue
            array = None if calibration is None else calibration.get(value.name)
            if array is not None and np.ndim(array) > axis:
                lengths[dim.dim_param] = int(np.shape(array)[axis])
            else:
                missing.setdefault(dim.dim_param, []).append(value.name)
    return lengths, missing


def outputs_agree(full: np.ndarray, trimmed: np.ndarray) -> tuple[bool, float]:
    """Whether two outputs of the same batch are equal up to reordered float sums; and their max abs difference."""
    if full.shape != trimmed.shape:
        return False, float("inf")
    if full.size == 0:
        return True, 0.0
    difference = float(np.abs(full.astype(np.float64) - trimmed.astype(np.float64)).max())
    scale = float(np.abs(full).max()) + 1.0
    return difference <= CHECK_TOLERANCE * scale, difference
