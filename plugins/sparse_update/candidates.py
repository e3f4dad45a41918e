"""Candidate layers of a sparse update and their sizes at a batch size.

A candidate is a Conv, Gemm or MatMul on the path to the trained output whose
weight is a trainable initializer used by that node alone. Convolutions with
`group == 1` or depthwise ones (`group == channels`) can update a subset of
channels; other layers train whole or not at all.
"""

from __future__ import annotations

import dataclasses
import math

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
    kind: str  # "conv" (group 1), "depthwise", "whole" (grouped conv, Gemm, MatMul)
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

    @property
    def sliceable(self) -> bool:
        return self.kind in ("conv", "depthwise")


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

    def bytes_of(self, name: str) -> int:
        shape = self.shapes.get(name)
        return 0 if shape is None else math.prod(shape) * self.itemsize.get(name, FLOAT_BYTES)


def model_facts(model: onnx.ModelProto, output: str, batch_size: int) -> ModelFacts:
    index = GraphIndex(model)
    data_inputs = {v.name for v in model.graph.input if v.name not in index.initializers}
    shapes, dtypes = forward_shapes(_without_layer_weights(model, index), data_inputs, batch_size)
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
                      on_path, output, batch_size, path, first_use)


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
        kind, slice_channels = "whole", 0
        if node.op_type == "Conv":
            group = next((int(helper.get_attribute_value(a)) for a in node.attribute if a.name == "group"), 1)
            if group == 1:
                kind, slice_channels = "conv", dims[1]
            elif group == dims[0] and dims[1] == 1:
                kind, slice_channels = "depthwise", dims[0]
        found.append(Candidate(
            position=len(found), node=node.name, op_type=node.op_type, kind=kind, weight=weight, bias=bias,
            input=node.input[0], output=node.output[0], channels=int(channels), slice_channels=int(slice_channels),
            weight_values=math.prod(dims), bias_values=math.prod(index.initializers[bias].dims) if bias else 0,
            macs=int(macs), input_bytes=facts.bytes_of(node.input[0]), output_bytes=facts.bytes_of(node.output[0]),
        ))
    return found


def weight_array(facts: ModelFacts, name: str) -> np.ndarray:
    return onnx.numpy_helper.to_array(facts.index.initializers[name])
