"""Frozen layer weights stored as 8-bit integer codes, dequantized in the forward graph.

A frozen weight ``W`` (an initializer no gradient is asked for) becomes three
initializers, ``int8 codes``, ``scale`` and ``zero_point`` per output channel, and one
``DequantizeLinear`` whose output keeps the name ``W``. Every consumer still reads
``W``, so the layers (and any pass that rewrote them before) stay as they are;
onnxruntime-training sees no new op between a trained parameter and the loss (the
DequantizeLinear hangs off frozen initializers only), and the input gradient of a
frozen layer is computed from the dequantized weight as before.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Collection, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeplug.plugin_api import GraphEditor, tensor_bytes

from .layers import QuantLayer, weight_layers
from .quantize import quantize_weights, weight_grid


@dataclasses.dataclass(frozen=True)
class FrozenWeight:
    """One weight that was quantized: its name, layer(s), size before and after (bytes)."""

    weight: str
    nodes: tuple[str, ...]
    values: int
    float_bytes: int
    quantized_bytes: int


@dataclasses.dataclass(frozen=True)
class FrozenResult:
    model: onnx.ModelProto
    quantized: tuple[FrozenWeight, ...]
    skipped: dict[str, str]  # frozen layer weight -> why it stays float


def quantize_frozen(model: onnx.ModelProto, trainable: Collection[str], *, bits: int, op_types: Sequence[str],
                    exclude: Sequence[str]) -> FrozenResult:
    """Return a copy of `model` whose frozen layer weights are int8 codes + DequantizeLinear."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    by_weight: dict[str, list[QuantLayer]] = {}
    for layer in weight_layers(result):
        if layer.weight not in trainable:
            by_weight.setdefault(layer.weight, []).append(layer)
    uses: dict[str, list[tuple[str, int]]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            uses.setdefault(name, []).append((node.name, slot))
    graph_inputs = {value.name for value in graph.input}
    editor = GraphEditor(result)
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    quantized: list[FrozenWeight] = []
    skipped: dict[str, str] = {}
    dequantize_nodes: list[onnx.NodeProto] = []
    for weight, layers in by_weight.items():
        reason = _reason_to_skip(weight, layers, uses.get(weight, []), graph_inputs, op_types, exclude)
        if reason is not None:
            skipped[weight] = reason
            continue
        layer = layers[0]
        tensor = initializers[weight]
        matrix = layer.to_matrix(numpy_helper.to_array(tensor).astype(np.float32))
        grid = weight_grid(matrix, bits)
        codes = layer.from_matrix(quantize_weights(matrix, grid))
        added = [
            numpy_helper.from_array(np.ascontiguousarray(codes), editor.fresh(f"{weight}_quantized")),
            numpy_helper.from_array(grid.scale, editor.fresh(f"{weight}_scale")),
            numpy_helper.from_array(grid.zero_point, editor.fresh(f"{weight}_zero_point")),
        ]
        graph.initializer.extend(added)
        dequantize_nodes.append(helper.make_node("DequantizeLinear", [t.name for t in added], [weight],
                                                 name=editor.fresh(f"{weight}_dequantize"), axis=layer.axis))
        quantized.append(FrozenWeight(weight, tuple(lay.node for lay in layers), int(codes.size),
                                      tensor_bytes(tensor), sum(tensor_bytes(t) for t in added)))
    if quantized:
        names = {q.weight for q in quantized}
        kept = [t for t in graph.initializer if t.name not in names]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        nodes = [*dequantize_nodes, *graph.node]  # inputs are initializers: first is topologically safe
        del graph.node[:]
        graph.node.extend(nodes)
    return FrozenResult(result, tuple(quantized), skipped)


def _reason_to_skip(weight: str, layers: list[QuantLayer], uses: list[tuple[str, int]], graph_inputs: set[str],
                    op_types: Sequence[str], exclude: Sequence[str]) -> str | None:
    """Why a frozen layer weight stays float, or None when it can be quantized."""
    if weight in graph_inputs:
        return "also a graph input (a caller may override it)"
    if any(layer.op_type not in op_types for layer in layers):
        return f"a {layers[0].op_type} weight (op_types: {', '.join(op_types)})"
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude for name in (weight, *(lay.node for lay in layers))):
        return "excluded"
    layer_nodes = {layer.node for layer in layers}
    if any(node not in layer_nodes or slot != 1 for node, slot in uses):
        return "also read by a node that is not a layer's weight slot"
    if len({(layer.axis, layer.shape) for layer in layers}) > 1:
        return "shared by layers that read it along different axes"
    return None
