"""Trainable parameters in and out of onnxruntime-training checkpoints.

The wire format of the fleet is a name -> array mapping of exactly the parameters
the artifact folder trains (`requires_grad` in its checkpoint); frozen weights
stay in each device's checkpoint and never travel.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeplug import _ort
from edgeplug.checkpoints import (
    checkpoints_dir,
    latest_checkpoint,
    state_file,
    write_checkpoint,
)
from edgeplug.errors import DataError, OutputError
from edgeplug.layout import CHECKPOINT
from edgeplug.locking import output_lock

Arrays = dict[str, np.ndarray]


def _load(path: Path) -> Any:
    if not Path(path).is_file():
        raise OutputError(f"no onnxruntime-training checkpoint at {path}; is it an artifact folder written by 'edgeplug rewrite'?")
    with _ort.captured_native_stderr():
        return _ort.training_api().CheckpointState.load_checkpoint(str(path))


def read_trainable(path: str | Path) -> Arrays:
    """The trainable parameters of a checkpoint file (or an artifact folder's initial checkpoint), by name."""
    path = Path(path)
    state = _load(path / CHECKPOINT if path.is_dir() else path)
    return {name: np.array(parameter.data) for name, parameter in sorted(state.parameters, key=lambda item: item[0])
            if parameter.requires_grad}


def check_arrays(arrays: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], source: str) -> None:
    """Refuse parameters that are not exactly the trainable set (names, shapes, dtypes)."""
    if set(arrays) != set(expected):
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        raise DataError(f"{source}: parameters do not match the artifact folder's trainable set "
                        f"(missing {missing[:5]}, unexpected {extra[:5]}); server and devices must use the same rewritten folder")
    for name, value in arrays.items():
        want = expected[name]
        if tuple(value.shape) != tuple(want.shape) or value.dtype != want.dtype:
            raise DataError(f"{source}: parameter '{name}' is {value.dtype}{list(value.shape)}, the model has "
                            f"{want.dtype}{list(want.shape)}; server and devices must use the same rewritten folder")


def write_state(artifact_dir: Path, arrays: Mapping[str, np.ndarray], target: Path) -> None:
    """Write the folder's initial checkpoint to `target` with the trainable values replaced by `arrays`.

    A checkpoint state accepts new values only once a Module is bound to it
    (onnxruntime-training has no data transfer for an unbound state), so the
    training model is opened first.
    """
    with _ort.captured_native_stderr():
        state, _module, _ = _ort.open_artifacts(Path(artifact_dir), optimizer=False)
        for name, value in arrays.items():
            state.parameters[name] = np.ascontiguousarray(value)
        _ort.training_api().CheckpointState.save_checkpoint(state, str(target), include_optimizer_state=False)


def latest_trainable(artifact_dir: Path) -> Arrays:
    """The trainable parameters of the newest training checkpoint of a folder (its initial one if none)."""
    checkpoint = latest_checkpoint(artifact_dir)
    return read_trainable(state_file(checkpoint) if checkpoint else Path(artifact_dir) / CHECKPOINT)


def check_can_save(artifact_dir: Path, force: bool) -> None:
    """Refuse, before any round runs, to overwrite training checkpoints without `force`."""
    if not force and latest_checkpoint(artifact_dir) is not None:
        raise OutputError(f"{artifact_dir} already has training checkpoints ({checkpoints_dir(artifact_dir)}); "
                          "pass --force to replace them with the fleet's global model, or use a fresh folder")


def save_global_model(artifact_dir: str | Path, arrays: Mapping[str, np.ndarray], summary: Mapping[str, Any],
                      *, force: bool = False) -> Path:
    """Write the aggregated model as a training checkpoint of `artifact_dir` (what `edgeplug export` picks up).

    The checkpoint says epoch 0, step 0: `edgeplug train` continues from the global
    model as from a fresh start. A folder that already holds training checkpoints is
    left alone unless `force`.
    """
    artifact_dir = Path(artifact_dir)
    check_arrays(arrays, read_trainable(artifact_dir), "global model")
    with output_lock(artifact_dir, purpose=f"edgeplug fleet: write the global model into {artifact_dir}"):
        check_can_save(artifact_dir, force)
        progress = {"epoch": 0, "batch": 0, "step": 0, "history": [], "fleet": json.loads(json.dumps(dict(summary)))}
        # the old checkpoints are replaced only once the global model's is complete
        return write_checkpoint(artifact_dir, 0, progress, lambda path: write_state(artifact_dir, arrays, path),
                                lambda path: None, replace_all=True)
