"""Step-carried state (`passes.CarriedState`): fed before each training step, replaced by an output after it.

Declared by passes in report.json (`training.carried_state`, per artifact set in
`device_runtime.artifact_sets`), so any runtime carries it without Python; this is
the Python trainer's implementation of the rule in docs/device-runtime.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeplug import tensorfile
from edgeplug.errors import EdgeplugError
from edgeplug.layout import CARRIED_STATE_FILE

CHECKPOINT_FILE = "carried_state.safetensors"
"""In a checkpoint folder: every artifact set's state, keyed `<set index>:<input name>`."""


def load_carried_state(checkpoint: Path | None, number: int, folder: Path, specs: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Artifact set `number`'s state: from the checkpoint when it holds one, else the folder's initial values."""
    if not specs:
        return {}
    if checkpoint is not None and (checkpoint / CHECKPOINT_FILE).is_file():
        tensors, _ = tensorfile.load(checkpoint / CHECKPOINT_FILE)
        prefix = f"{number}:"
        values = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
    else:
        values, _ = tensorfile.load(folder / CARRIED_STATE_FILE)
    missing = [spec["input"] for spec in specs if spec["input"] not in values]
    if missing:
        raise EdgeplugError(f"the carried state of {', '.join(missing)} is missing from "
                            f"{checkpoint or folder}; rewrite the folder or pass --restart")
    return {spec["input"]: values[spec["input"]] for spec in specs}


def save_carried_state(checkpoint: Path, states: Sequence[Mapping[str, np.ndarray]]) -> None:
    """Write every artifact set's state into a checkpoint folder being built (nothing when there is none)."""
    tensors = {f"{number}:{name}": value for number, state in enumerate(states) for name, value in state.items()}
    if tensors:
        tensorfile.save(checkpoint / CHECKPOINT_FILE, tensors, {"format": "edgeplug-carried-state"})


def carried_feeds(state: Mapping[str, np.ndarray], specs: Sequence[Mapping[str, Any]], batch: int) -> tuple[dict[str, np.ndarray], set[str]]:
    """What to feed for a batch of `batch` samples, and which inputs got the state itself (not a substitute)."""
    feeds, matched = {}, set()
    for spec in specs:
        value = state[spec["input"]]
        axis = spec.get("batch_axis")
        if axis is None or value.shape[axis] == batch:
            feeds[spec["input"]] = value
            matched.add(spec["input"])
            continue
        shape = list(value.shape)
        shape[axis] = batch
        if spec.get("other_batch") == "identity":
            feeds[spec["input"]] = np.eye(shape[0], shape[1], dtype=value.dtype)
        else:
            feeds[spec["input"]] = np.zeros(shape, dtype=value.dtype)
    return feeds, matched


def carried_update(specs: Sequence[Mapping[str, Any]], outputs: Mapping[str, np.ndarray], matched: set[str]) -> dict[str, np.ndarray]:
    """The new values after a training step: an output replaces the state when it was fed and the output is finite."""
    updates = {}
    for spec in specs:
        value = outputs.get(spec["output"])
        if spec["input"] in matched and value is not None and list(value.shape) == list(spec["shape"]) and np.all(np.isfinite(value)):
            updates[spec["input"]] = np.array(value, dtype=np.dtype(spec["dtype"]))
    return updates
