"""Training data: .npz files checked against the model's inputs before any step runs."""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeplug.errors import DataError

LABEL_KEYS = ("y", "labels")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Model inputs by input name, plus labels; all arrays share the leading axis."""

    inputs: Mapping[str, np.ndarray]
    labels: np.ndarray
    source: str = "<arrays>"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        arrays = {name: array[indices] for name, array in self.inputs.items()}
        arrays["labels"] = self.labels[indices]
        return arrays


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A model input as report.json describes it: name, numpy dtype, shape (None/str = any)."""

    name: str
    dtype: str
    shape: Sequence[int | str | None]


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read every array of an .npz file (pickles refused), with a DataError naming the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        raise DataError(f"{path} is not a readable .npz archive of arrays; save the data with numpy.savez") from None


def load_dataset(
    source: str | Path | Mapping[str, np.ndarray],
    inputs: Sequence[TensorSpec],
    *,
    loss: str,
    num_classes: int | None = None,
    input_keys: Mapping[str, str] | None = None,
    labels_key: str | None = None,
) -> Dataset:
    """Read arrays and check names, dtypes and shapes against the model's inputs."""
    label = str(source) if not isinstance(source, Mapping) else "<arrays>"
    arrays = dict(source) if isinstance(source, Mapping) else load_npz(source)
    input_keys = dict(input_keys or {})
    chosen: dict[str, np.ndarray] = {}
    for spec in inputs:
        key = input_keys.get(spec.name) or (spec.name if spec.name in arrays else ("x" if len(inputs) == 1 and "x" in arrays else None))
        if key is None or key not in arrays:
            names = f"'{spec.name}'" + (" or 'x'" if len(inputs) == 1 and spec.name != "x" else "")
            raise DataError(
                f"{label}: no array for model input '{spec.name}' (arrays: {', '.join(sorted(arrays)) or 'none'}); "
                f"name it {names} or map it in the recipe's data.inputs"
            )
        chosen[spec.name] = _conform(arrays[key], spec, f"{label}: array '{key}' (model input '{spec.name}')")
    key = labels_key or next((k for k in LABEL_KEYS if k in arrays), None)
    if key is None or key not in arrays:
        raise DataError(
            f"{label}: no labels array (looked for {labels_key or ' or '.join(LABEL_KEYS)}; arrays: {', '.join(sorted(arrays)) or 'none'}); "
            "add one with numpy.savez(..., y=labels) or name it in the recipe's data.labels"
        )
    labels = _labels(arrays[key], loss, num_classes, f"{label}: labels '{key}'")
    lengths = {name: array.shape[0] for name, array in chosen.items()} | {key: labels.shape[0]}
    if len(set(lengths.values())) != 1:
        raise DataError(f"{label}: arrays disagree on the number of samples: {lengths}")
    if labels.shape[0] == 0:
        raise DataError(f"{label}: holds no samples")
    return Dataset(chosen, labels, label)


def _conform(array: np.ndarray, spec: TensorSpec, label: str) -> np.ndarray:
    expected = np.dtype(spec.dtype)
    if array.dtype != expected:
        if not np.can_cast(array.dtype, expected, casting="same_kind"):
            raise DataError(f"{label} has dtype {array.dtype} but the model expects {expected}")
        array = array.astype(expected)
    if array.ndim != len(spec.shape):
        raise DataError(f"{label} has shape {tuple(array.shape)} but the model expects {_shape_text(spec.shape)}")
    for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
        if axis > 0 and isinstance(want, int) and want > 0 and got != want:
            raise DataError(f"{label} has shape {tuple(array.shape)} but the model expects {_shape_text(spec.shape)}")
    return np.ascontiguousarray(array)


def _labels(array: np.ndarray, loss: str, num_classes: int | None, label: str) -> np.ndarray:
    if loss == "cross-entropy":
        if array.dtype.kind not in "iu":
            raise DataError(f"{label} has dtype {array.dtype}; cross-entropy needs integer class indices")
        if array.ndim != 1:
            raise DataError(f"{label} has shape {tuple(array.shape)}; cross-entropy needs one class index per sample")
        if num_classes is not None and array.size and (array.min() < 0 or array.max() >= num_classes):
            raise DataError(f"{label} holds classes {int(array.min())}..{int(array.max())} but the model has {num_classes} outputs")
        return array.astype(np.int64)
    if array.dtype.kind != "f":
        raise DataError(f"{label} has dtype {array.dtype}; {loss} needs float targets")
    return array.astype(np.float32)


def _shape_text(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) and d > 0 else "N" if i == 0 else "?" for i, d in enumerate(shape)) + ")"
