"""The `personalize` pass: turn named parameters into slots a cloud can fill without a training graph.

It writes the device model (`passes/personalize/device.onnx`): the forward model
with every slot listed as a graph input whose default is its original value, and
the feature taps added as outputs, plus the manifest (`slots.json`) naming them
with the model's fingerprint. The trainable set becomes the parameter slots, so
the training artifacts of the same rewrite fine-tune exactly what the cloud
generates (the fine-tuning baseline, FTA).
"""

from __future__ import annotations

import fnmatch
import json
from typing import Any

import numpy as np
import onnx
from onnx import helper

from edgeplug import ForwardState, Pass, PassContext, PassReport
from edgeplug.plugin_api import GraphIndex, ModelError, RecipeError, atomic_file, clamp_ir_version, load_schema, tensor_values

from .adapters import insert_adapters
from .manifest import (
    DEVICE_MODEL,
    MANIFEST,
    Classifier,
    Feature,
    Manifest,
    Norm,
    Slot,
    fingerprint,
)
from .model_facts import classifier_of, inferred_shapes, norms_of


class PersonalizePass(Pass):
    name = "personalize"
    summary = "Parameter slots a cloud fills from device anchors (no device backprop); stats/prototype baselines."
    options_schema = load_schema("passes/personalize")

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self._details: dict[str, Any] = {}

    def rewrite_forward(self, state: ForwardState, context: PassContext) -> ForwardState:
        model = state.model
        initializers = {t.name for t in model.graph.initializer}
        names = [i.name for i in model.graph.input if i.name not in initializers]
        if len(names) != 1:
            # not cheap to lift: the manifest, anchors and generator describe one input, the anchor features and adapters are
            # per channel on axis 1 (the token axis of an encoder's [batch, sequence, features]), and an encoder has no
            # batch-norm statistics for the device to re-estimate: only the classifier slots would be left
            raise ModelError(f"personalize: the device model must have one data input; this one has {names}. Models with "
                             "several inputs (a text encoder's token ids + attention mask) are not supported: anchors and "
                             "adapters work per channel on axis 1 and the slots need batch norms; use qcore, lora or "
                             "trainable on encoders")
        adapters: list[str] = []
        if self.options.get("adapters"):
            model, adapters = insert_adapters(model, self.options["adapters"], inferred_shapes(model))
        index = GraphIndex(model)
        shapes = inferred_shapes(model)
        classifier = classifier_of(index, context.output_name)
        norms = norms_of(index)
        slots = _slots(self.options, index, classifier, norms, adapters)
        features = _features(self.options.get("features"), index, shapes, classifier, norms, self.options.get("adapters", []))
        taps = [f.tensor for f in features] + [n.input for n in norms] + ([classifier.input] if classifier else [])
        device = _device_model(model, slots, list(dict.fromkeys(taps)), shapes)
        data = device.SerializeToString()
        graph_input = next(i for i in model.graph.input if i.name not in index.initializers)
        manifest = Manifest(
            fingerprint=fingerprint(data), input=graph_input.name,
            input_shape=tuple(_dims(graph_input.type)), input_dtype=_dtype(graph_input.type.tensor_type.elem_type),
            output=context.output_name, slots=tuple(slots), features=tuple(features), norms=tuple(norms),
            classifier=classifier,
        )
        context.work_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(context.work_dir / DEVICE_MODEL) as staging:
            staging.write_bytes(data)
        with atomic_file(context.work_dir / MANIFEST) as staging:
            staging.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
        parameters = [s for s in slots if s.role == "parameter"]
        total = sum(tensor_values(index.initializers[name]) for name in index.parameters())
        self._details = {
            "fingerprint": manifest.fingerprint,
            "slots": [{"name": s.name, "shape": list(s.shape), "role": s.role, "group": s.group} for s in slots],
            "parameter_values": sum(s.size for s in parameters),
            "statistics_values": sum(s.size for s in slots if s.role == "statistics"),
            "total_parameter_values": total,
            "features": [f.tensor for f in features],
            "feature_width": manifest.feature_width,
            "device_model_bytes": len(data),
            "adapters": list(self.options.get("adapters", [])),
        }
        return ForwardState(model, frozenset(s.name for s in parameters))

    def report(self) -> PassReport:
        d = self._details
        parameters = sum(1 for s in d["slots"] if s["role"] == "parameter")
        return PassReport(
            changed=True,
            summary=f"{parameters} parameter slots ({d['parameter_values']:,} of {d['total_parameter_values']:,} values), "
            f"{len(d['slots']) - parameters} statistics slots, "
            + (f"{len(d['adapters'])} adapters inserted, " if d["adapters"] else "")
            + f"{d['feature_width']} anchor features from "
            f"{len(d['features'])} taps; device model {d['fingerprint'][:12]}",
            details=d,
        )


def _slots(options: dict[str, Any], index: GraphIndex, classifier: Classifier | None, norms: list[Norm],
           adapters: list[str]) -> list[Slot]:
    parameters = index.parameters()
    chosen: dict[str, str] = dict.fromkeys(adapters, "adapter")
    for entry in options["slots"]:
        if entry == "classifier":
            if classifier is None:
                raise RecipeError("personalize: slots names 'classifier' but the model has no Gemm/MatMul with an "
                                  "initializer weight before its output; name the parameters with glob patterns")
            for name in (classifier.weight, classifier.bias):
                if name is not None:
                    chosen.setdefault(name, "classifier")
        elif entry == "normalization":
            if not norms:
                raise RecipeError("personalize: slots names 'normalization' but the model has no BatchNormalization "
                                  "with initializer scale, shift and statistics (was it folded at export?)")
            for norm in norms:
                chosen.setdefault(norm.scale, "normalization")
                chosen.setdefault(norm.bias, "normalization")
        else:
            matched = [name for name in parameters if fnmatch.fnmatchcase(name, entry)]
            if not matched:
                raise RecipeError(f"personalize: slot pattern '{entry}' matches no parameter "
                                  f"(parameters: {', '.join(parameters[:12])}{', ...' if len(parameters) > 12 else ''})")
            for name in matched:
                chosen.setdefault(name, "pattern")
    not_trainable = [name for name in chosen if name not in parameters]
    if not_trainable:
        raise RecipeError(f"personalize: slot '{not_trainable[0]}' is not a parameter (shared, or not a float initializer)")
    slots = [_slot(index, name, "parameter", group) for name, group in chosen.items()]
    if options["statistics"]:
        for norm in norms:
            slots += [_slot(index, norm.mean, "statistics", "normalization"), _slot(index, norm.var, "statistics", "normalization")]
    return slots


def _slot(index: GraphIndex, name: str, role: str, group: str) -> Slot:
    tensor = index.initializers[name]
    return Slot(name, tuple(int(d) for d in tensor.dims), _dtype(tensor.data_type), role, group)


def _features(requested: list[str] | None, index: GraphIndex, shapes: dict[str, list[Any]],
              classifier: Classifier | None, norms: list[Norm], adapted: list[str]) -> list[Feature]:
    tensors = requested or [n.input for n in norms] + list(adapted) + ([classifier.input] if classifier else [])
    if not tensors:
        raise RecipeError("personalize: the model has no BatchNormalization or classifier to take anchor features from; "
                          "name feature tensors with the 'features' option")
    features = []
    for tensor in dict.fromkeys(tensors):
        if tensor not in index.producer and tensor not in {i.name for i in index.model.graph.input}:
            raise RecipeError(f"personalize: feature tensor '{tensor}' is not produced by any node of the model")
        shape = shapes.get(tensor)
        if shape is None or len(shape) < 2 or not isinstance(shape[1], int):
            raise ModelError(f"personalize: the shape of feature tensor '{tensor}' is unknown ({shape}); "
                             "run 'normalize' with shape inference first, or choose another tensor")
        features.append(Feature(tensor, int(shape[1]), len(shape)))
    return features


def _device_model(model: onnx.ModelProto, slots: list[Slot], taps: list[str],
                  shapes: dict[str, list[Any]]) -> onnx.ModelProto:
    """The inference model with slots as overridable inputs (default: the original values) and the tensors
    the device reads (features, batch-norm inputs, classifier input) as extra outputs."""
    device = onnx.ModelProto()
    device.CopyFrom(model)
    for slot in slots:
        device.graph.input.append(helper.make_tensor_value_info(slot.name, _elem(slot.dtype), list(slot.shape)))
    outputs = {o.name for o in device.graph.output}
    for tap in taps:
        if tap not in outputs:
            shape = shapes.get(tap)
            dims = [d if isinstance(d, int) else None for d in shape] if shape else None
            if dims:
                dims[0] = "N"  # type: ignore[call-overload]
            device.graph.output.append(helper.make_tensor_value_info(tap, onnx.TensorProto.FLOAT, dims))
    clamp_ir_version(device)
    onnx.checker.check_model(device)
    return device


def _dims(type_proto: onnx.TypeProto) -> list[int | str | None]:
    dims: list[int | str | None] = []
    for d in type_proto.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return dims


def _dtype(elem_type: int) -> str:
    return str(helper.tensor_dtype_to_np_dtype(elem_type))


def _elem(dtype: str) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
