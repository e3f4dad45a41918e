"""The values that travel between server and devices, in and out of onnxruntime-training checkpoints.

The wire format of the fleet is a name -> array mapping of exactly the parameters the
artifact folder trains (`requires_grad` in its checkpoint) plus the frozen parameters that
training overwrites in place (batch-norm running statistics in training mode): without
those the devices' statistics drift while the global model keeps the initial ones. Every
other weight stays in each device's copy of the folder and never travels.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeplug import _ort
from edgeplug.checkpoints import (
    checkpoints_dir,
    latest_checkpoint,
    read_progress,
    state_file,
    write_checkpoint,
)
from edgeplug.errors import DataError, EdgeplugError, OutputError
from edgeplug.layout import CHECKPOINT, TRAINING_MODEL
from edgeplug.locking import output_lock

Arrays = dict[str, np.ndarray]
FLEET_KEY = "fleet"
"""trainer.json key of a global-model checkpoint: the round it holds and the run's settings."""


def _load(path: Path) -> Any:
    if not Path(path).is_file():
        raise OutputError(f"no onnxruntime-training checkpoint at {path}; is it an artifact folder written by 'edgeplug rewrite'?")
    with _ort.captured_native_stderr():
        return _ort.training_api().CheckpointState.load_checkpoint(str(path))


@functools.cache
def _updated_in_place(training_model: Path, mtime: float) -> tuple[str, ...]:
    import onnx

    from edgeplug.device_contract import updated_in_place

    model = onnx.load(str(training_model), load_external_data=False)
    inputs = {value.name for value in model.graph.input}
    return tuple(updated_in_place(model, inputs))


def travelling_names(artifact_dir: str | Path) -> list[str]:
    """Names of the values a device receives and sends back: trainable parameters and in-place statistics."""
    folder = Path(artifact_dir).resolve()
    state = _load(folder / CHECKPOINT)
    trainable = {name for name, parameter in state.parameters if parameter.requires_grad}
    frozen = {name for name, parameter in state.parameters if not parameter.requires_grad}
    training = folder / TRAINING_MODEL
    updated = set(_updated_in_place(training, training.stat().st_mtime)) & frozen if training.is_file() else set()
    return sorted(trainable | updated)


def read_values(path: str | Path, names: list[str]) -> Arrays:
    """The values of `names` in a checkpoint file (or an artifact folder's initial checkpoint), by name."""
    path = Path(path)
    state = _load(path / CHECKPOINT if path.is_dir() else path)
    return {name: np.array(state.parameters[name].data) for name in names}


def read_trainable(path: str | Path) -> Arrays:
    """The travelling values (see `travelling_names`) of an artifact folder's initial checkpoint."""
    return read_values(path, travelling_names(path))


def update_problem(arrays: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> str | None:
    """Why `arrays` cannot be aggregated into a model whose travelling values are `expected`, or None.

    Names, shapes and dtypes must match exactly and every value must be finite: one NaN
    averaged in makes the whole global tensor NaN.
    """
    if set(arrays) != set(expected):
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        return f"parameters do not match the folder's (missing {missing[:5]}, unexpected {extra[:5]})"
    for name in sorted(arrays):
        value, want = arrays[name], expected[name]
        if tuple(value.shape) != tuple(want.shape) or value.dtype != want.dtype:
            return f"parameter '{name}' is {value.dtype}{list(value.shape)}, the model has {want.dtype}{list(want.shape)}"
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            return f"parameter '{name}' holds {bad} non-finite value(s) (NaN or infinity)"
    return None


def check_arrays(arrays: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], source: str) -> None:
    """Refuse values that are not exactly the travelling set (names, shapes, dtypes, finite)."""
    problem = update_problem(arrays, expected)
    if problem is not None:
        raise DataError(f"{source}: {problem}; server and devices must use the same rewritten folder")


def write_state(artifact_dir: Path, arrays: Mapping[str, np.ndarray], target: Path) -> None:
    """Write the folder's initial checkpoint to `target` with the values of `arrays` in place.

    A checkpoint state accepts new values only once a Module is bound to it
    (onnxruntime-training has no data transfer for an unbound state), so the
    training model is opened first.
    """
    options = _ort.inference_runtime().SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    with _ort.captured_native_stderr():
        state, _module, _ = _ort.open_artifacts(Path(artifact_dir), optimizer=False, session_options=options)
        for name, value in arrays.items():
            state.parameters[name] = np.ascontiguousarray(value)
        _ort.training_api().CheckpointState.save_checkpoint(state, str(target), include_optimizer_state=False)


def fleet_checkpoint(artifact_dir: Path) -> tuple[dict[str, Any], Arrays] | None:
    """The newest global-model checkpoint of a fleet run in the folder: (its record, its values), or None."""
    checkpoint = latest_checkpoint(artifact_dir)
    if checkpoint is None:
        return None
    record = read_progress(checkpoint).get(FLEET_KEY)
    if not isinstance(record, dict) or not isinstance(record.get("round"), int):
        return None
    return record, read_values(state_file(checkpoint), travelling_names(artifact_dir))


def check_can_save(artifact_dir: Path, force: bool) -> None:
    """Refuse, before any round runs, to overwrite training checkpoints without `force`."""
    if not force and latest_checkpoint(artifact_dir) is not None:
        raise OutputError(f"{artifact_dir} already has training checkpoints ({checkpoints_dir(artifact_dir)}); "
                          "pass --force to replace them with the fleet's global model, or use a fresh folder")


def save_global_model(artifact_dir: str | Path, arrays: Mapping[str, np.ndarray], summary: Mapping[str, Any],
                      *, replace_all: bool = False) -> Path:
    """Write the global model as a training checkpoint of `artifact_dir` (what `edgeplug export` picks up).

    The checkpoint says epoch 0, step 0: `edgeplug train` continues from the global
    model as from a fresh start. `summary` is recorded under "fleet" (its "round" names
    the checkpoint, so a restarted server resumes after it). `replace_all` drops every
    older checkpoint once this one is complete; otherwise the two newest are kept.
    """
    artifact_dir = Path(artifact_dir)
    check_arrays(arrays, read_trainable(artifact_dir), "global model")
    if not isinstance(summary.get("round"), int):
        raise EdgeplugError("a global-model checkpoint needs the round it holds")
    with output_lock(artifact_dir, purpose=f"edgeplug fleet: write the global model into {artifact_dir}"):
        progress = {"epoch": 0, "batch": 0, "step": 0, "history": [], FLEET_KEY: json.loads(json.dumps(dict(summary)))}
        return write_checkpoint(artifact_dir, int(summary["round"]), progress,
                                lambda path: write_state(artifact_dir, arrays, path), lambda path: None,
                                keep=2, replace_all=replace_all)
