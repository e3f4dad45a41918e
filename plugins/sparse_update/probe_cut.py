"""Cut the model where the probes begin: a frozen prefix for plain inference, a tail to differentiate.

Nothing before the earliest probe gets a gradient, so the probe pass need not
run it in training mode. The *tail* holds the nodes that depend on a probed
layer's output, the group-1 convs and linear layers probed at their input (plus the constant nodes
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
from onnx import helper, numpy_helper

from edgeplug.plugin_api import GraphIndex, extract

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
    inside = {c.node for c in layers if (input_probes and c.probes_input) or c.output == output}
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
    read = {name for node in model.graph.node if node.name in needed
            for name in (*node.input, *index.implicit_inputs.get(node.name, ())) if name}
    inputs = tuple(value.name for value in model.graph.input if value.name in read and value.name not in index.initializers)
    prefix = extract(model, outputs, inputs, name=f"{model.graph.name}_probe_prefix")
    # a type shape inference could not find is left to onnxruntime, which infers it
    for value in prefix.graph.output:
        if not value.type.tensor_type.elem_type and value.name in dtypes:
            value.type.tensor_type.elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtypes[value.name]))
    return prefix, inputs


def tail_model(model: onnx.ModelProto, cut: Cut, output: str, arrays: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The tail as a model whose inputs are the boundary tensors, shaped like `arrays` (one chunk of them)."""
    tail = extract(model, [output], cut.boundary, name=f"{model.graph.name}_probe_tail")
    for value in tail.graph.input:
        array = arrays[value.name]
        value.type.CopyFrom(helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)))
    return tail


LIFT_MIN_VALUES = 4096  # float initializers at least this large become inputs; small ones (scalars, shapes) stay


def lift_weights(model: onnx.ModelProto, keep: Iterable[str]) -> dict[str, np.ndarray]:
    """Turn `model`'s large float initializers (the frozen weights, not those named in `keep`) into graph
    inputs, in place; return their values, to be fed at every step.

    generate_artifacts copies its model several times (onnxblock's base, the gradient builder's serialised
    graph, the eval model, the optimised graph) and writes every frozen initializer into the checkpoint: with
    the weights outside the graph it handles a few kilobytes, and the probe session reads them from the
    arrays returned here instead of a second copy in its checkpoint."""
    kept = set(keep)
    lifted: dict[str, np.ndarray] = {}
    stay = []
    for tensor in model.graph.initializer:
        values = int(np.prod(tensor.dims)) if tensor.dims else 1
        if tensor.name in kept or values < LIFT_MIN_VALUES or tensor.data_type not in _FLOAT_TYPES:
            stay.append(tensor)
            continue
        lifted[tensor.name] = numpy_helper.to_array(tensor)
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    del model.graph.initializer[:]
    model.graph.initializer.extend(stay)
    return lifted


_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE})
