"""Named tensors in one file for device runtimes: data sets, carried state, parameters.

The format is safetensors (an 8-byte little-endian header length, a JSON header
naming each tensor's dtype, shape and byte range, then the raw little-endian
bytes; docs/device-runtime.md). Any runtime reads it in a few lines, without
numpy or protobuf; the JavaScript runtime does (runtimes/web/src/safetensors.mjs).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors.numpy

from edgeplug.atomic import write_bytes
from edgeplug.errors import DataError
from edgeplug.files import check_regular_file

SUFFIX = ".safetensors"
DATA_FORMAT = "edgeplug-data"
"""`__metadata__["format"]` of a data file: model inputs by input name plus `labels`."""


def dumps(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    arrays = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    return bytes(safetensors.numpy.save(arrays, metadata=dict(metadata) if metadata else None))


def save(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> Path:
    """Write `tensors` to `path` atomically (whole or not at all)."""
    write_bytes(Path(path), dumps(tensors, metadata))
    return Path(path)


def load(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read every tensor and the string metadata; a broken file is a DataError naming it."""
    path = check_regular_file(path, "tensor file", DataError)  # a FIFO would block the read
    from edgeplug.guard import available_memory_bytes, format_size

    size, available = path.stat().st_size, available_memory_bytes()
    if available is not None and 2 * size > available:  # the file's bytes, then the arrays copied out of them
        raise DataError(f"{path} is {format_size(size)} and needs about {format_size(2 * size)} of memory to read, but only "
                        f"{format_size(available)} is left to this process")
    raw = path.read_bytes()
    try:
        tensors = safetensors.numpy.load(raw)
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + length])
    except Exception:  # safetensors raises its own SafetensorError; a truncated file fails in struct/json
        raise DataError(f"{path} is not a readable {SUFFIX} file (safetensors format)") from None
    metadata = header.get("__metadata__") or {}
    return {name: np.array(array) for name, array in tensors.items()}, dict(metadata)
