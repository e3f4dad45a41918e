"""Penultimate features of the support set: the head's input, computed by plain inference."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from edgeplug.plugin_api import Dataset, GraphIndex, ModelError, TensorSpec, inference_session, load_dataset

from .locate import Head


def support_set(model: onnx.ModelProto, calibration: Mapping[str, np.ndarray], classes: int | None) -> Dataset:
    """The labelled support set, checked against the model's inputs (labels under 'y' or 'labels')."""
    initializers = {t.name for t in model.graph.initializer}
    specs = [
        TensorSpec(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                   [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim])
        for v in model.graph.input if v.name not in initializers
    ]
    return load_dataset(calibration, specs, loss="cross-entropy", num_classes=classes)


def penultimate_features(model: onnx.ModelProto, head: Head, data: Dataset, batch: int) -> np.ndarray:
    """The head's input for every support sample, averaged over any positions (float64, [samples, in_features]).

    Averaging is what the ops allowed after the head do to the logits (global average
    pooling of a 1x1 Conv head, a mean over tokens), and the head is linear, so the
    logits equal the head applied to these features.
    """
    # no memory arena: what the session allocates goes back before the passes and the artifact generation
    session = inference_session(_feature_model(model, head.features), arena=False)
    fixed = {i.name: i.shape[0] for i in session.get_inputs() if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0}
    size = min(fixed.values()) if fixed else batch
    total = len(data)
    chunks = []
    for start in range(0, total, size):
        rows = np.arange(start, start + size)
        rows = rows[rows < total] if not fixed else rows % total  # a fixed batch axis: the last chunk repeats samples
        feed = data.batch(rows)
        (value,) = session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})
        chunks.append(_per_sample(np.asarray(value, dtype=np.float64), head)[: min(size, total - start)])
    features = np.concatenate(chunks)
    if features.shape != (total, head.in_features):
        raise ModelError(f"the head's input {head.features!r} gives features of shape {features.shape[1:]} per sample, "
                         f"expected ({head.in_features},)")
    if not np.all(np.isfinite(features)):
        raise ModelError(f"the penultimate features ({head.features!r}) of the support set hold NaN or infinity")
    return features


def _per_sample(value: np.ndarray, head: Head) -> np.ndarray:
    """[batch, ..., features, ...] -> [batch, features], averaging every other axis."""
    if head.feature_axis == 0:  # Gemm with transA: [features, batch]
        return value.T
    axis = head.feature_axis % value.ndim
    moved = np.moveaxis(value, axis, -1)
    return moved.reshape(moved.shape[0], -1, moved.shape[-1]).mean(axis=1)


def _feature_model(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """The part of `model` that computes `tensor`, with `tensor` as its only output."""
    index = GraphIndex(model)
    needed = index.ancestors([tensor])
    graph = model.graph
    nodes = [n for n in graph.node if n.name in needed]
    used = {name for n in nodes for name in n.input}
    elem_type = index.elem_type.get(tensor, onnx.TensorProto.FLOAT)
    features = onnx.helper.make_graph(
        nodes, f"{graph.name}-features",
        [v for v in graph.input if v.name in used or v.name == tensor],
        [onnx.helper.make_tensor_value_info(tensor, elem_type, None)],
        [t for t in graph.initializer if t.name in used],
        value_info=[v for v in graph.value_info if v.name in used],
    )
    result = onnx.helper.make_model(features, opset_imports=list(model.opset_import))
    result.ir_version = model.ir_version
    return result
