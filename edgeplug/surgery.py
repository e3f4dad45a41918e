"""Graph surgery through onnx-ir: the one subgraph extraction and the one dead-code cleanup.

Passes keep working on `onnx.ModelProto` (see docs/architecture.md, "Pass contract
and onnx-ir"); these helpers convert to `onnx_ir.Model`, let the library do the
walk, and convert back. The library follows values read inside If/Loop/Scan bodies
and keeps local functions, opsets, the IR version and the shapes it knows, which
four hand-written copies each did differently. onnx_ir is imported on first use:
it costs most of a second, and the device side never needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, TypeVar

import onnx

from edgeplug.errors import ModelError

if TYPE_CHECKING:
    import onnx_ir

T = TypeVar("T")


def to_ir(model: onnx.ModelProto) -> onnx_ir.Model:
    """The model as an `onnx_ir.Model` (shares no state with `model`)."""
    import onnx_ir

    return onnx_ir.serde.deserialize_model(model)


def to_proto(model: onnx_ir.Model) -> onnx.ModelProto:
    """An `onnx_ir.Model` back as a ModelProto (same IR version and opsets)."""
    import onnx_ir

    return onnx_ir.serde.serialize_model(model)


def on_ir(model: onnx.ModelProto, edit: Callable[[onnx_ir.Model], T]) -> tuple[onnx.ModelProto, T]:
    """Adapter for code that edits an `onnx_ir.Model`: run `edit` on an IR copy of `model`,
    return the edited copy as a ModelProto and what `edit` returned."""
    converted = to_ir(model)
    result = edit(converted)
    return to_proto(converted), result


def extract(model: onnx.ModelProto, outputs: Sequence[str], inputs: Iterable[str] | None = None, *,
            name: str | None = None) -> onnx.ModelProto:
    """The part of `model` that computes `outputs` from `inputs` (default: the model's inputs).

    Keeps the nodes the outputs need, in the original order, including producers
    of values read only inside subgraphs; the initializers they read; local
    functions they call; the opsets, IR version, producer and the shapes known for
    the kept values. `inputs` may name any tensors (a cut inside the graph): they
    become the new model's inputs, with the types the model knows for them. A
    needed tensor that is neither an input, an initializer nor computed from them
    is a ModelError naming it.
    """
    if not model.functions and not _has_subgraphs(model.graph):
        return _typed_outputs(_extract_flat(model, outputs, inputs, name))
    import onnx_ir
    from onnx_ir.passes.common import RemoveUnusedFunctionsPass

    source = to_ir(model)
    graph = source.graph
    initializers = set(graph.initializers)
    wanted_inputs = [str(value.name) for value in graph.inputs if value.name not in initializers] if inputs is None else list(inputs)
    values = onnx_ir.convenience.create_value_mapping(graph)
    unknown = [tensor for tensor in (*wanted_inputs, *outputs) if tensor not in values]
    if unknown:
        raise ModelError(f"the model has no tensor named {', '.join(repr(tensor) for tensor in unknown)}")
    try:
        extracted = onnx_ir.convenience.extract(graph, inputs=wanted_inputs, outputs=list(outputs))
    except ValueError as error:
        raise ModelError(f"cannot cut the model at {', '.join(wanted_inputs) or 'its inputs'}: {error}") from None
    if name is not None:
        extracted.name = name
    order = {tensor: position for position, tensor in enumerate(graph.initializers)}
    kept = sorted(extracted.initializers.values(), key=lambda value: order.get(str(value.name), len(order)))
    extracted.initializers.clear()  # the library collects them in a set: restore the model's order
    for value in kept:
        extracted.register_initializer(value)
    result = onnx_ir.Model(extracted, ir_version=source.ir_version, producer_name=source.producer_name,
                           producer_version=source.producer_version, domain=source.domain,
                           model_version=source.model_version, functions=list(source.functions.values()),
                           doc_string=source.doc_string)
    RemoveUnusedFunctionsPass()(result)  # type: ignore[no-untyped-call]
    return _typed_outputs(to_proto(result))


def _typed_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Outputs cut from inside the graph whose type the model did not record get it from shape inference."""
    untyped = [value for value in model.graph.output if not value.type.HasField("tensor_type")]
    if untyped:
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except (onnx.shape_inference.InferenceError, RuntimeError):
            return model
        known = {value.name: value for value in (*inferred.graph.value_info, *inferred.graph.output)}
        for value in untyped:
            if value.name in known and known[value.name].type.HasField("tensor_type"):
                value.type.CopyFrom(known[value.name].type)
    return model


def remove_unused(model: onnx.ModelProto) -> int:
    """Remove, in place, nodes whose outputs nothing reads (also inside subgraphs and functions),
    unused initializers and unused local functions; return how many things went.

    The inputs and outputs stay as they are; nodes that feed only a subgraph are kept.
    `model.graph` stays the same object (references to it stay valid; references to
    its nodes do not when something was removed).
    """
    if not model.functions and not _has_subgraphs(model.graph):
        return _remove_unused_flat(model.graph)
    import onnx_ir
    from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass

    def clean(converted: onnx_ir.Model) -> int:
        before = _size(converted)
        onnx_ir.passes.Sequential(RemoveUnusedNodesPass(), RemoveUnusedFunctionsPass())(converted)  # type: ignore[no-untyped-call]
        return before - _size(converted)

    cleaned, removed = on_ir(model, clean)
    if removed:
        model.graph.CopyFrom(cleaned.graph)
        del model.functions[:]
        model.functions.extend(cleaned.functions)
    return removed


def _extract_flat(model: onnx.ModelProto, outputs: Sequence[str], inputs: Iterable[str] | None, name: str | None) -> onnx.ModelProto:
    """`extract` for a graph without subgraphs or functions, built on the proto (no onnx-ir round trip:
    about 2 s per call on EfficientNet-Lite0, plus 1.5-4 s to import onnx-ir, paid by passes on the device)."""
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    wanted_inputs = [v.name for v in graph.input if v.name not in initializers] if inputs is None else list(inputs)
    producer = {out: node for node in graph.node for out in node.output if out}
    known = {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)}
    unknown = [t for t in (*wanted_inputs, *outputs) if t not in producer and t not in known and t not in initializers]
    if unknown:
        raise ModelError(f"the model has no tensor named {', '.join(repr(tensor) for tensor in unknown)}")
    stop, keep, frontier = set(wanted_inputs), set(), [t for t in outputs if t not in wanted_inputs]
    while frontier:
        tensor = frontier.pop()
        node = producer.get(tensor)
        if node is None:
            if tensor not in initializers and tensor not in stop:
                raise ModelError(f"cannot cut the model at {', '.join(wanted_inputs) or 'its inputs'}: "
                                 f"'{tensor}' is needed but neither an input nor computed from them")
            continue
        if id(node) in keep:
            continue
        keep.add(id(node))
        frontier.extend(t for t in node.input if t and t not in stop)
    nodes = [node for node in graph.node if id(node) in keep]
    read = {t for node in nodes for t in node.input if t} | set(outputs)
    produced = {t for node in nodes for t in node.output if t}

    def value(tensor: str) -> onnx.ValueInfoProto:
        return known[tensor] if tensor in known else onnx.helper.make_empty_tensor_value_info(tensor)

    result_graph = onnx.helper.make_graph(
        nodes, name if name is not None else graph.name, [value(t) for t in wanted_inputs], [value(t) for t in outputs],
        [tensor for tensor in graph.initializer if tensor.name in read and tensor.name not in stop],
        value_info=[v for v in graph.value_info if v.name in produced and v.name not in outputs])
    result = onnx.helper.make_model(result_graph, opset_imports=list(model.opset_import))
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(result, field, getattr(model, field))
    return result


def _has_subgraphs(graph: onnx.GraphProto) -> bool:
    return any(attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for node in graph.node for attribute in node.attribute)


def _remove_unused_flat(graph: onnx.GraphProto) -> int:
    """`remove_unused` for a graph without subgraphs or functions, on the proto itself: the onnx-ir round
    trip copies every initializer (about 2 s per call on EfficientNet-Lite0, plus 1.5-4 s to import onnx-ir),
    which sparse-update pays on the device."""
    outputs = {value.name for value in graph.output}
    nodes = list(graph.node)
    removed = 0
    while True:
        read = outputs | {name for node in nodes for name in node.input if name}
        alive = [node for node in nodes if any(name in read for name in node.output if name)]
        if len(alive) == len(nodes):
            break
        removed += len(nodes) - len(alive)
        nodes = alive
    read = outputs | {value.name for value in graph.input} | {name for node in nodes for name in node.input if name}
    unused = [position for position, tensor in enumerate(graph.initializer) if tensor.name not in read]
    removed += len(unused)
    if len(nodes) < len(graph.node):
        del graph.node[:]
        graph.node.extend(nodes)
    # by position, not `del [:]` + `extend(kept)`: extend copies every kept tensor while the removed ones stay in
    # the protobuf's arena until the model goes, so that would hold the weights twice
    for position in reversed(unused):
        del graph.initializer[position]
    return removed


def _size(model: onnx_ir.Model) -> int:
    import onnx_ir

    nodes = sum(1 for _ in onnx_ir.traversal.RecursiveGraphIterator(model.graph))
    return nodes + len(model.graph.initializers) + len(model.functions)
