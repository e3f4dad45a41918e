"""Frozen 1x1 convs between the earliest trained layer and the loss, rewritten to keep nothing for backward.

Backward through a frozen layer needs only what its input gradient reads. In
onnxruntime-training, ConvGrad takes the conv's input X even when it computes
only dX (= W^T dY), so every frozen conv on the gradient path keeps its input.
A frozen 1x1 conv (group 1, stride 1, no padding; the expand and project convs
of MobileNet/EfficientNet blocks) becomes ``Reshape -> MatMul(W, x) -> Reshape``:
the MatMul gradient for x reads only W, a constant. Values agree up to float
rounding. MCUNetV3's and TinyTrain's memory model assumes frozen layers keep no
activation at all.

Not rewritten: Clip/Relu (a boolean-mask `Where` would keep 1 byte per element
instead of 4, but onnxruntime's CPU `Where` took 10-19 ms where Clip took
0.13 ms on an [8, 1152, 7, 7] tensor) and depthwise convs (ConvGrad keeps X).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeplug.plugin_api import GraphEditor, GraphIndex, remove_unused, replace_nodes


@dataclasses.dataclass(frozen=True)
class LeanResult:
    model: onnx.ModelProto
    matmul_convs: tuple[str, ...]  # frozen 1x1 convs now MatMuls


def gradient_tensors(index: GraphIndex, trainable: frozenset[str] | set[str]) -> set[str]:
    """Float tensors that get a gradient: the trainable initializers and everything computed from them."""
    needs = set(trainable)
    for node in index.model.graph.node:
        if any(name in needs for name in node.input):
            needs.update(name for name in node.output if name and index.is_float(name))
    return needs


def is_pointwise_frozen_conv(node: onnx.NodeProto, index: GraphIndex, trainable: frozenset[str] | set[str]) -> bool:
    """A group-1, 1x1, stride-1, unpadded Conv whose weight (and bias) are frozen initializers."""
    if node.op_type != "Conv" or len(node.input) < 2:
        return False
    weight = index.initializers.get(node.input[1])
    if weight is None or node.input[1] in trainable or len(weight.dims) < 3 or any(d != 1 for d in weight.dims[2:]):
        return False
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and (bias not in index.initializers or bias in trainable):
        return False
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("group", 1) != 1 or attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        return False
    return all(s == 1 for s in attributes.get("strides", [1])) and all(p == 0 for p in attributes.get("pads", [0]))


def lean_frozen_path(model: onnx.ModelProto, trainable: frozenset[str] | set[str],
                     shapes: Mapping[str, tuple[int, ...]], *, in_place: bool = False) -> LeanResult:
    """Rewrite the frozen 1x1 convs on the gradient path of `model` as MatMuls (on a copy, or on
    `model` itself with `in_place`: a copy of the weights less on the device).

    `shapes` (at any batch size) gives the spatial sizes a MatMul form needs (the
    channel slices `split` gathers are derived from them); a conv whose input shape
    is unknown stays a conv.
    """
    result = model
    if not in_place:
        result = onnx.ModelProto()
        result.CopyFrom(model)
    shapes = _with_gathered(result, shapes)
    index = GraphIndex(result)
    needs = gradient_tensors(index, trainable)
    editor = GraphEditor(result)
    replacements: dict[str, list[onnx.NodeProto]] = {}
    matmuls = []
    for node in result.graph.node:
        if not node.input or node.input[0] not in needs:
            continue
        if is_pointwise_frozen_conv(node, index, trainable) and _static_input(shapes.get(node.input[0])):
            _conv_as_matmul(editor, result, index, node, shapes[node.input[0]])
            replacements[node.name] = editor.take_replacement(node)
            matmuls.append(node.name)
    replace_nodes(result, replacements)
    remove_unused(result)
    return LeanResult(result, tuple(matmuls))


def _with_gathered(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """`shapes` plus the outputs of Gather nodes that take constant channel indices (axis 1) of a known tensor."""
    known = dict(shapes)
    constants = {node.output[0]: numpy_helper.to_array(node.attribute[0].t) for node in model.graph.node
                 if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"}
    for node in model.graph.node:
        if node.op_type != "Gather" or node.input[0] not in known or node.input[1] not in constants:
            continue
        axis = next((int(helper.get_attribute_value(a)) for a in node.attribute if a.name == "axis"), 0)
        indices, shape = constants[node.input[1]], list(known[node.input[0]])
        if axis == 1 and indices.ndim == 1 and len(shape) > 1:
            shape[1] = int(indices.shape[0])
            known[node.output[0]] = tuple(shape)
    return known


def _static_input(shape: tuple[int, ...] | None) -> bool:
    return shape is not None and len(shape) >= 3 and all(isinstance(d, int) and d > 0 for d in shape[1:])


def _conv_as_matmul(editor: GraphEditor, model: onnx.ModelProto, index: GraphIndex, node: onnx.NodeProto,
                    shape: tuple[int, ...]) -> None:
    out_channels, in_channels = (int(d) for d in index.initializers[node.input[1]].dims[:2])
    matrix = _reshaped(editor, model, index, node.input[1], (out_channels, in_channels), "matmul")
    flat = editor.node("Reshape", [node.input[0], editor.constant(f"{node.name}.flat_shape", np.array([0, in_channels, -1], np.int64))],
                       f"{node.name}.flat")
    product = editor.node("MatMul", [matrix, flat], f"{node.name}.matmul")
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None:
        column = _reshaped(editor, model, index, bias, (out_channels, 1), "column")
        product = editor.node("Add", [product, column], f"{node.name}.biased")
    target = np.array([0, out_channels, *shape[2:]], np.int64)
    editor.node("Reshape", [product, editor.constant(f"{node.name}.out_shape", target)], f"{node.name}.unflat")


def _reshaped(editor: GraphEditor, model: onnx.ModelProto, index: GraphIndex, name: str, shape: tuple[int, ...],
              suffix: str) -> str:
    """The initializer `name` seen as `shape` (same values, same order): its own dims changed when only one node
    reads it (no second copy of the weight), else a reshaped copy under a fresh name."""
    tensor = index.initializers[name]
    shared = len(index.consumers.get(name, ())) > 1 or any(value.name == name for value in (*model.graph.input, *model.graph.output))
    if not shared:
        del tensor.dims[:]
        tensor.dims.extend(shape)
        return name
    fresh = editor.fresh(f"{name}.{suffix}")
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(tensor).reshape(shape)), fresh))
    return fresh
