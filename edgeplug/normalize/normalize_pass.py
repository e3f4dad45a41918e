"""Bring any exporter's model into what onnxruntime-training 1.19.2 accepts."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from edgeplug import ForwardState, Pass, PassContext, PassReport
from edgeplug.errors import ModelError, RecipeError
from edgeplug.graph import GraphIndex, ensure_node_names
from edgeplug.modelio import MAX_IR_VERSION, MAX_OPSET, default_opset
from edgeplug.passes import Plan
from edgeplug.validation import load_schema

from .decompose import decompose
from .exporter_fixes import (
    cast_like_to_cast,
    drop_unused_batchnorm_outputs,
    explicit_auto_pads,
    explicit_transpose_perms,
    fold_initializer_shapes,
    layernorm_statistics_outputs,
    materialize_initializer_identities,
    relabel_unknown_opset,
    restore_exporter_dims,
)

MIN_OPSET = 13  # older models are converted up: decompositions use opset-13 op signatures
BATCH_DIM = "batch"


class NormalizePass(Pass):
    name = "normalize"
    summary = "Make an exported model trainable by onnxruntime-training: IR, opset, batch axis, names, shapes."
    options_schema = load_schema("passes/normalize")

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self._details: dict[str, Any] = {}

    def requires(self, plan: Plan) -> None:
        if plan.position != 0:
            raise RecipeError("normalize runs first (every other pass expects a normalized model); move it to the "
                              "top of 'passes' or leave it out to run it with its defaults")

    def rewrite_forward(self, state: ForwardState, context: PassContext) -> ForwardState:
        model = onnx.ModelProto()
        model.CopyFrom(state.model)
        details = self._details
        details["ir_version"] = [model.ir_version, min(model.ir_version, MAX_IR_VERSION)]
        details["initializers_removed_from_inputs"] = _drop_initializer_inputs(model)
        relabelled = relabel_unknown_opset(model)
        model = _convert_opset(model, self.options.get("opset"), details)
        if relabelled:
            details["opset"][0] = relabelled[0]
        model.ir_version = min(model.ir_version, MAX_IR_VERSION)
        details["nodes_renamed"] = ensure_node_names(model)
        copies = materialize_initializer_identities(model)
        details["identities_materialized"] = len(copies)
        details["batchnorm_outputs_dropped"] = drop_unused_batchnorm_outputs(model)
        details["layernorm_outputs_added"] = layernorm_statistics_outputs(model)
        details["cast_like_rewritten"] = cast_like_to_cast(model)
        details["initializer_shapes_folded"] = fold_initializer_shapes(model)
        details["auto_pads_made_explicit"] = explicit_auto_pads(model)
        details["decomposed"] = decompose(model) if self.options["decompose"] else {}
        details["batch_axes_made_dynamic"], details["reshapes_rewritten"] = (
            _make_batch_dynamic(model) if self.options["dynamic_batch"] else (0, 0)
        )
        if self.options["infer_shapes"]:
            hints = list(model.graph.value_info)
            del model.graph.value_info[:]
            try:
                model = onnx.shape_inference.infer_shapes(model, data_prop=True)
            except (onnx.shape_inference.InferenceError, RuntimeError) as error:
                raise ModelError(f"shape inference failed after normalisation: {error}") from None
            # the exporter's shapes are stale where the batch axis was just made dynamic
            details["exporter_shapes_kept"] = 0 if details["batch_axes_made_dynamic"] else restore_exporter_dims(model, hints)
        details["transpose_perms_written"] = explicit_transpose_perms(model) if self.options["infer_shapes"] else 0
        # an untied copy trains when the tensor it was merged into did; names the rewrite removed drop out
        trainable = set(state.trainable) | {copy for copy, source in copies.items() if source in state.trainable}
        return ForwardState(model, frozenset(trainable & set(GraphIndex(model).parameters())))

    def report(self) -> PassReport:
        d = self._details
        counts = {key: value for key, value in d.items() if isinstance(value, int) and value}
        changed = bool(counts or d["decomposed"]) or d["ir_version"][0] != d["ir_version"][1] or d["opset"][0] != d["opset"][1]
        parts = [f"IR {d['ir_version'][0]}->{d['ir_version'][1]}", f"opset {d['opset'][0]}->{d['opset'][1]}"]
        if d["decomposed"]:
            parts.append("decomposed " + ", ".join(f"{n} {k}" for k, n in sorted(d["decomposed"].items())))
        parts += [f"{key.replace('_', ' ')}: {value}" for key, value in counts.items() if key != "nodes_renamed"]
        return PassReport(changed=changed, summary="; ".join(parts), details=d)


def _convert_opset(model: onnx.ModelProto, requested: int | None, details: dict[str, Any]) -> onnx.ModelProto:
    current = default_opset(model)
    target = requested or min(max(current, MIN_OPSET), MAX_OPSET)
    details["opset"] = [current, target]
    if current == target:
        return model
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as error:  # the converter raises bare RuntimeErrors and others
        raise ModelError(
            f"cannot convert the model from opset {current} to {target} ({str(error).splitlines()[0]}); "
            f"re-export the model with opset {target} (torch.onnx.export(..., opset_version={target}))"
        ) from None
    converted.ir_version = min(converted.ir_version, MAX_IR_VERSION)
    return converted


def _drop_initializer_inputs(model: onnx.ModelProto) -> int:
    """Old exporters list initializers as graph inputs; the runtime would treat them as data."""
    initializers = {t.name for t in model.graph.initializer}
    kept = [value for value in model.graph.input if value.name not in initializers]
    removed = len(model.graph.input) - len(kept)
    if removed:
        del model.graph.input[:]
        model.graph.input.extend(kept)
    return removed


def _make_batch_dynamic(model: onnx.ModelProto) -> tuple[int, int]:
    fixed_batches: set[int] = set()
    changed_axes = 0
    for value in list(model.graph.input) + list(model.graph.output):
        shape = value.type.tensor_type.shape
        if value.type.HasField("tensor_type") and len(shape.dim) >= 1 and shape.dim[0].HasField("dim_value"):
            fixed_batches.add(shape.dim[0].dim_value)
            shape.dim[0].dim_param = BATCH_DIM
            changed_axes += 1
    if not fixed_batches:
        return 0, 0
    return changed_axes, _rewrite_batch_reshapes(model, fixed_batches)


def _rewrite_batch_reshapes(model: onnx.ModelProto, fixed_batches: set[int]) -> int:
    """Replace a baked-in leading batch size in Reshape shape constants with -1.

    -1 resolves to the batch size for batch-dependent tensors and to the original
    value otherwise, so this is safe whenever the shape has no other -1 or 0.
    """
    shape_inputs = {node.input[1] for node in model.graph.node if node.op_type == "Reshape" and len(node.input) > 1}
    tensors = [t for t in model.graph.initializer if t.name in shape_inputs]
    tensors += [
        attribute.t
        for node in model.graph.node
        if node.op_type == "Constant" and node.output[0] in shape_inputs
        for attribute in node.attribute
        if attribute.name == "value"
    ]
    rewritten = 0
    for tensor in tensors:
        shape = numpy_helper.to_array(tensor)
        if shape.ndim == 1 and shape.size >= 2 and int(shape[0]) in fixed_batches and -1 not in shape[1:] and 0 not in shape:
            new_shape = shape.astype(np.int64)
            new_shape[0] = -1
            tensor.CopyFrom(numpy_helper.from_array(new_shape, tensor.name))
            rewritten += 1
    return rewritten
