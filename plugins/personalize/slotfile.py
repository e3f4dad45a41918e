"""Slot files: generated (or re-estimated, or fine-tuned) values for the device model's slots.

A slot file is checked against the device model before use: the fingerprint must
be this model's, every array must be a known slot with its exact shape and dtype,
and every value finite. A slot file may fill only some slots (the stats baseline
fills the statistics, the prototype baseline the classifier); the rest keep the
model's own values.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeplug.plugin_api import DataError

from .archive import read_archive, write_archive
from .manifest import Manifest

FORMAT = "edgeplug-personalize-slots"
MADE_BY = "edgeplug personalize generate or baseline"


class SlotFileError(DataError):
    """A slot file that does not fit the device model (foreign, wrong shape or dtype, not finite)."""


def check_values(values: Mapping[str, np.ndarray], manifest: Manifest, label: str) -> dict[str, np.ndarray]:
    """Refuse values that are not slots of this model, or have another shape or dtype."""
    known = {slot.name: slot for slot in manifest.slots}
    if not values:
        raise SlotFileError(f"{label} holds no slot values")
    checked = {}
    for name, value in values.items():
        slot = known.get(name)
        if slot is None:
            raise SlotFileError(f"{label}: '{name}' is not a slot of this model (slots: {', '.join(sorted(known))})")
        if tuple(value.shape) != slot.shape:
            raise SlotFileError(f"{label}: slot '{name}' has shape {tuple(value.shape)} but the model's slot is {slot.shape}")
        if value.dtype != np.dtype(slot.dtype):
            raise SlotFileError(f"{label}: slot '{name}' has dtype {value.dtype} but the model's slot is {slot.dtype}")
        if not np.all(np.isfinite(value)):
            raise SlotFileError(f"{label}: slot '{name}' holds NaN or infinite values")
        checked[name] = value
    return checked


def write_slots(path: str | Path, values: Mapping[str, np.ndarray], manifest: Manifest, method: str,
                details: Mapping[str, Any] | None = None) -> int:
    """Check `values` against the manifest and write them whole; return the file size."""
    return write_slot_file(path, check_values(values, manifest, "slot values"), manifest.fingerprint, method, details)


def write_slot_file(path: str | Path, values: Mapping[str, np.ndarray], fingerprint: str, method: str,
                    details: Mapping[str, Any] | None = None) -> int:
    """Write values for the model with `fingerprint` (the cloud has no manifest; the device checks on read)."""
    meta = {
        "format": FORMAT, "format_version": 1, "model_fingerprint": fingerprint, "method": method,
        "slots": {name: {"shape": list(v.shape), "dtype": str(v.dtype)} for name, v in values.items()},
        "details": dict(details or {}),
    }
    return write_archive(path, values, meta)


def read_slots(path: str | Path, manifest: Manifest) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Values and metadata of a slot file made for this device model, or a SlotFileError saying why not."""
    try:
        arrays, meta = read_archive(path, "personalize-slots", "slot file", MADE_BY)
    except DataError as error:
        raise SlotFileError(str(error)) from None
    if meta["model_fingerprint"] != manifest.fingerprint:
        raise SlotFileError(
            f"{path} was made for another model (fingerprint {meta['model_fingerprint'][:12]}, this device model is "
            f"{manifest.fingerprint[:12]}); generate slot values from anchors of this model")
    if set(meta["slots"]) != set(arrays):
        raise SlotFileError(f"{path}: the arrays ({', '.join(sorted(arrays))}) differ from the slots its __meta__ lists "
                            f"({', '.join(sorted(meta['slots']))}); the file is damaged, make it again")
    return check_values(arrays, manifest, str(path)), meta
