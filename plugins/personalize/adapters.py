"""Adapters the pass inserts: a per-channel affine `x * scale + shift` after named tensors.

They start as the identity (scale 1, shift 0), so the model computes exactly what it
did, and give a model whose batch norms were folded at export (deployment exports)
normalisation-like slots a cloud can fill.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgeplug.plugin_api import GraphEditor, ModelError, RecipeError


def insert_adapters(model: onnx.ModelProto, tensors: list[str], shapes: Mapping[str, list[Any]]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `model` with an adapter after each tensor; returns it and the new parameter names."""
    adapted = onnx.ModelProto()
    adapted.CopyFrom(model)
    graph = adapted.graph
    produced = {output for node in graph.node for output in node.output}
    outputs = {o.name for o in graph.output}
    editor = GraphEditor(adapted)
    parameters: list[str] = []
    for tensor in tensors:
        if tensor not in produced:
            raise RecipeError(f"personalize: adapter tensor '{tensor}' is not produced by any node of the model")
        if tensor in outputs:
            raise RecipeError(f"personalize: adapter tensor '{tensor}' is a model output; adapt a tensor inside the model")
        shape = shapes.get(tensor)
        if shape is None or len(shape) < 2 or not isinstance(shape[1], int):
            raise ModelError(f"personalize: the channel count of adapter tensor '{tensor}' is unknown ({shape}); "
                             "run 'normalize' with shape inference first, or choose another tensor")
        broadcast = (shape[1],) + (1,) * (len(shape) - 2)
        scale, shift = editor.fresh(f"{tensor}.adapter.scale"), editor.fresh(f"{tensor}.adapter.shift")
        graph.initializer.extend([numpy_helper.from_array(np.ones(broadcast, np.float32), scale),
                                  numpy_helper.from_array(np.zeros(broadcast, np.float32), shift)])
        result = editor.node("Add", [editor.node("Mul", [tensor, scale], f"{tensor}.adapter.scaled"), shift], f"{tensor}.adapter")
        new_nodes = editor.take_nodes()
        for node in graph.node:
            for slot, name in enumerate(node.input):
                if name == tensor:
                    node.input[slot] = result
        position = next(i for i, node in enumerate(graph.node) if tensor in node.output) + 1
        for offset, node in enumerate(new_nodes):
            graph.node.insert(position + offset, node)
        parameters += [scale, shift]
    return adapted, parameters
