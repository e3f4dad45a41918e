"""What onnxruntime-training 1.19.2 can build a training graph for, checked before it is asked.

Each check turns a native abort or an opaque type error of the runtime into one
message that names the node or tensor and says what to do.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx
from onnx import TensorProto

from edgeplug.errors import ModelError
from edgeplug.graph import subgraphs

NORM_OPS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "BatchNormalization", "InstanceNormalization",
                      "GroupNormalization"})
ABORTING_OPS = frozenset({"Loop", "Scan"})
"""Ops with a body that the runtime's training-graph builder aborts the process on (an assertion
in its graph transformers), even when the op lies in the frozen part of the model."""


def check_runtime_support(forward: onnx.ModelProto, output_name: str, trainable: Iterable[str], label: str = "") -> None:
    """Refuse what generate_artifacts would crash on or reject without saying why."""
    for node in forward.graph.node:
        if node.op_type in ABORTING_OPS and node.domain in ("", "ai.onnx"):
            raise ModelError(f"{label}op {node.op_type} (node '{node.name}') runs a subgraph, and onnxruntime-training "
                             "1.19.2 aborts while building a training graph around one; export the model with the "
                             "loop unrolled (a fixed trip count), or train a model cut before it")
        for graph in subgraphs(node):
            inner = next((n for n in graph.node if n.op_type in ABORTING_OPS), None)
            if inner is not None:
                raise ModelError(f"{label}op {inner.op_type} inside node '{node.name}' runs a subgraph, which "
                                 "onnxruntime-training 1.19.2 aborts on; export the model without it")
    output = next((value for value in forward.graph.output if value.name == output_name), None)
    elem_type = output.type.tensor_type.elem_type if output is not None else TensorProto.FLOAT
    if elem_type not in (TensorProto.FLOAT, 0):
        raise ModelError(f"{label}the output '{output_name}' is {_type_name(elem_type)}: onnxruntime-training 1.19.2 "
                         "builds its losses in float32 only; convert the model to float32 before rewriting it "
                         "(e.g. onnxconverter_common.float16.convert_float16_to_float32, or re-export it in float32)")
    initializers = {tensor.name: tensor for tensor in forward.graph.initializer}
    for name in sorted(trainable):
        tensor = initializers.get(name)
        if tensor is not None and tensor.data_type != TensorProto.FLOAT:
            raise ModelError(f"{label}parameter '{name}' is {_type_name(tensor.data_type)}: onnxruntime-training 1.19.2's "
                             "optimizers update float32 parameters only; freeze it (the 'trainable' pass) or convert "
                             "the model to float32 before rewriting it")


def _type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type).lower()


def check_trainable_widths(forward: onnx.ModelProto, output_name: str, trainable: list[str], label: str = "") -> None:
    """Refuse zero-width tensors where training would use them: onnxruntime-training crashes natively
    (SIGSEGV in the loss) on an output of width 0, and fails on empty weights and inputs."""
    graph = forward.graph
    for value in graph.output:
        if value.name == output_name and _has_zero_dim(value):
            raise ModelError(f"{label}output '{output_name}' has shape {_shape_text(value)}: a zero-width output "
                             "leaves nothing to train (a classifier with 0 classes?); fix the model's last layer")
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    for name in trainable:
        tensor = initializers.get(name)
        if tensor is not None and 0 in tensor.dims:
            raise ModelError(f"{label}parameter '{name}' has shape {list(tensor.dims)}, no values: a zero-width layer "
                             "cannot be trained; fix the model, or freeze it with the 'trainable' pass")
    for value in graph.input:
        if value.name not in initializers and _has_zero_dim(value, skip_batch=True):
            raise ModelError(f"{label}input '{value.name}' has shape {_shape_text(value)}: zero-width inputs carry "
                             "no data to train on; fix the model's input shape")


def _has_zero_dim(value: onnx.ValueInfoProto, skip_batch: bool = False) -> bool:
    dims = value.type.tensor_type.shape.dim
    return any(d.HasField("dim_value") and d.dim_value == 0 for d in list(dims)[1 if skip_batch else 0:])


def _shape_text(value: onnx.ValueInfoProto) -> str:
    dims = value.type.tensor_type.shape.dim
    return "[" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims) + "]"


def untie_frozen_norm_parameters(forward: onnx.ModelProto, trainable: Iterable[str]) -> list[str]:
    """Give every normalisation node its own copy of a frozen scale or bias that several nodes read; return their names.

    An exporter's optimiser may merge equal initializers into one name (torch's dynamo exporter merges the
    LayerNorm weights of a freshly initialised encoder: all ones). onnxruntime-training 1.19.2 then defines the
    gradient of that tensor once per LayerNormalization its backward pass reaches, even when the tensor is
    frozen ("Duplicate definition of name (<tensor>_grad)"). A frozen tensor never changes, so one copy per
    reader computes exactly the same; trainable ones keep their tie.
    """
    frozen = {t.name: t for t in forward.graph.initializer} .keys() - set(trainable)
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in forward.graph.node:
        for slot, name in enumerate(node.input):
            if name in frozen:
                readers.setdefault(name, []).append((node, slot))
    by_name = {t.name: t for t in forward.graph.initializer}
    taken = {t.name for t in forward.graph.initializer} | {o for n in forward.graph.node for o in n.output}
    untied = []
    for name, uses in readers.items():
        if len(uses) < 2 or not any(node.op_type in NORM_OPS and slot in (1, 2) for node, slot in uses):
            continue
        for number, (node, slot) in enumerate(uses[1:], start=1):
            copy_name, suffix = f"{name}.copy{number}", number
            while copy_name in taken:
                suffix += len(uses)
                copy_name = f"{name}.copy{suffix}"
            taken.add(copy_name)
            tensor = onnx.TensorProto()
            tensor.CopyFrom(by_name[name])
            tensor.name = copy_name
            forward.graph.initializer.append(tensor)
            node.input[slot] = copy_name
        untied.append(name)
    return untied
