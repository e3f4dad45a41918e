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
