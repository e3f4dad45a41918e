"""Read-only facts the pass needs: the classifier, the batch norms, inferred tensor shapes."""

from __future__ import annotations

from typing import Any

import onnx
from onnx import helper

from edgeplug.plugin_api import GraphIndex

from .manifest import Classifier, Norm


def inferred_shapes(model: onnx.ModelProto) -> dict[str, list[Any]]:
    """Shape of every tensor ONNX shape inference can tell (ints, symbolic names, or None)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, list[Any]] = {}
    graph = inferred.graph
    for value in (*graph.value_info, *graph.input, *graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                  for d in value.type.tensor_type.shape.dim]
    return shapes


def classifier_of(index: GraphIndex, output: str) -> Classifier | None:
    """The last Gemm/MatMul with a 2-D initializer weight that the output depends on."""
    on_path = index.ancestors([output])
    for node in reversed(index.model.graph.node):
        if node.name not in on_path or node.op_type not in ("Gemm", "MatMul"):
            continue
        weight = index.initializers.get(node.input[1])
        if weight is None or len(weight.dims) != 2:
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0):
            continue
        bias = _bias(index, node)
        return Classifier(node.name, node.input[0], weight.name, bias, bool(attributes.get("transB", 0)))
    return None


def _bias(index: GraphIndex, node: onnx.NodeProto) -> str | None:
    if node.op_type == "Gemm":
        if len(node.input) > 2 and node.input[2] in index.initializers and len(index.initializers[node.input[2]].dims) == 1:
            return node.input[2]
        return None
    uses = index.consumers.get(node.output[0], [])
    if len(uses) == 1 and uses[0][0].op_type == "Add":
        other = uses[0][0].input[1 - uses[0][1]]
        if other in index.initializers and len(index.initializers[other].dims) == 1:
            return other
    return None


def norms_of(index: GraphIndex) -> list[Norm]:
    """BatchNormalization nodes whose scale, shift and statistics are initializers, in graph order."""
    norms = []
    for node in index.model.graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        if not all(name in index.initializers for name in node.input[1:5]):
            continue
        epsilon = next((float(helper.get_attribute_value(a)) for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale, bias, mean, var = node.input[1:5]
        norms.append(Norm(node.name, node.input[0], scale, bias, mean, var, epsilon))
    return norms
