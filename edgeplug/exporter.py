"""Export an inference model with the trained weights (plain onnxruntime loads it)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeplug import _ort
from edgeplug.artifacts import read_report, stage_folders
from edgeplug.checkpoints import DEVICE_STATE, STATE, device_parameters, latest_checkpoint, state_file
from edgeplug.errors import EdgeplugError, ModelError
from edgeplug.files import check_regular_file
from edgeplug.layout import CHECKPOINT, FORWARD_MODEL, RECIPE_FILE
from edgeplug.modelio import save_model


def export(artifact_dir: str | Path, output: str | Path, *, checkpoint: str | Path | None = None) -> Path:
    """Write the eval graph without its loss, with weights from `checkpoint`.

    Default checkpoint: the newest one under out/checkpoints, else the untrained
    weights the artifacts were built with.
    """
    artifact_dir = Path(artifact_dir)
    report = read_report(artifact_dir)
    if report.get("stages"):
        return _export_staged(artifact_dir, report, output, checkpoint)
    state_path = _state_path(artifact_dir, checkpoint)
    with tempfile.TemporaryDirectory(prefix="edgeplug-export-") as scratch, _ort.captured_native_stderr():
        try:
            device = state_path.suffix == ".safetensors"  # written by a runtime without onnxruntime checkpoints
            state, module, _ = _ort.open_artifacts(artifact_dir, artifact_dir / CHECKPOINT if device else state_path, optimizer=False)
            for name, value in (device_parameters(state_path, 0) if device else {}).items():
                state.parameters[name] = value  # needs the module open: on a bare CheckpointState it crashes
            staged = Path(scratch) / "model.onnx"
            module.export_model_for_inferencing(str(staged), [report["training"]["output"]])
            model = onnx.load(str(staged))
        except Exception as error:
            raise ModelError(f"export failed: {' '.join(str(error).split())[:400]}") from None
    model = rewrite_export(model, artifact_dir, report)
    model.producer_name, model.producer_version = "edgeplug", report["edgeplug_version"]
    save_model(model, output)
    return Path(output)


def rewrite_export(model: onnx.ModelProto, artifact_dir: Path, report: dict[str, Any]) -> onnx.ModelProto:
    """Let each pass whose report entry says `rewrites_export` rewrite the exported model (in recipe order),
    with the options recorded in recipe.json and the details of its report entry."""
    entries = [entry for entry in report.get("passes", []) if entry.get("rewrites_export")]
    if not entries:
        return model
    from edgeplug.passes import ExportContext, fill_defaults
    from edgeplug.plugins import default_host

    recipe = json.loads((artifact_dir / RECIPE_FILE).read_text(encoding="utf-8"))
    host = default_host()
    for entry in entries:
        info = host.get_pass(entry["name"])
        options: dict[str, Any] = next((p.get("options", {}) for p in recipe.get("passes", []) if p["name"] == entry["name"]), {})
        instance = info.factory(fill_defaults(options, info.factory.options_schema))
        context = ExportContext(artifact_dir, artifact_dir / "passes" / entry["name"], entry.get("details", {}))
        try:
            model = instance.rewrite_export(model, context)
            onnx.checker.check_model(model, full_check=True)
        except EdgeplugError:
            raise
        except Exception as error:
            raise ModelError(f"export: pass '{entry['name']}' (plugin '{info.plugin}' {info.version}) could not rewrite the exported "
                             f"model: {type(error).__name__}: {' '.join(str(error).split())[:400]}") from None
    return model


def _export_staged(artifact_dir: Path, report: dict[str, object], output: str | Path, checkpoint: str | Path | None) -> Path:
    """The inference model on top of a staged folder, with each stage's trained parameters copied in by name.

    Parameters only a stage has (loss heads) are left out: the result is the plain model.
    """
    model = onnx.load(str(artifact_dir / FORWARD_MODEL))
    trained: dict[str, np.ndarray] = {}
    folders = stage_folders(artifact_dir, report)
    chosen = _checkpoint_folder(artifact_dir, checkpoint)
    api = _ort.training_api()
    with _ort.captured_native_stderr():
        for number, folder in enumerate(folders):
            device = chosen is not None and (chosen.suffix == ".safetensors" or not (chosen / STATE).exists())
            path = (chosen if device else state_file(chosen, number)) if chosen else folder / CHECKPOINT
            try:
                if device:
                    # trained values only, as below for onnxruntime checkpoints (updated statistics stay out)
                    trained.update(device_parameters(path, number, updated=False))
                    continue
                state = api.CheckpointState.load_checkpoint(str(path))
                values = {name: np.array(parameter.data) for name, parameter in state.parameters}
                grads = {name for name, parameter in state.parameters if parameter.requires_grad}
                initial = {} if chosen is None or len(folders) == 1 else {
                    name: np.array(parameter.data)
                    for name, parameter in api.CheckpointState.load_checkpoint(str(folder / CHECKPOINT)).parameters
                    if name not in grads}
            except Exception as error:
                raise ModelError(f"export failed reading {path}: {' '.join(str(error).split())[:400]}") from None
            # What this stage changed: its trained parameters, and the buffers its training updated (batch-norm
            # running statistics). A later stage's frozen copy of a weight is unchanged and must not overwrite the
            # value an earlier stage trained.
            trained.update({name: value for name, value in values.items()
                            if name in grads or len(folders) == 1 or (name in initial and not np.array_equal(value, initial[name]))})
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name in trained:
            model.graph.initializer[index].CopyFrom(onnx.numpy_helper.from_array(
                trained[tensor.name].astype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).reshape(tuple(tensor.dims)), tensor.name))
    model = rewrite_export(model, artifact_dir, dict(report))
    model.producer_name, model.producer_version = "edgeplug", str(report["edgeplug_version"])
    save_model(model, output)
    return Path(output)


def _checkpoint_folder(artifact_dir: Path, checkpoint: str | Path | None) -> Path | None:
    """A staged checkpoint folder (holding state/<i> or training_state.safetensors) or a training_state file:
    the one given, else the newest, else None (untrained)."""
    if checkpoint is None:
        return latest_checkpoint(artifact_dir)
    path = Path(checkpoint)
    if path.suffix == ".safetensors" and path.is_file():  # parameters saved by the JavaScript runtime
        return path
    path = path.parent if path.name == STATE else path
    if not (path / STATE).is_dir() and not (path / DEVICE_STATE).is_file():
        raise EdgeplugError(f"checkpoint not found: {checkpoint} (a staged folder's checkpoint is a checkpoints/step-N folder)")
    for state in sorted((path / STATE).iterdir()) if (path / STATE).is_dir() else [path / DEVICE_STATE]:
        check_regular_file(state, "checkpoint")
    return path


def _state_path(artifact_dir: Path, checkpoint: str | Path | None) -> Path:
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.is_dir():
            path = path / STATE if (path / STATE).exists() or not (path / DEVICE_STATE).exists() else path / DEVICE_STATE
        return check_regular_file(path, "checkpoint")  # onnxruntime would block forever on a FIFO
    latest = latest_checkpoint(artifact_dir)
    if latest is None:
        return artifact_dir / CHECKPOINT
    return latest / STATE if (latest / STATE).exists() else latest / DEVICE_STATE

