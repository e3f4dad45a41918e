"""The forward rewrite that makes a sparse update cheap in onnxruntime-training.

onnxruntime-training computes the gradient of a whole initializer or none, so a
channel subset must be an initializer of its own. An updated conv becomes two
convs on gathered channels, one with the trainable slice of the weight and one
with the frozen rest:

- group-1 conv, input channels S (MCUNetV3): ``Conv(Gather(x, S), W[:, S]) +
  Conv(Gather(x, R), W[:, R], b)``. The weight gradient reads only ``x[:, S]``.
- depthwise conv, channels S: ``Gather(Concat(DWConv(x[:, S], W[S]),
  DWConv(x[:, R], W[R])), inverse permutation) + b``.
- group-1 conv, output channels S (TinyTrain's axis): the same on the full x,
  so the weight gradient still reads all of x.
- linear layer (MatMul by W[in, out], on [..., in] activations such as a
  transformer's [batch, sequence, features]; or Gemm), output features S:
  ``Gather(Concat(x @ W[:, S], x @ W[:, R]), inverse permutation)`` on the last
  axis; input features S: ``Gather(x, S) @ W[S] + Gather(x, R) @ W[R]``, whose
  weight gradient reads only ``x[..., S]`` (a MatMul's input gradient reads only
  the weight, so nothing else of x is kept).

A trained bias of a layer whose weight does not train whole moves to an ``Add``
after the layer, whose gradient reads no activation (ConvGrad would read x).
Frozen slices are copies of the original values, so they stay bit-identical.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from edgeplug.plugin_api import GraphEditor, remove_unused, replace_nodes

from .candidates import Candidate
from .costs import Update


def rewrite(model: onnx.ModelProto, candidates: list[Candidate], updates: Mapping[int, Update],
            biases: set[int], ranks: Mapping[str, int]) -> tuple[onnx.ModelProto, frozenset[str]]:
    """Return the split model and the names of its trainable parameters."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    initializers = {t.name: t for t in result.graph.initializer}
    nodes = {n.name: n for n in result.graph.node}
    editor = GraphEditor(result)
    trainable: set[str] = set()
    replacements: dict[str, list[onnx.NodeProto]] = {}
    for candidate in candidates:
        update = updates.get(candidate.position)
        bias_trains = candidate.position in biases and candidate.bias is not None
        node = nodes[candidate.node]
        if update is not None and update.channels is None:
            trainable.add(candidate.weight)
            if bias_trains:
                trainable.add(candidate.bias)  # type: ignore[arg-type]
            continue
        if update is None and not bias_trains:
            continue
        if update is None and candidate.op_type != "Conv":
            trainable.add(candidate.bias)  # type: ignore[arg-type]  # Gemm/MatMul bias gradients read no activation
            continue
        weight = numpy_helper.to_array(initializers[candidate.weight])
        rank = ranks.get(candidate.output, 4)
        bias_name = candidate.bias
        # The candidate names its bias only when that bias may train; a frozen (or shared,
        # or computed) bias of the node must survive the split all the same.
        node_bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        candidate = dataclasses.replace(candidate, bias=node_bias)
        if update is None:
            new = _bias_after(editor, node, [node.input[0], candidate.weight], candidate, rank)
        elif candidate.kind == "depthwise":
            new = _split_depthwise(editor, result, node, candidate, weight, update, rank)
        elif update.axis == "input":
            new = _split_input(editor, result, node, candidate, weight, update, bias_trains, rank, trainable)
        else:
            new = _split_output(editor, result, node, candidate, weight, update, rank)
        if update is not None:
            trainable.add(new.pop())  # the trainable slice's name comes last
        if bias_trains:
            trainable.add(bias_name)  # type: ignore[arg-type]  # a MatMul's bias lives in its own Add, untouched
        replacements[candidate.node] = editor.take_replacement(node)
    replace_nodes(result, replacements)
    remove_unused(result)
    return result, frozenset(trainable)


def _add_initializer(model: onnx.ModelProto, editor: GraphEditor, base: str, value: np.ndarray) -> str:
    name = editor.fresh(base)
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
    return name


def _conv(editor: GraphEditor, node: onnx.NodeProto, inputs: list[str], base: str, group: int | None = None) -> str:
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if group is not None:
        attributes["group"] = group
    return editor.node("Conv", inputs, base, **attributes)


def _layer(editor: GraphEditor, node: onnx.NodeProto, inputs: list[str], base: str) -> str:
    """A copy of a MatMul/Gemm `node` on other inputs (a Gemm keeps its attributes)."""
    if node.op_type == "Conv":
        return _conv(editor, node, inputs, base)
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return editor.node(node.op_type, inputs, base, **attributes)


def _gather(editor: GraphEditor, tensor: str, indices: np.ndarray, base: str, axis: int = 1) -> str:
    return editor.node("Gather", [tensor, editor.constant(f"{base}_indices", indices.astype(np.int64))], base, axis=axis)


def _feature_axis(c: Candidate, rank: int) -> int:
    """The activation axis that holds the channels: 1, or the last one for linear layers."""
    return rank - 1 if c.features_last else 1


def _finish(editor: GraphEditor, node: onnx.NodeProto, result: str, bias: str | None, rank: int) -> None:
    """Add the bias, if any, as the last node (the caller gives the last node the original output name)."""
    if bias is not None:
        if node.op_type != "Conv":  # Gemm's C: one value per output feature, on the last axis
            editor.node("Add", [result, bias], f"{node.name}.biased")
            return
        shape = editor.constant(f"{node.name}.bias_shape", np.array([1, -1] + [1] * (rank - 2), dtype=np.int64))
        editor.node("Add", [result, editor.node("Reshape", [bias, shape], f"{node.name}.bias_b")], f"{node.name}.biased")


def _bias_after(editor: GraphEditor, node: onnx.NodeProto, inputs: list[str], candidate: Candidate, rank: int) -> list[str]:
    _finish(editor, node, _conv(editor, node, inputs, f"{node.name}.nobias"), candidate.bias, rank)
    return []


def _complement(channels: tuple[int, ...], total: int) -> tuple[np.ndarray, np.ndarray]:
    chosen = np.array(sorted(channels), dtype=np.int64)
    mask = np.ones(total, dtype=bool)
    mask[chosen] = False
    return chosen, np.flatnonzero(mask).astype(np.int64)


def _split_input(editor: GraphEditor, model: onnx.ModelProto, node: onnx.NodeProto, c: Candidate, weight: np.ndarray,
                 update: Update, bias_trains: bool, rank: int, trainable: set[str]) -> list[str]:
    chosen, rest = _complement(update.channels or (), c.slice_channels)
    axis, feature = c.weight_axis("input"), _feature_axis(c, rank)
    w_train = _add_initializer(model, editor, f"{c.weight}.sparse_trainable", np.take(weight, chosen, axis=axis))
    w_rest = _add_initializer(model, editor, f"{c.weight}.sparse_frozen", np.take(weight, rest, axis=axis))
    x_train = _gather(editor, c.input, chosen, f"{node.name}.x_trainable", feature)
    y_train = _layer(editor, node, [x_train, w_train] + ([c.bias] if bias_trains and c.bias else []), f"{node.name}.y_trainable")
    parts = [y_train]
    if len(rest):
        x_rest = _gather(editor, c.input, rest, f"{node.name}.x_frozen", feature)
        bias = [c.bias] if c.bias and not bias_trains else []
        parts.append(_layer(editor, node, [x_rest, w_rest, *bias], f"{node.name}.y_frozen"))
        editor.node("Add", parts, f"{node.name}.y")
    elif c.bias and not bias_trains:
        _finish(editor, node, y_train, c.bias, rank)
    return [w_train]


def _split_depthwise(editor: GraphEditor, model: onnx.ModelProto, node: onnx.NodeProto, c: Candidate, weight: np.ndarray,
                     update: Update, rank: int) -> list[str]:
    chosen, rest = _complement(update.channels or (), c.channels)
    w_train = _add_initializer(model, editor, f"{c.weight}.sparse_trainable", weight[chosen])
    y_train = _conv(editor, node, [_gather(editor, c.input, chosen, f"{node.name}.x_trainable"), w_train],
                    f"{node.name}.y_trainable", group=len(chosen))
    _join(editor, model, node, c, weight, y_train, chosen, rest, rank, lambda w, r: _conv(
        editor, node, [_gather(editor, c.input, r, f"{node.name}.x_frozen"), w], f"{node.name}.y_frozen", group=len(r)))
    return [w_train]


def _split_output(editor: GraphEditor, model: onnx.ModelProto, node: onnx.NodeProto, c: Candidate, weight: np.ndarray,
                  update: Update, rank: int) -> list[str]:
    chosen, rest = _complement(update.channels or (), c.channels)
    axis = c.weight_axis("output")
    w_train = _add_initializer(model, editor, f"{c.weight}.sparse_trainable", np.take(weight, chosen, axis=axis))
    y_train = _layer(editor, node, [c.input, w_train], f"{node.name}.y_trainable")
    _join(editor, model, node, c, weight, y_train, chosen, rest, rank,
          lambda w, r: _layer(editor, node, [c.input, w], f"{node.name}.y_frozen"))
    return [w_train]


def _join(editor: GraphEditor, model: onnx.ModelProto, node: onnx.NodeProto, c: Candidate, weight: np.ndarray, y_train: str,
          chosen: np.ndarray, rest: np.ndarray, rank: int, frozen_conv: Callable[[str, np.ndarray], str]) -> None:
    """Concatenate the trainable and frozen output channels back into the original order, then add the bias."""
    if len(rest):
        w_rest = _add_initializer(model, editor, f"{c.weight}.sparse_frozen", np.take(weight, rest, axis=c.weight_out_axis))
        y_rest = frozen_conv(w_rest, rest)
        feature = _feature_axis(c, rank)
        joined = editor.node("Concat", [y_train, y_rest], f"{node.name}.y_split", axis=feature)
        order = np.argsort(np.concatenate([chosen, rest]))
        y_train = _gather(editor, joined, order, f"{node.name}.y_unsplit", feature)
    else:
        y_train = editor.node("Identity", [y_train], f"{node.name}.y_unsplit")
    _finish(editor, node, y_train, c.bias, rank)
