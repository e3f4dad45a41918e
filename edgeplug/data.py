"""Training data: .npz files checked against the model's inputs before any step runs."""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeplug.errors import DataError
from edgeplug.files import check_regular_file

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


class NamedArrays(dict[str, np.ndarray]):
    """Arrays read from a file, which remember its name for error messages (a plain dict says '<arrays>')."""

    def __init__(self, arrays: Mapping[str, np.ndarray], source: str) -> None:
        super().__init__(arrays)
        self.source = source


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read every array of an .npz file (pickles refused), or of a .safetensors file (the device runtimes'
    format), with a DataError naming the file on failure; the dict remembers the file's name (`NamedArrays`)
    for later errors about its contents.

    Headers are read first: declared sizes must match the archive and fit in memory
    before anything is inflated (see `NpzArchive`).
    """
    if Path(path).suffix == ".safetensors":
        from edgeplug import tensorfile

        return NamedArrays(tensorfile.load(path)[0], str(path))
    with NpzArchive(path) as archive:
        keys = archive.keys()
        archive.check_memory(keys)
        return NamedArrays({key: archive.read(key) for key in keys}, str(archive.path))


@dataclasses.dataclass(frozen=True)
class NpyHeader:
    """What an .npy member declares: shape, dtype and the bytes that follow the header."""

    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int


class NpzArchive:
    """An .npz archive read lazily: each member's header first, the arrays only when asked for.

    A deflate bomb or a header claiming 2**40 rows is refused from its header (the
    declared shape must match the member's size in the zip directory), the members a
    model does not use are never inflated, and the memory the used ones need is
    checked before any is read.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = check_regular_file(path, "data file", DataError)
        try:
            with open(self.path, "rb") as stream:
                magic = stream.read(6)
        except OSError as error:
            raise DataError(f"cannot read data file {self.path}: {error.strerror}") from None
        if magic == b"\x93NUMPY":
            raise DataError(f"{self.path} is a single .npy array, not an .npz archive; save the inputs and labels "
                            "together with numpy.savez(path, x=inputs, y=labels)")
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError):
            raise DataError(f"{self.path} is not a readable .npz archive of arrays; save the data with numpy.savez") from None
        self._members = {info.filename.removesuffix(".npy"): info for info in self._zip.infolist()
                         if info.filename.endswith(".npy") and not info.is_dir()}
        self._headers: dict[str, NpyHeader] = {}

    def __enter__(self) -> NpzArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self._zip.close()

    def keys(self) -> list[str]:
        return sorted(self._members)

    def header(self, key: str) -> NpyHeader:
        """Shape and dtype of member `key`, checked against its size in the zip directory (nothing inflated
        beyond the header)."""
        if key in self._headers:
            return self._headers[key]
        info = self._members[key]
        where = f"{self.path}: array '{key}' ({info.filename})"
        try:
            with self._zip.open(info) as stream:
                version = np.lib.format.read_magic(stream)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
                else:
                    raise DataError(f"{where} uses .npy format {version[0]}.{version[1]}, which edgeplug does not read; "
                                    "save plain numeric arrays with numpy.savez")
                offset = stream.tell()
        except DataError:
            raise
        except Exception as error:  # noqa: BLE001 - zlib.error, BadZipFile, ValueError, EOFError, RuntimeError (encrypted)
            raise DataError(f"{where} cannot be read ({type(error).__name__}: {_first_line(error)}); the file is damaged") from None
        if dtype.hasobject:
            raise DataError(f"{where} holds Python objects (pickles), which edgeplug never loads; save numeric arrays")
        count = 1
        for dimension in shape:
            count *= int(dimension)
        nbytes = count * dtype.itemsize
        if offset + nbytes != info.file_size:
            raise DataError(f"{where} declares shape {tuple(shape)} of {dtype} ({nbytes:,} bytes) but the archive holds "
                            f"{max(info.file_size - offset, 0):,} bytes for it; the file is damaged")
        header = NpyHeader(tuple(int(d) for d in shape), dtype, nbytes)
        self._headers[key] = header
        return header

    def check_memory(self, keys: Sequence[str]) -> None:
        """Refuse when the arrays `keys` (plus one copy of the largest, for casting) exceed the memory left."""
        from edgeplug.guard import available_memory_bytes, format_size

        headers = {key: self.header(key) for key in keys}
        if not headers:
            return
        total = sum(h.nbytes for h in headers.values())
        needed = total + max(h.nbytes for h in headers.values())
        available = available_memory_bytes()
        if available is not None and needed > available:
            sizes = ", ".join(f"'{key}' {format_size(h.nbytes)}" for key, h in headers.items())
            raise DataError(f"{self.path}: the arrays used hold {format_size(total)} ({sizes}) and need about "
                            f"{format_size(needed)} of memory, but only {format_size(available)} of memory is left to "
                            "this process; train on part of the data or on a machine with more memory")

    def read(self, key: str) -> np.ndarray:
        header = self.header(key)
        info = self._members[key]
        try:
            with self._zip.open(info) as stream:
                array = np.lib.format.read_array(stream, allow_pickle=False)
                stream.read(1)  # past the end: the zip module checks the member's CRC-32 there
        except MemoryError:
            raise DataError(f"{self.path}: not enough memory to read array '{key}' ({header.nbytes:,} bytes)") from None
        except Exception as error:  # noqa: BLE001 - zlib.error, BadZipFile (CRC), ValueError, EOFError
            raise DataError(f"{self.path}: array '{key}' cannot be read ({type(error).__name__}: {_first_line(error)}); "
                            "the file is damaged") from None
        return array


def _first_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__


def load_dataset(
    source: str | Path | Mapping[str, np.ndarray],
    inputs: Sequence[TensorSpec],
    *,
    loss: str,
    num_classes: int | None = None,
    input_keys: Mapping[str, str] | None = None,
    labels_key: str | None = None,
) -> Dataset:
    """Read arrays and check names, dtypes and shapes against the model's inputs.

    From an .npz file only the arrays the model uses are read, after their headers
    agreed on the number of samples and fit in memory.
    """
    if isinstance(source, Mapping):
        label = getattr(source, "source", "<arrays>")  # arrays from load_npz remember their file
        return _dataset(dict(source), list(source), inputs, loss, num_classes, input_keys, labels_key, label)
    with NpzArchive(source) as archive:
        names = archive.keys()
        keys = _chosen_keys(names, inputs, dict(input_keys or {}), labels_key, str(source))
        samples = {}
        for key in keys.values():
            shape = archive.header(key).shape
            if not shape:
                raise DataError(f"{source}: array '{key}' is a single value; it needs one entry per sample")
            samples[key] = shape[0]
        if len(set(samples.values())) > 1:
            raise DataError(f"{source}: arrays disagree on the number of samples: {samples}")
        archive.check_memory(sorted(set(keys.values())))
        arrays = {key: archive.read(key) for key in sorted(set(keys.values()))}
    return _dataset(arrays, names, inputs, loss, num_classes, input_keys, labels_key, str(source))


def _chosen_keys(names: Sequence[str], inputs: Sequence[TensorSpec], input_keys: Mapping[str, str],
                 labels_key: str | None, label: str) -> dict[str, str]:
    """Array name per model input, and '' -> the labels' array name; a DataError when one is missing."""
    chosen: dict[str, str] = {}
    for spec in inputs:
        key = input_keys.get(spec.name) or (spec.name if spec.name in names else ("x" if len(inputs) == 1 and "x" in names else None))
        if key is None or key not in names:
            wanted = f"'{spec.name}'" + (" or 'x'" if len(inputs) == 1 and spec.name != "x" else "")
            raise DataError(
                f"{label}: no array for model input '{spec.name}' (arrays: {', '.join(sorted(names)) or 'none'}); "
                f"name it {wanted} or map it in the recipe's data.inputs"
            )
        chosen[spec.name] = key
    key = labels_key or next((k for k in LABEL_KEYS if k in names), None)
    if key is None or key not in names:
        raise DataError(
            f"{label}: no labels array (looked for {labels_key or ' or '.join(LABEL_KEYS)}; arrays: {', '.join(sorted(names)) or 'none'}); "
            "add one with numpy.savez(..., y=labels) or name it in the recipe's data.labels"
        )
    chosen[""] = key
    return chosen


def _dataset(arrays: Mapping[str, np.ndarray], names: Sequence[str], inputs: Sequence[TensorSpec], loss: str,
             num_classes: int | None, input_keys: Mapping[str, str] | None, labels_key: str | None, label: str) -> Dataset:
    keys = _chosen_keys(names, inputs, dict(input_keys or {}), labels_key, label)
    chosen = {spec.name: _conform(arrays[keys[spec.name]], spec, f"{label}: array '{keys[spec.name]}' (model input '{spec.name}')")
              for spec in inputs}
    key = keys[""]
    labels = _labels(arrays[key], loss, num_classes, f"{label}: labels '{key}'")
    lengths = {name: array.shape[0] for name, array in chosen.items()} | {key: labels.shape[0]}
    if len(set(lengths.values())) != 1:
        raise DataError(f"{label}: arrays disagree on the number of samples: {lengths}")
    if labels.shape[0] == 0:
        raise DataError(f"{label}: holds no samples")
    return Dataset(chosen, labels, label)


def check_finite(array: np.ndarray, label: str) -> None:
    """A float array holds no NaN or infinity; else a DataError naming how many and the first sample.

    Checked in slices of samples, so the mask never costs more than a few MiB.
    """
    if array.dtype.kind not in "fc" or array.size == 0:
        return
    rows = max(1, (1 << 22) // max(1, array[0].size if array.ndim else 1))
    flat = array.reshape(len(array), -1) if array.ndim else array.reshape(1, 1)
    bad, first = 0, None
    for start in range(0, len(flat), rows):
        mask = ~np.isfinite(flat[start:start + rows])
        count = int(mask.sum())
        if count and first is None:
            first = start + int(np.argmax(mask.any(axis=1)))
        bad += count
    if bad:
        raise DataError(f"{label} holds {bad:,} non-finite value(s) (NaN or infinity), the first in sample {first}; "
                        "clean the data (drop those samples, or numpy.nan_to_num) before training")


def _conform(array: np.ndarray, spec: TensorSpec, label: str) -> np.ndarray:
    expected = np.dtype(spec.dtype)
    if array.dtype != expected:
        if not np.can_cast(array.dtype, expected, casting="same_kind"):
            raise DataError(f"{label} has dtype {array.dtype} but the model expects {expected}")
        array = array.astype(expected)
    if array.ndim == 0 or array.ndim != len(spec.shape):
        raise DataError(f"{label} has shape {tuple(array.shape)} but the model expects {_shape_text(spec.shape)}")
    for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
        if axis > 0 and isinstance(want, int) and want > 0 and got != want:
            raise DataError(f"{label} has shape {tuple(array.shape)} but the model expects {_shape_text(spec.shape)}")
    check_finite(array, label)
    return np.ascontiguousarray(array)


def _labels(array: np.ndarray, loss: str, num_classes: int | None, label: str) -> np.ndarray:
    if loss == "cross-entropy":
        if array.dtype.kind not in "iu":
            raise DataError(f"{label} has dtype {array.dtype}; cross-entropy needs integer class indices")
        if array.ndim != 1:
            raise DataError(f"{label} has shape {tuple(array.shape)}; cross-entropy needs one class index per sample")
        if num_classes is not None and array.size and (array.min() < 0 or array.max() >= num_classes):
            raise DataError(label_range_message(label, array, num_classes))
        return array.astype(np.int64)
    if array.dtype.kind != "f":
        raise DataError(f"{label} has dtype {array.dtype}; {loss} needs float targets")
    if array.ndim == 0:
        raise DataError(f"{label} is a single value; it needs one target per sample")
    targets = array.astype(np.float32)
    check_finite(targets, label)
    return targets


def label_range_message(label: str, labels: np.ndarray, num_classes: int) -> str:
    """Name the labels outside 0..num_classes-1 and what to do about them."""
    outside = np.unique(labels[(labels < 0) | (labels >= num_classes)])
    shown = ", ".join(str(int(v)) for v in outside[:5]) + (f" and {len(outside) - 5} more" if len(outside) > 5 else "")
    return (f"{label} holds label{'s' if len(outside) > 1 else ''} {shown} but the model has {num_classes} outputs "
            f"(labels 0..{num_classes - 1}); for new classes give the model a new head with the 'new-head' pass "
            f"(classes: {max(int(labels.max()) + 1, 1)}), or fix the labels")


def _shape_text(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) and d > 0 else "N" if i == 0 else "?" for i, d in enumerate(shape)) + ")"
