"""`edgeplug inspect`: what a model holds and what stands between it and training."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import onnx

from edgeplug.gradients import DECOMPOSABLE, missing_gradients
from edgeplug.graph import GraphIndex, ensure_node_names, tensor_bytes, tensor_values
from edgeplug.modelio import (
    MAX_IR_VERSION,
    MAX_OPSET,
    check_model,
    default_opset,
    load_model,
    unknown_ops,
    unsorted_node,
)
from edgeplug.terminal import escape


def inspect_model(path: str | Path) -> dict[str, Any]:
    """Describe ops, parameters, shapes, and ops without gradients (assuming full fine-tuning)."""
    model = load_model(path)
    problems = unknown_ops(model)
    ensure_node_names(model)
    unsorted = unsorted_node(model.graph)
    try:  # ONNX's shape inference crashes natively on cycles and on nodes lacking required attributes:
        check_model(model)  # run it only on a sorted graph the checker accepts
        inferred = onnx.shape_inference.infer_shapes(model) if unsorted is None else model
    except Exception:  # inspection must work on models the checker or shape inference rejects
        inferred = model
    index = GraphIndex(inferred)
    parameters = index.parameters()
    sizes = {t.name: (tensor_values(t), tensor_bytes(t)) for t in model.graph.initializer if t.data_type != onnx.TensorProto.UNDEFINED}
    opset = default_opset(model)
    outputs = [value.name for value in model.graph.output]
    no_gradient = [
        {"op": m.op_type, "node": m.node_name, "parameters": list(m.parameters)}
        for m in (missing_gradients(inferred, frozenset(parameters), outputs[0]) if outputs and not problems else [])
    ]
    notes = [f"not in topological order (a cycle or a dangling name): {unsorted}; shapes not inferred"] if unsorted else []
    if model.ir_version > MAX_IR_VERSION:
        notes.append(f"IR version {model.ir_version} > {MAX_IR_VERSION}: the normalize pass lowers it")
    if opset > MAX_OPSET:
        notes.append(f"opset {opset} > {MAX_OPSET}: the normalize pass converts it")
    return {
        "path": str(path),
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [_tensor(v) for v in model.graph.input if v.name not in index.initializers],
        "outputs": [_tensor(v) for v in model.graph.output],
        "ops": dict(collections.Counter(node.op_type for node in model.graph.node).most_common()),
        "nodes": len(model.graph.node),
        "parameters": {
            "count": len(parameters),
            "values": sum(sizes.get(name, (0, 0))[0] for name in parameters),
            "bytes": sum(sizes.get(name, (0, 0))[1] for name in parameters),
        },
        "layers": [{"node": layer.node_name, "op": layer.op_type, "parameters": list(layer.parameters)} for layer in index.layers()],
        "no_gradient": no_gradient,
        "unknown_ops": problems,
        "notes": notes,
    }


def _tensor(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "unknown"
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
    return {"name": value.name, "dtype": dtype, "shape": shape}


def format_inspection(info: dict[str, Any]) -> str:
    """Render `inspect_model`'s result for a terminal."""
    e = escape  # every name comes from the model file: one inert line each
    lines = [
        f"model      {e(info['path'])}",
        f"producer   {e(info['producer']) or '-'}   IR {info['ir_version']}   opsets "
        + ", ".join(f"{e(d)} {v}" for d, v in info["opsets"].items()),
    ]
    for label in ("inputs", "outputs"):
        for tensor in info[label]:
            lines.append(f"{label[:-1]:<10} {e(tensor['name'])}  {tensor['dtype']}  [{', '.join(e(d) for d in tensor['shape'])}]")
    p = info["parameters"]
    lines.append(f"parameters {p['count']} tensors, {p['values']:,} values, {p['bytes'] / 1e6:.2f} MB")
    lines.append(f"nodes      {info['nodes']} ({len(info['layers'])} with parameters)")
    lines.append("ops        " + ", ".join(f"{e(op)} {count}" for op, count in info["ops"].items()))
    if info["unknown_ops"]:
        lines.append("unknown ops (training and inference will fail):")
        lines += [f"  - {e(text)}" for text in info["unknown_ops"]]
    if info["no_gradient"]:
        lines.append("ops without a gradient in onnxruntime-training 1.19.2 on a trainable path (full fine-tuning):")
        for item in info["no_gradient"]:
            params = ", ".join(e(p) for p in item["parameters"][:3]) + (" ..." if len(item["parameters"]) > 3 else "")
            fix = "  [normalize decomposes it]" if item["op"] in DECOMPOSABLE else ""
            lines.append(f"  - {e(item['op'])} at node '{e(item['node'])}' (dragged in by {params}){fix}")
    elif info["unknown_ops"]:
        lines.append("gradients  not checked: the model has unknown ops")
    else:
        lines.append("gradients  every op between the parameters and the output has a gradient")
    lines += [f"note       {e(note)}" for note in info["notes"]]
    return "\n".join(lines)

