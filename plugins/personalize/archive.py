"""Small .npz files with a JSON `__meta__` entry: slot files and anchor uploads.

numpy's own format, read with `allow_pickle=False`, so a file from elsewhere can
carry arrays and a validated description but never code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeplug.plugin_api import DataError, atomic_file, first_error, load_npz, load_schema

META = "__meta__"


def write_archive(path: str | Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> int:
    """Write arrays + meta atomically (compressed); return the file size in bytes."""
    payload = {name: np.ascontiguousarray(value) for name, value in arrays.items()}
    payload[META] = np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    target = Path(path)
    with atomic_file(target) as staging, open(staging, "wb") as stream:
        np.savez_compressed(stream, **payload)  # type: ignore[arg-type]
    return target.stat().st_size


def read_archive(path: str | Path, schema: str, what: str, made_by: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and validated meta of an archive; any defect is one DataError naming the file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} not found: {path}")
    try:  # anchors come from devices: headers, sizes and memory are checked before anything is inflated
        arrays = load_npz(path)
    except DataError as error:
        raise DataError(f"{path} is not a readable {what} ({str(error).removeprefix(str(path)).lstrip(': ')}); "
                        f"make it with {made_by}") from None
    raw = arrays.pop(META, None)
    if raw is None or raw.dtype != np.uint8 or raw.ndim != 1:
        raise DataError(f"{path} is not a {what} (no {META} entry); make it with {made_by}")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"{path}: {META} is not JSON; make the file with {made_by}") from None
    problem = first_error(meta, load_schema(schema))
    if problem is not None:
        raise DataError(f"{path}: {META} {problem}; make the file with {made_by}")
    return arrays, meta
