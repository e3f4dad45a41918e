"""Cut the model where the probes begin: a frozen prefix for plain inference, a tail to differentiate.

Nothing before the earliest probe gets a gradient, so the probe pass need not
run it in training mode. The *tail* holds the nodes that depend on a probed
layer's output, the group-1 convs probed at their input (plus the constant nodes
they read); the *boundary* is every non-constant
tensor the tail reads but does not compute. The *prefix* computes the boundary
tensors that are not graph inputs; it runs in an ordinary onnxruntime
InferenceSession (fused kernels, no saved activations), and only the tail is
handed to `generate_artifacts`, so the probe training graph and its checkpoint
stay as small as the part of the model the criterion differentiates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import helper

from edgeplug.plugin_api import GraphIndex

from .candidates import Candidate


@dataclasses.dataclass(frozen=True)
class Cut:
    prefix: onnx.ModelProto | None  # outputs: the boundary tensors that are not graph inputs (None if there are none)
    prefix_inputs: tuple[str, ...]  # graph inputs the prefix reads
    boundary: tuple[str, ...]  # the tail's data inputs, in the order the tail reads them
    tail_nodes: tuple[onnx.NodeProto, ...]
    tail_initializers: tuple[str, ...]


def cut_at(index: GraphIndex, probed: Iterable[Candidate], output: str, constants: set[str],
           dtypes: Mapping[str, np.dtype], input_probes: bool = True) -> Cut:
    """Split the model of `index` (pruned to `output`) where the probes of `probed` begin.

    A layer probed only at its output runs in the prefix too (the probe then
    scales the boundary tensor); a group-1 conv probed at its input as well
    (`input_probes`) and the layer computing `output` stay in the tail. `constants` names the tensors
    computed from initializers alone (they stay in the tail); `dtypes` gives the
    element type of the prefix's outputs.
    """
    model = index.model
    needed = index.ancestors([output])
    layers = list(probed)
    starts = [c.output for c in layers]
    inside = {c.node for c in layers if (input_probes and c.kind == "conv") or c.output == output}
    downstream = (index.descendants(starts, float_only=False) | inside) & needed
    in_tail = set(downstream)
    # constant chains (shapes, pads) the tail reads stay in the tail, so its shapes stay static
    frontier = [name for node in model.graph.node if node.name in downstream for name in node.input if name in constants]
    while frontier:
        producer = index.producer.get(frontier.pop())
        if producer is not None and producer.name not in in_tail:
            in_tail.add(producer.name)
            frontier.extend(name for name in producer.input if name)
    tail = tuple(node for node in model.graph.node if node.name in in_tail)
    produced = {name for node in tail for name in node.output if name}
    boundary: list[str] = []
    used_initializers: list[str] = []
    for node in tail:
        for name in node.input:
            if not name or name in produced:
                continue
            if name in index.initializers:
                if name not in used_initializers:
                    used_initializers.append(name)
            elif name not in boundary:
                boundary.append(name)
    graph_inputs = {value.name for value in model.graph.input}
    computed = [name for name in boundary if name not in graph_inputs]
    prefix: onnx.ModelProto | None = None
    prefix_inputs: tuple[str, ...] = ()
    if computed:
        prefix, prefix_inputs = _prefix(model, index, computed, dtypes)
    return Cut(prefix, prefix_inputs, tuple(boundary), tail, tuple(used_initializers))


def _prefix(model: onnx.ModelProto, index: GraphIndex, outputs: list[str],
            dtypes: Mapping[str, np.dtype]) -> tuple[onnx.ModelProto, tuple[str, ...]]:
    needed = index.ancestors(outputs)
    nodes = [node for node in model.graph.node if node.name in needed]
    read = {name for node in nodes for name in node.input if name}
    inputs = [value for value in model.graph.input if value.name in read and value.name not in index.initializers]
    # a type shape inference could not find is left to onnxruntime, which infers it
    values = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtypes[name])), None)
              if name in dtypes else helper.make_empty_tensor_value_info(name) for name in outputs]
    graph = helper.make_graph(nodes, f"{model.graph.name}_probe_prefix", inputs, values,
                              [tensor for tensor in model.graph.initializer if tensor.name in read])
    prefix = helper.make_model(graph, opset_imports=list(model.opset_import))
    prefix.ir_version = model.ir_version
    prefix.functions.extend(model.functions)
    return prefix, tuple(value.name for value in inputs)


def tail_model(model: onnx.ModelProto, cut: Cut, output: str, arrays: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The tail as a model whose inputs are the boundary tensors, shaped like `arrays` (one chunk of them)."""
    originals = {value.name: value for value in model.graph.input}
    inputs = []
    for name in cut.boundary:
        array = arrays[name]
        inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)))
    wanted = set(cut.tail_initializers)
    produced = {name for node in cut.tail_nodes for name in node.output}
    graph = helper.make_graph(
        list(cut.tail_nodes), f"{model.graph.name}_probe_tail", inputs,
        [value for value in model.graph.output if value.name == output],
        [tensor for tensor in model.graph.initializer if tensor.name in wanted],
        value_info=[value for value in model.graph.value_info if value.name in produced and value.name not in originals],
    )
    tail = helper.make_model(graph, opset_imports=list(model.opset_import))
    tail.ir_version = model.ir_version
    tail.functions.extend(model.functions)
    return tail
