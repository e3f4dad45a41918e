"""Where to cut a model into blocks that train apart.

A cut is a tensor that is the only one crossing from the nodes before it to the
nodes after it (Constant nodes aside: each block gets its own copy). Automatic cuts
sit after each activation that follows a Conv/Gemm/MatMul layer (with any
normalisation in between), moved past a pooling node that alone reads it, so that a
block is "layer + norm + activation (+ pool)". Residual connections have no clean
cut inside them, so a residual unit stays within one block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import onnx

from edgeplug.plugin_api import GraphIndex, ModelError, RecipeError

LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Gelu", "FastGelu", "QuickGelu", "Softplus",
                         "Elu", "Selu", "HardSwish", "HardSigmoid", "Mish", "PRelu"})
POOLS = frozenset({"MaxPool", "AveragePool"})


@dataclasses.dataclass(frozen=True)
class Cut:
    """Block boundary: nodes up to `position` (in graph order) are before it; `tensor` crosses it.
    `activation` is the activation output the cut was moved past a pool from (None otherwise): the
    reference LLS code puts the head on it, before the pooling."""

    position: int
    tensor: str
    node: str
    activation: str | None = None


def auto_cuts(model: onnx.ModelProto) -> list[Cut]:
    """Cuts after every layer + (norm) + activation (+ pool) where the graph allows one."""
    nodes = list(model.graph.node)
    index = GraphIndex(model)
    parameters = set(index.parameters())
    position = {node.name: i for i, node in enumerate(nodes)}
    cuts: list[Cut] = []
    layer_seen = False
    for node in nodes:
        if node.op_type in LAYERS and any(name in parameters for name in node.input):
            layer_seen = True
        elif node.op_type in ACTIVATIONS and layer_seen:
            cut_node, tensor, activation = node, node.output[0], None
            readers = index.consumers.get(tensor, [])
            if len(readers) == 1 and readers[0][0].op_type in POOLS:
                cut_node, tensor, activation = readers[0][0], readers[0][0].output[0], tensor
            cut = Cut(position[cut_node.name], tensor, cut_node.name, activation)
            if is_clean(nodes, cut, model):
                cuts.append(cut)
                layer_seen = False
    # the last block must keep a layer to train: the classifier after the last cut
    while cuts and not any(n.op_type in LAYERS and any(x in parameters for x in n.input) for n in nodes[cuts[-1].position + 1:]):
        cuts.pop()
    return cuts


def named_cuts(model: onnx.ModelProto, names: Sequence[str]) -> list[Cut]:
    """Cuts after the nodes the recipe names, in graph order; each must be a clean cut."""
    nodes = list(model.graph.node)
    by_name = {node.name: (i, node) for i, node in enumerate(nodes)}
    cuts = []
    for name in names:
        if name not in by_name:
            raise RecipeError(f"blocks: the model has no node named {name!r}; 'edgeplug inspect' lists the nodes")
        i, node = by_name[name]
        if i >= len(nodes) - 1:
            raise RecipeError(f"blocks: nothing is left after node {name!r} for the last classifier")
        cut = Cut(i, node.output[0], name)
        if not is_clean(nodes, cut, model):
            raise ModelError(f"blocks: other tensors than {cut.tensor!r} cross the cut after node {name!r} (a skip "
                             "connection or a second branch); cut after a node whose output alone links the two sides")
        cuts.append(cut)
    cuts.sort(key=lambda c: c.position)
    if len({c.position for c in cuts}) < len(cuts):
        raise RecipeError("blocks: a node is named twice")
    return cuts


def is_clean(nodes: Sequence[onnx.NodeProto], cut: Cut, model: onnx.ModelProto) -> bool:
    """Whether `cut.tensor` is the only non-constant tensor that nodes after the cut read from before it."""
    constants = {out for node in nodes if node.op_type == "Constant" for out in node.output}
    before = {out for node in nodes[: cut.position + 1] for out in node.output if out}
    after_reads = {name for node in nodes[cut.position + 1:] for name in node.input if name}
    crossing = (before & after_reads) - constants
    outputs = {value.name for value in model.graph.output}
    return crossing == {cut.tensor} and not (before & outputs)
