"""Which nodes get quantized, and how their weights map to [out, fan_in] matrices."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper

from edgeplug.plugin_api import GraphIndex, ModelError


@dataclasses.dataclass(frozen=True)
class QuantLayer:
    """A Conv, Gemm or MatMul whose weight is an initializer.

    `axis` is the output-channel axis of the weight in its own layout (the axis
    DequantizeLinear dequantizes along); `first` layers read a graph input, which
    stays in float, and the `last` layer's input is quantized at 8 bits.
    """

    node: str
    op_type: str
    weight: str
    input: str
    shape: tuple[int, ...]
    axis: int
    group: int
    first: bool
    last: bool

    @property
    def out_channels(self) -> int:
        return self.shape[self.axis]

    def to_matrix(self, weight: np.ndarray) -> np.ndarray:
        """Weight in its ONNX layout -> [out, fan_in]."""
        return weight.reshape(weight.shape[0], -1) if self.axis == 0 else weight.T

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """[out, fan_in] -> the weight's ONNX layout."""
        return matrix.reshape(self.shape) if self.axis == 0 else matrix.T

    def input_channel(self) -> np.ndarray:
        """For every weight in [out, fan_in] order, the index of the input channel it multiplies."""
        out = self.out_channels
        if self.op_type == "Conv":
            per_group_in, kernel = self.shape[1], int(np.prod(self.shape[2:]))
            group_of_out = np.arange(out) // (out // self.group)
            column = np.arange(per_group_in * kernel) // kernel
            return (group_of_out[:, None] * per_group_in + column[None, :]).astype(np.int64)
        fan_in = int(np.prod(self.shape)) // out
        return np.broadcast_to(np.arange(fan_in), (out, fan_in)).astype(np.int64)


def find_layers(model: onnx.ModelProto) -> list[QuantLayer]:
    """Quantizable layers in graph order; a ModelError when there are none."""
    layers = weight_layers(model)
    if not layers:
        raise ModelError("qcore: the model has no Conv, Gemm or MatMul with a float initializer weight to quantize")
    return layers


def weight_layers(model: onnx.ModelProto) -> list[QuantLayer]:
    """Every Conv, Gemm (transA=0) and MatMul (2-D weight) whose weight is a float initializer, in graph order."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    inputs = {i.name for i in graph.input} - set(initializers)
    found: list[tuple[onnx.NodeProto, str, tuple[int, ...], int, int]] = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        weight = initializers.get(node.input[1])
        if weight is None or weight.data_type != onnx.TensorProto.FLOAT:
            continue
        shape = tuple(int(d) for d in weight.dims)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            axis, group = 0, int(attrs.get("group", 1))
        elif node.op_type == "Gemm":
            if attrs.get("transA", 0):
                continue
            axis, group = (0 if attrs.get("transB", 0) else 1), 1
        else:
            if len(shape) != 2:
                continue
            axis, group = 1, 1
        found.append((node, node.input[1], shape, axis, group))
    layers = []
    for position, (node, weight, shape, axis, group) in enumerate(found):
        layers.append(QuantLayer(node.name, node.op_type, weight, node.input[0], shape, axis, group,
                                 first=node.input[0] in inputs, last=position == len(found) - 1))
    return layers


def batch_norms(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """BatchNormalization nodes whose mean and variance are initializers (their statistics get updated)."""
    names = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "BatchNormalization" and n.input[3] in names and n.input[4] in names]


def initializer_array(index: GraphIndex, name: str) -> np.ndarray:
    value = index.value(name)
    if value is None:
        raise ModelError(f"qcore: initializer '{name}' is missing from the model")
    return value
