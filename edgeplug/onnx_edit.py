"""Helpers for passes that add nodes and initializers without name clashes."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper


class GraphEditor:
    """Hands out unique tensor names and appends initializers to one graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self._used = {name for node in self.graph.node for name in (*node.input, *node.output, node.name)}
        self._used |= {t.name for t in self.graph.initializer}
        self._used |= {v.name for v in (*self.graph.input, *self.graph.output)}
        self._nodes: list[onnx.NodeProto] = []

    def fresh(self, base: str) -> str:
        name, suffix = base, 1
        while name in self._used:
            name, suffix = f"{base}_{suffix}", suffix + 1
        self._used.add(name)
        return name

    def constant(self, base: str, value: np.ndarray) -> str:
        """Build a Constant node (placed with `take_nodes`) and return its output name.

        Constant nodes, unlike initializers, are never taken for trainable parameters.
        """
        name = self.fresh(base)
        tensor = numpy_helper.from_array(np.asarray(value), name)
        self._nodes.append(onnx.helper.make_node("Constant", [], [name], name=self.fresh(f"{base}_node"), value=tensor))
        return name

    def node(self, op_type: str, inputs: list[str], base: str, **attributes: Any) -> str:
        """Build a one-output node (placed later with `take_nodes`) and return its output name."""
        output = self.fresh(base)
        self._nodes.append(onnx.helper.make_node(op_type, inputs, [output], name=self.fresh(f"{base}_node"), **attributes))
        return output

    def last_node(self) -> onnx.NodeProto:
        """The node built last and not yet taken, to adjust (domain, output name) before it is placed."""
        return self._nodes[-1]

    def take_replacement(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """The nodes built since the last call, the last one renamed to produce `node`'s output,
        ready to stand in for `node` (see `replace_nodes`)."""
        nodes = self.take_nodes()
        nodes[-1].output[0] = node.output[0]
        return nodes

    def take_nodes(self) -> list[onnx.NodeProto]:
        """The nodes built since the last call, in the order they were built."""
        nodes, self._nodes = self._nodes, []
        return nodes


def replace_nodes(model: onnx.ModelProto, replacements: dict[str, list[onnx.NodeProto]]) -> None:
    """Put each list of new nodes where the node of that name was, keeping topological order."""
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        nodes.extend(replacements.get(node.name, [node]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
