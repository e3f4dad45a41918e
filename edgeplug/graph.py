"""Small read-only helpers over an ONNX graph: producers, consumers, parameters, layers, dtypes."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

FLOAT_TYPES = frozenset(
    {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
)

# Input slots that never carry a gradient (shapes, indices, running statistics, ...).
# An initializer used only in such slots is a constant, not a parameter.
NON_DIFFERENTIABLE_INPUTS: dict[str, frozenset[int]] = {
    "BatchNormalization": frozenset({3, 4}),
    "Reshape": frozenset({1}),
    "Pad": frozenset({1, 2, 3}),
    "Resize": frozenset({1, 2, 3}),
    "Upsample": frozenset({1}),
    "Clip": frozenset({1, 2}),
    "Slice": frozenset({1, 2, 3, 4}),
    "Gather": frozenset({1}),
    "GatherElements": frozenset({1}),
    "GatherND": frozenset({1}),
    "Expand": frozenset({1}),
    "Tile": frozenset({1}),
    "Squeeze": frozenset({1}),
    "Unsqueeze": frozenset({1}),
    "Dropout": frozenset({1, 2}),
    "Pow": frozenset({1}),
    "Split": frozenset({1}),
    "TopK": frozenset({1}),
    "ReduceSum": frozenset({1}),
    "ReduceMean": frozenset({1}),
    "ReduceMax": frozenset({1}),
    "ReduceMin": frozenset({1}),
    "ReduceL2": frozenset({1}),
    "ReduceLogSumExp": frozenset({1}),
    "Where": frozenset({0}),
    "ConstantOfShape": frozenset({0}),
    "Range": frozenset({0, 1, 2}),
}

# Ops whose weights make a "layer" (for "last N layers" and "classifier only").
LAYER_OPS = frozenset(
    {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "LayerNormalization",
     "InstanceNormalization", "GroupNormalization", "Gather", "Add", "Mul", "PRelu"}
)
WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclasses.dataclass(frozen=True)
class Layer:
    """A node that owns parameters, in topological order."""

    index: int
    node_name: str
    op_type: str
    parameters: tuple[str, ...]


IMPLICIT = -1
"""The input slot `GraphIndex.consumers` gives a node whose If/Loop/Scan body reads the tensor."""


class GraphIndex:
    """Producer/consumer maps and tensor element types of one graph.

    A node whose subgraph (If branches, Loop and Scan bodies) reads a tensor of this
    graph counts as its consumer, at slot IMPLICIT; such reads never make a
    parameter (onnxruntime-training has no gradient for those ops).
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        self.implicit_inputs: dict[str, tuple[str, ...]] = {}
        for node in graph.node:
            for output in node.output:
                if output:
                    self.producer[output] = node
            for slot, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, slot))
            captured = outer_names(node)
            if captured:
                self.implicit_inputs[node.name] = captured
                for name in captured:
                    self.consumers[name].append((node, IMPLICIT))
        self.elem_type: dict[str, int] = {}
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            if value.type.HasField("tensor_type"):
                self.elem_type[value.name] = value.type.tensor_type.elem_type
        for name, tensor in self.initializers.items():
            self.elem_type[name] = tensor.data_type

    def value(self, name: str) -> np.ndarray | None:
        """The value of an initializer (None if `name` is not one): a dictionary lookup, not a scan."""
        tensor = self.initializers.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def is_float(self, name: str) -> bool:
        """Whether a tensor is floating point (unknown types count as float, to stay safe)."""
        return self.elem_type.get(name, TensorProto.FLOAT) in FLOAT_TYPES

    def parameters(self) -> list[str]:
        """Float initializers that feed at least one differentiable input slot, in graph order."""
        names = []
        for name, tensor in self.initializers.items():
            if tensor.data_type not in FLOAT_TYPES:
                continue
            uses = self.consumers.get(name, [])
            if any(slot != IMPLICIT and slot not in NON_DIFFERENTIABLE_INPUTS.get(node.op_type, ()) for node, slot in uses):
                names.append(name)
        return names

    def layers(self) -> list[Layer]:
        """Nodes that own parameters, in topological (graph) order."""
        parameters = set(self.parameters())
        layers: list[Layer] = []
        for node in self.model.graph.node:
            owned = tuple(name for name in node.input if name in parameters)
            if owned and node.op_type in LAYER_OPS:
                layers.append(Layer(len(layers), node.name, node.op_type, owned))
        return layers

    def descendants(self, sources: Iterable[str], *, float_only: bool = True) -> set[str]:
        """Names of nodes reached from tensors `sources` (through float tensors only by default)."""
        reached: set[str] = set()
        frontier = list(sources)
        seen = set(frontier)
        while frontier:
            tensor = frontier.pop()
            for node, _slot in self.consumers.get(tensor, []):
                if node.name in reached:
                    continue
                reached.add(node.name)
                for output in node.output:
                    if output and output not in seen and (not float_only or self.is_float(output)):
                        seen.add(output)
                        frontier.append(output)
        return reached

    def ancestors(self, targets: Iterable[str]) -> set[str]:
        """Names of nodes that `targets` depend on."""
        reached: set[str] = set()
        frontier = list(targets)
        while frontier:
            tensor = frontier.pop()
            node = self.producer.get(tensor)
            if node is None or node.name in reached:
                continue
            reached.add(node.name)
            frontier.extend(name for name in (*node.input, *self.implicit_inputs.get(node.name, ())) if name)
        return reached


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held in a node's attributes (If branches, Loop and Scan bodies)."""
    found: list[onnx.GraphProto] = []
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            found.append(attribute.g)
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            found.extend(attribute.graphs)
    return found


def outer_names(node: onnx.NodeProto) -> tuple[str, ...]:
    """Tensors of the enclosing graph(s) that a node's subgraphs read, in order of first use."""
    read: dict[str, None] = {}
    for graph in subgraphs(node):
        local = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer}
        for inner in graph.node:
            for name in (*inner.input, *outer_names(inner)):
                if name and name not in local:
                    read[name] = None
            local.update(inner.output)
    return tuple(read)


def tensor_values(tensor: onnx.TensorProto) -> int:
    """Number of values an initializer holds."""
    return math.prod(int(d) for d in tensor.dims)


def tensor_bytes(tensor: onnx.TensorProto, unknown_itemsize: int = 4) -> int:
    """Bytes of an initializer's values; `unknown_itemsize` for a data type numpy cannot name."""
    try:
        itemsize = int(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)
    except (KeyError, TypeError, ValueError):
        itemsize = unknown_itemsize
    return tensor_values(tensor) * itemsize


def tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor whose shape the graph records (value_info, inputs, outputs, initializers)."""
    ranks = {
        value.name: len(value.type.tensor_type.shape.dim)
        for value in (*model.graph.value_info, *model.graph.input, *model.graph.output)
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape")
    }
    ranks |= {tensor.name: len(tensor.dims) for tensor in model.graph.initializer}
    return ranks


def ensure_node_names(model: onnx.ModelProto) -> int:
    """Give every unnamed or duplicate-named node a unique name; return how many changed."""
    used: set[str] = set()
    renamed = 0
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in used:
            base = node.name or f"{node.op_type}_{index}"
            candidate, suffix = base, 1
            while candidate in used:
                candidate, suffix = f"{base}_{suffix}", suffix + 1
            node.name = candidate
            renamed += 1
        used.add(node.name)
    return renamed
