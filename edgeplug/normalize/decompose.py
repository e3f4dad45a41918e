"""Rewrite activations that onnxruntime-training cannot differentiate into ones it can.

Each rewrite is exact (same values as the original op) and uses only ops with a
gradient builder in onnxruntime-training 1.19.2.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeplug.onnx_edit import GraphEditor, replace_nodes


def _attribute(node: onnx.NodeProto, name: str, default: float) -> float:
    for attribute in node.attribute:
        if attribute.name == name:
            return float(helper.get_attribute_value(attribute))
    return default


def _scalar(editor: GraphEditor, base: str, value: float) -> str:
    return editor.constant(base, np.array(value, dtype=np.float32))


def _hard_sigmoid(editor: GraphEditor, node: onnx.NodeProto, x: str) -> str:
    return _hard_sigmoid_with(editor, node, x, _attribute(node, "alpha", 0.2), _attribute(node, "beta", 0.5))


def _hard_swish(editor: GraphEditor, node: onnx.NodeProto, x: str) -> str:
    gate = _hard_sigmoid_with(editor, node, x, 1.0 / 6.0, 0.5)
    return editor.node("Mul", [x, gate], f"{node.name}_hswish")


def _hard_sigmoid_with(editor: GraphEditor, node: onnx.NodeProto, x: str, alpha: float, beta: float) -> str:
    scaled = editor.node("Mul", [x, _scalar(editor, f"{node.name}_alpha", alpha)], f"{node.name}_ax")
    shifted = editor.node("Add", [scaled, _scalar(editor, f"{node.name}_beta", beta)], f"{node.name}_axb")
    return editor.node("Clip", [shifted, _scalar(editor, f"{node.name}_zero", 0.0), _scalar(editor, f"{node.name}_one", 1.0)], f"{node.name}_clip")


def _softplus(editor: GraphEditor, node: onnx.NodeProto, x: str) -> str:
    # log(1 + exp(x)) = relu(x) + log(1 + exp(-|x|)), stable for large |x|.
    positive = editor.node("Relu", [x], f"{node.name}_relu")
    negative_abs = editor.node("Neg", [editor.node("Abs", [x], f"{node.name}_abs")], f"{node.name}_nabs")
    one_plus = editor.node("Add", [editor.node("Exp", [negative_abs], f"{node.name}_exp"), _scalar(editor, f"{node.name}_one", 1.0)], f"{node.name}_1p")
    return editor.node("Add", [positive, editor.node("Log", [one_plus], f"{node.name}_log")], f"{node.name}_softplus")


def _softsign(editor: GraphEditor, node: onnx.NodeProto, x: str) -> str:
    denominator = editor.node("Add", [editor.node("Abs", [x], f"{node.name}_abs"), _scalar(editor, f"{node.name}_one", 1.0)], f"{node.name}_den")
    return editor.node("Div", [x, denominator], f"{node.name}_softsign")


def _exponential_unit(editor: GraphEditor, node: onnx.NodeProto, x: str, alpha: float, gamma: float) -> str:
    # gamma * (x if x > 0 else alpha * (exp(min(x, 0)) - 1)); min keeps exp finite on the unused branch.
    zero = _scalar(editor, f"{node.name}_zero", 0.0)
    negative_part = editor.node("Min", [x, zero], f"{node.name}_min")
    expm1 = editor.node("Sub", [editor.node("Exp", [negative_part], f"{node.name}_exp"), _scalar(editor, f"{node.name}_one", 1.0)], f"{node.name}_expm1")
    scaled = editor.node("Mul", [expm1, _scalar(editor, f"{node.name}_alpha", alpha)], f"{node.name}_neg")
    condition = editor.node("Greater", [x, zero], f"{node.name}_positive")
    chosen = editor.node("Where", [condition, x, scaled], f"{node.name}_where")
    if gamma == 1.0:
        return chosen
    return editor.node("Mul", [chosen, _scalar(editor, f"{node.name}_gamma", gamma)], f"{node.name}_selu")


def _elu(editor: GraphEditor, node: onnx.NodeProto, x: str) -> str:
    return _exponential_unit(editor, node, x, _attribute(node, "alpha", 1.0), 1.0)


def _selu(editor: GraphEditor, node: onnx.NodeProto, x: str) -> str:
    alpha = _attribute(node, "alpha", 1.67326319217681884765625)
    gamma = _attribute(node, "gamma", 1.05070102214813232421875)
    return _exponential_unit(editor, node, x, alpha, gamma)


def _prelu(editor: GraphEditor, node: onnx.NodeProto, x: str) -> str:
    # max(x, 0) + slope * min(x, 0)
    zero = _scalar(editor, f"{node.name}_zero", 0.0)
    positive = editor.node("Max", [x, zero], f"{node.name}_pos")
    negative = editor.node("Mul", [editor.node("Min", [x, zero], f"{node.name}_min"), node.input[1]], f"{node.name}_neg")
    return editor.node("Add", [positive, negative], f"{node.name}_prelu")


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor shape inference can type."""
    try:
        typed = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        typed = model
    values = (*typed.graph.input, *typed.graph.value_info, *typed.graph.output)
    types = {value.name: value.type.tensor_type.elem_type for value in values if value.type.tensor_type.elem_type}
    return types | {tensor.name: tensor.data_type for tensor in model.graph.initializer}


def _typed_like(nodes: list[onnx.NodeProto], elem_type: int) -> list[onnx.NodeProto]:
    """Cast the float32 scalars of Constant nodes to `elem_type` (float16, double, ...)."""
    if elem_type == TensorProto.FLOAT:
        return nodes
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    for node in nodes:
        for attribute in node.attribute:
            if node.op_type == "Constant" and attribute.name == "value" and attribute.t.data_type == TensorProto.FLOAT:
                attribute.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype(dtype), attribute.t.name))
    return nodes


REWRITES: dict[str, Callable[[GraphEditor, onnx.NodeProto, str], str]] = {
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish,
    "Softplus": _softplus,
    "Softsign": _softsign,
    "Elu": _elu,
    "Selu": _selu,
    "PRelu": _prelu,
}


def decompose(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite every op in REWRITES in place; return counts by op type.

    The scalars a rewrite adds take the element type of the op's input, so a
    float16 or double model stays consistently typed.
    """
    editor = GraphEditor(model)
    counts: dict[str, int] = {}
    replacements: dict[str, list[onnx.NodeProto]] = {}
    targets = [node for node in model.graph.node if node.op_type in REWRITES and node.domain in ("", "ai.onnx")]
    types = _element_types(model) if targets else {}
    for node in targets:
        REWRITES[node.op_type](editor, node, node.input[0])
        replacements[node.name] = _typed_like(editor.take_replacement(node), types.get(node.input[0], TensorProto.FLOAT))
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    replace_nodes(model, replacements)
    return counts
