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


def _size(model: onnx_ir.Model) -> int:
    import onnx_ir

    nodes = sum(1 for _ in onnx_ir.traversal.RecursiveGraphIterator(model.graph))
    return nodes + len(model.graph.initializers) + len(model.functions)
