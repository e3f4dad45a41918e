"""Frozen layer weights stored as 8-bit integer codes, dequantized in the forward graph.

A frozen weight ``W`` (an initializer no gradient is asked for) becomes three
initializers, ``int8 codes``, ``scale`` and ``zero_point`` per output channel, and one
``DequantizeLinear`` whose output keeps the name ``W``. Every consumer still reads
``W``, so the layers (and any pass that rewrote them before) stay as they are;
onnxruntime-training sees no new op between a trained parameter and the loss (the
DequantizeLinear hangs off frozen initializers only), and the input gradient of a
frozen layer is computed from the dequantized weight as before.

A frozen embedding table (a float 2-D initializer that Gather nodes read by row, e.g. a
transformer's word embeddings: half of MiniLM's weights) is stored the same way per row,
but dequantizing the whole table every step would rebuild it in float: instead each Gather
reads the int8 rows it needs, and only those are dequantized (their scale and zero point
gathered by the same indices), so the float table never exists.
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
    replaced: dict[str, list[onnx.NodeProto]] = {}
    if "Gather" in op_types:
        for weight, gathers in _embedding_tables(result, trainable, uses, graph_inputs, exclude, skipped).items():
            tensor = initializers[weight]
            table = numpy_helper.to_array(tensor).astype(np.float32)
            grid = weight_grid(table, bits)  # rows are the "output channels" of a table
            added = [
                numpy_helper.from_array(np.ascontiguousarray(quantize_weights(table, grid)), editor.fresh(f"{weight}_quantized")),
                numpy_helper.from_array(grid.scale, editor.fresh(f"{weight}_scale")),
                numpy_helper.from_array(grid.zero_point, editor.fresh(f"{weight}_zero_point")),
            ]
            graph.initializer.extend(added)
            for gather in gathers:
                replaced[gather.name] = _dequantizing_gather(editor, gather, *(t.name for t in added))
            quantized.append(FrozenWeight(weight, tuple(g.name for g in gathers), int(table.size),
                                          tensor_bytes(tensor), sum(tensor_bytes(t) for t in added)))
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
        nodes = [*dequantize_nodes, *(n for node in graph.node for n in replaced.get(node.name, [node]))]
        del graph.node[:]  # dequantize nodes read initializers only: first is topologically safe
        graph.node.extend(nodes)
    return FrozenResult(result, tuple(quantized), skipped)


def _embedding_tables(model: onnx.ModelProto, trainable: Collection[str], uses: dict[str, list[tuple[str, int]]],
                      graph_inputs: set[str], exclude: Sequence[str], skipped: dict[str, str]) -> dict[str, list[onnx.NodeProto]]:
    """Frozen float 2-D initializers read only as the table (input 0, axis 0) of Gather nodes."""
    initializers = {t.name: t for t in model.graph.initializer}
    by_name = {node.name: node for node in model.graph.node}
    tables: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or not node.input:
            continue
        weight = node.input[0]
        tensor = initializers.get(weight)
        if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) != 2 or weight in trainable:
            continue
        if weight in graph_inputs:
            skipped[weight] = "also a graph input (a caller may override it)"
        elif any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude for name in (weight, node.name)):
            skipped[weight] = "excluded"
        elif any(by_name[user].op_type != "Gather" or slot != 0 or _gather_axis(by_name[user]) != 0 for user, slot in uses.get(weight, [])):
            skipped[weight] = "also read by a node that is not a Gather of its rows"
        else:
            tables.setdefault(weight, []).append(node)
            continue
        tables.pop(weight, None)
    return tables


def _gather_axis(node: onnx.NodeProto) -> int:
    return next((int(a.i) for a in node.attribute if a.name == "axis"), 0)


def _dequantizing_gather(editor: GraphEditor, gather: onnx.NodeProto, codes: str, scale: str, zero_point: str) -> list[onnx.NodeProto]:
    """Gather the int8 rows, their scales and zero points by the same indices; (codes - zero point) * scale."""
    indices, base = gather.input[1], gather.name or gather.output[0]
    rows = editor.node("Gather", [codes, indices], f"{base}/rows_int8", axis=0)
    row_scale = editor.node("Gather", [scale, indices], f"{base}/rows_scale", axis=0)
    row_zero = editor.node("Gather", [zero_point, indices], f"{base}/rows_zero_point", axis=0)
    last = editor.constant(f"{base}/last_axis", np.array([-1], dtype=np.int64))
    shifted = editor.node("Sub", [editor.node("Cast", [rows], f"{base}/rows_float", to=onnx.TensorProto.FLOAT),
                                  editor.node("Unsqueeze", [editor.node("Cast", [row_zero], f"{base}/zero_float", to=onnx.TensorProto.FLOAT), last],
                                              f"{base}/zero_column")], f"{base}/rows_shifted")
    editor.node("Mul", [shifted, editor.node("Unsqueeze", [row_scale, last], f"{base}/scale_column")], f"{base}/rows_dequantized")
    editor.last_node().output[0] = gather.output[0]
    return editor.take_nodes()


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
