"""report.json: what a rewrite produced, and each pass's entry in it, checked against its schema."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx

from edgeplug import __version__
from edgeplug.errors import EdgeplugError, PassError
from edgeplug.graph import FLOAT_TYPES, GraphIndex, tensor_values
from edgeplug.layout import (
    CARRIED_STATE_FILE,
    CHECKPOINT,
    EVAL_MODEL,
    FORWARD_MODEL,
    GRADIENTS_MODEL,
    LABELS_INPUT,
    NOMINAL_CHECKPOINT,
    OPERATOR_CONFIGS,
    OPTIMIZER_MODEL,
    OPTIMIZER_STEP_MODEL,
    ORT_MODELS,
    STATE_EVAL_MODEL,
    TRAINING_MODEL,
)
from edgeplug.modelio import default_opset
from edgeplug.pass_checks import run_phase
from edgeplug.passes import Pass, PassInfo, PassReport
from edgeplug.recipe import Recipe
from edgeplug.validation import first_error, load_schema


def report_entry(info: PassInfo, instance: Pass, seconds: float, timeout: float | None = None) -> dict[str, Any]:
    report = run_phase(info, "report", instance.report, timeout=timeout)
    if not isinstance(report, PassReport):
        raise PassError(info.name, "report", f"returned {type(report).__name__}, expected PassReport")
    try:
        details = json.loads(json.dumps(dict(report.details), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise PassError(info.name, "report", f"details are not JSON values: {error}") from None
    return {
        "name": info.name,
        "plugin": info.plugin,
        "version": info.version,
        "changed": bool(report.changed),
        "summary": str(report.summary),
        "details": details,
        "seconds": round(seconds, 4),
        "runtime_hooks": type(instance).runtime_hooks is not Pass.runtime_hooks,
        "rewrites_export": type(instance).rewrite_export is not Pass.rewrite_export,
    }


def _weight_values(model: onnx.ModelProto, parameters: list[str]) -> int:
    """Values of the model's weights: float parameters, and integer weights that DequantizeLinear turns into float
    (quantize-frozen: frozen, but weights); their scales are not counted (metadata of the quantized ones)."""
    index = GraphIndex(model)
    scales = {name for name in parameters
              if all(node.op_type == "DequantizeLinear" and slot > 0 for node, slot in index.consumers.get(name, []))}
    quantized = {node.input[0] for node in model.graph.node if node.op_type == "DequantizeLinear" and node.input
                 and node.input[0] in index.initializers and index.initializers[node.input[0]].data_type not in FLOAT_TYPES}
    return sum(tensor_values(index.initializers[name]) for name in (set(parameters) - scales) | quantized)


@dataclasses.dataclass(frozen=True)
class SourceModel:
    """What report.json says about the model the rewrite started from, taken when it is loaded: the rewrite
    then holds no copy of the source's weights while the passes and generate_artifacts run."""

    path: str
    sha256: str
    ir_version: int
    opset: int
    producer: str
    inputs: frozenset[str]

    @classmethod
    def of(cls, path: str, model: onnx.ModelProto) -> SourceModel:
        return cls(path, hashlib.sha256(model.SerializeToString()).hexdigest(), int(model.ir_version), default_opset(model),
                   f"{model.producer_name} {model.producer_version}".strip(), frozenset(v.name for v in model.graph.input))


def build_report(source: SourceModel, forward: onnx.ModelProto, recipe: Recipe, output_name: str,
            trainable: list[str], entries: list[dict[str, Any]], stage: Path,
            data_inputs: set[str] | None = None) -> dict[str, Any]:
    sizes = {tensor.name: tensor_values(tensor) for tensor in forward.graph.initializer}
    source_inputs = set(source.inputs) | (data_inputs or set())
    parameters = GraphIndex(forward).parameters()
    trainable_values = sum(sizes[name] for name in trainable)
    report = {
        "edgeplug_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "path": source.path,
            "sha256": source.sha256,
            "ir_version": source.ir_version,
            "opset": source.opset,
            "producer": source.producer,
        },
        "training": {
            "output": output_name,
            "output_shape": describe(next(v for v in forward.graph.output if v.name == output_name))["shape"],
            "loss": recipe.loss,
            "optimizer": recipe.optimizer,
            "lr": recipe.lr,
            "inputs": [describe(value) for value in forward.graph.input if value.name in source_inputs],
            "extra_inputs": _extra_inputs(forward, stage, source_inputs, set(sizes) | set(trainable)),
            "labels_input": LABELS_INPUT,
        },
        "parameters": {
            "trainable": trainable,
            "trainable_count": len(trainable),
            "frozen_count": len(parameters) - len(set(trainable) & set(parameters)),
            "trainable_values": trainable_values,
            "total_values": _weight_values(forward, parameters),
        },
        "passes": entries,
        "artifacts": artifact_sizes(stage),
    }
    return report


def artifact_sizes(folder: Path, prefix: str = "") -> dict[str, int]:
    names = (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, FORWARD_MODEL, CHECKPOINT, NOMINAL_CHECKPOINT,
             *ORT_MODELS.values(), *OPERATOR_CONFIGS.values(), GRADIENTS_MODEL, OPTIMIZER_STEP_MODEL, STATE_EVAL_MODEL,
             CARRIED_STATE_FILE)
    return {prefix + name: (folder / name).stat().st_size for name in names if (folder / name).is_file()}


def check_report(report: Mapping[str, Any]) -> None:
    problem = first_error(dict(report), load_schema("report"))
    if problem:
        raise EdgeplugError(f"internal error: report.json does not match its schema: {problem}")


def _extra_inputs(forward: onnx.ModelProto, stage: Path, source_inputs: set[str], parameters: set[str]) -> list[dict[str, Any]]:
    """Inputs that passes added and their runtime hooks feed: those of the forward model, then those
    that only the final training model takes (e.g. activation-shortcut's factors); not the data,
    labels, parameters, gradient buffers or onnxruntime's `lazy_reset_grad`. The profiler feeds them."""
    extra = [describe(value) for value in forward.graph.input if value.name not in source_inputs]
    training_path = stage / TRAINING_MODEL
    if not training_path.is_file():  # the top-level report of a staged folder: the stages list theirs
        return extra
    known = source_inputs | parameters | {value["name"] for value in extra} | {LABELS_INPUT, "lazy_reset_grad"}
    training = onnx.load(str(training_path), load_external_data=False)
    extra += [describe(value) for value in training.graph.input
              if value.name not in known and not value.name.endswith("_grad.accumulation.buffer")]
    return extra


def describe(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    return {
        "name": value.name,
        "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "unknown",
        "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim],
    }
