"""Candidate layers of a sparse update and their sizes at a batch size.

A candidate is a Conv, Gemm or MatMul on the path to the trained output whose
weight is a trainable initializer used by that node alone. Convolutions with
`group == 1` or depthwise ones (`group == channels`) can update a subset of
channels. Linear layers (a MatMul of an activation of any rank >= 2 by a 2-D
weight, as in a transformer's `[batch, sequence, features]` projections, or a
plain Gemm) can update a subset of output features (weight columns) or input
features (weight rows); their features lie on the activation's last axis. A
MatMul's bias is the 1-D initializer a single `Add` adds to its output (how
exporters write `nn.Linear` on 3-D inputs). Other layers train whole or not at all.

Tensors whose shapes depend on a named dynamic axis besides the batch (a
sequence) are counted at the lengths in `dims`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper

from edgeplug.plugin_api import GraphIndex, forward_macs, forward_shapes

FLOAT_BYTES = 4


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One layer the pass may update: where it is, how big it is, and which channels it can slice."""

    position: int  # among candidates, in graph order
    node: str
    op_type: str
    kind: str  # "conv" (group 1), "depthwise", "linear" (MatMul/Gemm, 2-D weight), "whole" (grouped conv, other MatMul/Gemm)
    weight: str
    bias: str | None
    input: str
    output: str
    channels: int  # output channels: the axis Fisher potentials and layer potentials use
    slice_channels: int  # channels a partial update picks from (input channels of a conv, 0 for whole layers)
    weight_values: int
    bias_values: int
    macs: int  # forward MACs at the cost model's batch size
    input_bytes: int
    output_bytes: int
    weight_out_axis: int = 0  # the weight's axis of output channels (1 for a MatMul weight [in, out])
    bias_node: str | None = None  # the separate Add that adds a MatMul's bias (None: the layer's own input 2)

    @property
    def sliceable(self) -> bool:
        return self.kind in ("conv", "depthwise", "linear")

    @property
    def probes_input(self) -> bool:
        """Whether the layer can train a subset of its input channels ranked by their own Fisher potential."""
        return self.kind in ("conv", "linear")

    @property
    def features_last(self) -> bool:
        """Whether channels lie on the activation's last axis (linear layers) rather than axis 1."""
        return self.kind == "linear"

    def weight_axis(self, axis: str | None) -> int:
        """The weight's axis that `axis` ('input' or 'output' channels) slices."""
        if axis == "input" and self.kind in ("conv", "linear"):
            return 1 - self.weight_out_axis if self.kind == "linear" else 1
        return self.weight_out_axis


@dataclasses.dataclass
class ModelFacts:
    """What the cost model needs about the forward model at one batch size."""

    index: GraphIndex
    shapes: dict[str, tuple[int, ...]]
    itemsize: dict[str, int]
    dtypes: dict[str, np.dtype]
    constants: set[str]  # initializers and what is computed from them alone
    on_path: set[str]  # node names the output depends on
    output: str
    batch_size: int
    path: list[onnx.NodeProto] = dataclasses.field(default_factory=list)  # nodes on the output's path, in graph order
    first_use: dict[str, int] = dataclasses.field(default_factory=dict)  # tensor -> index in `path` of its first consumer
    fused_gelu: dict[str, str] = dataclasses.field(default_factory=dict)  # node of an erf-Gelu pattern -> the Gelu's input

    def bytes_of(self, name: str) -> int:
        shape = self.shapes.get(name)
        return 0 if shape is None else math.prod(shape) * self.itemsize.get(name, FLOAT_BYTES)


def model_facts(model: onnx.ModelProto, output: str, batch_size: int, dims: Mapping[str, int] | None = None) -> ModelFacts:
    index = GraphIndex(model)
    data_inputs = {v.name for v in model.graph.input if v.name not in index.initializers}
    shapes, dtypes = forward_shapes(_without_layer_weights(model, index), data_inputs, batch_size, dims)
    constants = set(index.initializers)
    for node in model.graph.node:
        if all(not name or name in constants for name in node.input):
            constants.update(name for name in node.output if name)
    on_path = index.ancestors([output])
    path = [node for node in model.graph.node if node.name in on_path]
    first_use: dict[str, int] = {}
    for position, node in enumerate(path):
        for name in node.input:
            first_use.setdefault(name, position)
    return ModelFacts(index, shapes, {k: int(v.itemsize) for k, v in dtypes.items()}, dict(dtypes), constants,
                      on_path, output, batch_size, path, first_use, _erf_gelus(index, constants))


def _erf_gelus(index: GraphIndex, constants: set[str]) -> dict[str, str]:
    """Nodes of exported erf-Gelus, ``x * (Erf(x / c) + 1)`` (times 0.5, before or after), mapped to x.

    onnxruntime-training fuses the pattern into one Gelu whose gradient reads only x, so a plan keeps x
    alone, not the pattern's intermediate tensors (BERT's intermediate layer: 2 tensors of [B, S, 4H])."""
    found: dict[str, str] = {}
    for erf in index.model.graph.node:
        if erf.op_type != "Erf":
            continue
        div = index.producer.get(erf.input[0])
        if div is None or div.op_type not in ("Div", "Mul") or div.input[1] not in constants:
            continue
        x = div.input[0]
        add = _only_reader(index, erf.output[0], "Add")
        mul = _only_reader(index, add.output[0], "Mul") if add is not None else None
        if add is None or mul is None or not any(name in constants for name in add.input) or x not in mul.input:
            continue
        for node in (div, erf, add, mul):
            found[node.name] = x
    return found


def _only_reader(index: GraphIndex, tensor: str, op_type: str) -> onnx.NodeProto | None:
    readers = index.consumers.get(tensor, [])
    return readers[0][0] if len(readers) == 1 and readers[0][0].op_type == op_type else None


def _without_layer_weights(model: onnx.ModelProto, index: GraphIndex) -> onnx.ModelProto:
    """`model` with the values of the layers' weights left out (dims and type kept): shape inference needs
    none of them, and its copies of a model hold every value (tens of MB on the device, in the selection)."""
    weights = {name for name, readers in index.consumers.items()
               if name in index.initializers and readers and all(node.op_type in ("Conv", "Gemm", "MatMul") and slot == 1
                                                                  for node, slot in readers)}
    if not weights:
        return model  # forward_shapes works on its own copy
    skeleton = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(skeleton, field, getattr(model, field))
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph = skeleton.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    for tensor in model.graph.initializer:
        if tensor.name in weights:
            graph.initializer.append(onnx.TensorProto(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type))
        else:
            graph.initializer.append(tensor)
    return skeleton


def find_candidates(facts: ModelFacts, trainable: frozenset[str]) -> list[Candidate]:
    index = facts.index
    found: list[Candidate] = []
    for node in index.model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.name not in facts.on_path or len(node.input) < 2:
            continue
        weight = node.input[1]
        if weight not in index.initializers or weight not in trainable or len(index.consumers[weight]) != 1:
            continue
        dims = tuple(int(d) for d in index.initializers[weight].dims)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in index.initializers else None
        if bias is not None and (bias not in trainable or len(index.consumers[bias]) != 1):
            bias = None
        out_shape = facts.shapes.get(node.output[0])
        macs = forward_macs(node, facts.shapes)
        if out_shape is None or macs is None:
            continue
        channels = out_shape[1] if len(out_shape) > 1 else out_shape[0]
        kind, slice_channels, out_axis, bias_node = "whole", 0, 0, None
        if node.op_type == "Conv":
            group = next((int(helper.get_attribute_value(a)) for a in node.attribute if a.name == "group"), 1)
            if group == 1:
                kind, slice_channels = "conv", dims[1]
            elif group == dims[0] and dims[1] == 1:
                kind, slice_channels = "depthwise", dims[0]
        else:
            linear_axis = _linear_out_axis(node, dims, out_shape)
            if linear_axis is not None:
                kind, slice_channels, channels, out_axis = "linear", dims[1 - linear_axis], out_shape[-1], linear_axis
                if node.op_type == "MatMul":
                    bias, bias_node = _matmul_bias(index, node, channels, trainable)
        found.append(Candidate(
            position=len(found), node=node.name, op_type=node.op_type, kind=kind, weight=weight, bias=bias,
            input=node.input[0], output=node.output[0], channels=int(channels), slice_channels=int(slice_channels),
            weight_values=math.prod(dims), bias_values=math.prod(index.initializers[bias].dims) if bias else 0,
            macs=int(macs), input_bytes=facts.bytes_of(node.input[0]), output_bytes=facts.bytes_of(node.output[0]),
            weight_out_axis=out_axis, bias_node=bias_node,
        ))
    return found


def _linear_out_axis(node: onnx.NodeProto, dims: tuple[int, ...], out_shape: tuple[int, ...]) -> int | None:
    """The weight axis of a linear layer's output features, or None when the layer cannot be sliced: a MatMul
    by a 2-D weight [in, out] on an activation of rank >= 2, or a Gemm y = x W(^T) + C (alpha = beta = 1, x not
    transposed, C absent or one value per output feature)."""
    if len(dims) != 2 or len(out_shape) < 2:
        return None
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul":
        return 1 if out_shape[-1] == dims[1] else None
    if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
        return None
    axis = 0 if attributes.get("transB", 0) else 1
    return axis if out_shape[-1] == dims[axis] else None


def _matmul_bias(index: GraphIndex, node: onnx.NodeProto, features: int, trainable: frozenset[str]) -> tuple[str | None, str | None]:
    """The trainable 1-D bias that one `Add` adds to this MatMul's output (read by nothing else), and that Add."""
    readers = index.consumers.get(node.output[0], [])
    if len(readers) != 1 or readers[0][0].op_type != "Add":
        return None, None
    add = readers[0][0]
    other = add.input[1 - readers[0][1]]
    tensor = index.initializers.get(other)
    if tensor is None or tuple(tensor.dims) != (features,) or other not in trainable or len(index.consumers[other]) != 1:
        return None, None
    return other, add.name


def weight_array(facts: ModelFacts, name: str) -> np.ndarray:
    return onnx.numpy_helper.to_array(facts.index.initializers[name])
