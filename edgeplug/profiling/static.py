"""Static costs of a training artifact folder at a chosen batch size.

Forward nodes are the nodes of the eval model (forward graph and loss); every
other node of the training model belongs to backward. A model with other dynamic
input axes than the batch (a text model's sequence) is counted at the lengths
given in `dims` (by the axis's name, e.g. `{"sequence": 128}`). A tensor is retained for
backward when a forward node (or the data) produces it and a backward node
reads its values; Shape and Size nodes read only metadata and run early, so
they keep nothing alive. Tensor shapes come from ONNX shape inference on the
eval model with the batch axis fixed; a gradient has its tensor's shape.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeplug.artifacts import read_report, stage_folders
from edgeplug.errors import EdgeplugError
from edgeplug.graph import GraphIndex, tensor_bytes
from edgeplug.layout import EVAL_MODEL, FORWARD_MODEL, TRAINING_MODEL
from edgeplug.optimizers import OPTIMIZER_STATES
from edgeplug.profiling.macs import forward_macs

METADATA_OPS = frozenset({"Shape", "Size"})


@dataclasses.dataclass(frozen=True)
class RetainedTensor:
    """A forward tensor that backward reads, so it stays in memory across the step."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    producer: str
    consumers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class NodeCost:
    """One forward node: its MACs, the MACs of its gradients, and the bytes it leaves for backward."""

    name: str
    op_type: str
    forward_macs: int
    backward_macs: int
    retained_bytes: int


@dataclasses.dataclass(frozen=True)
class StaticProfile:
    """Counted, not measured: bytes and MACs of one training step at `batch_size`."""

    batch_size: int
    optimizer: str
    parameter_bytes: int
    trainable_parameter_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    retained_activation_bytes: int
    forward_macs: int
    backward_macs: int
    nodes: tuple[NodeCost, ...]
    retained: tuple[RetainedTensor, ...]
    unknown_shapes: tuple[str, ...]
    dims: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """Lengths of the named dynamic input axes (other than the batch) the counts were made at."""

    @property
    def total_training_bytes(self) -> int:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_state_bytes + self.retained_activation_bytes

    def to_dict(self) -> dict[str, Any]:
        document = dataclasses.asdict(self)
        document["dims"] = dict(self.dims)
        document["total_training_bytes"] = self.total_training_bytes
        return document


def static_profile(artifact_dir: str | Path, batch_size: int = 16, dims: Mapping[str, int] | None = None) -> StaticProfile:
    """Count parameter, gradient, optimizer-state and retained-activation bytes, and MACs.

    `dims`: the length of every named dynamic axis of the data inputs besides the batch (a text
    model's `sequence`); an EdgeplugError names the axes it needs and does not have.

    A staged folder is the sum of its stages, except retained activations: the stages
    train one after another, so the largest stage's retained bytes are the peak.
    Node and tensor names then carry their stage's folder (`stages/0/conv1`).
    """
    if batch_size < 1:
        raise EdgeplugError("batch size must be at least 1")
    dims = dict(dims or {})
    for name, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EdgeplugError(f"the length of axis '{name}' must be a whole number, at least 1, not {value!r}")
    artifact_dir = Path(artifact_dir)
    report = read_report(artifact_dir)
    _check_dims(report, dims)
    if report.get("stages"):
        return _staged_profile(artifact_dir, report, batch_size, dims)
    return _folder_profile(artifact_dir, report, batch_size, dims)


def dynamic_axes(report: Mapping[str, Any]) -> dict[str, list[str]]:
    """Named dynamic axes of the data inputs besides the batch: axis name -> the inputs that have it."""
    found: dict[str, list[str]] = {}
    for spec in report["training"]["inputs"]:
        for axis, dim in enumerate(spec["shape"]):
            if axis > 0 and isinstance(dim, str) and dim:
                found.setdefault(dim, []).append(spec["name"])
    return found


def _check_dims(report: Mapping[str, Any], dims: Mapping[str, int]) -> None:
    missing = {name: inputs for name, inputs in dynamic_axes(report).items() if name not in dims}
    if missing:
        named = "; ".join(f"'{name}' (of {', '.join(inputs)})" for name, inputs in missing.items())
        example = " ".join(f"--dim {name}=128" for name in missing)
        raise EdgeplugError(f"the model's inputs have dynamic axes besides the batch: {named}; give their lengths "
                            f"({example} with edgeplug profile, or dims={{{', '.join(repr(n) + ': 128' for n in missing)}}})")


def _staged_profile(artifact_dir: Path, report: dict[str, Any], batch_size: int, dims: Mapping[str, int]) -> StaticProfile:
    parts = [(stage["dir"], _folder_profile(folder, read_report(folder), batch_size, dims))
             for stage, folder in zip(report["stages"], stage_folders(artifact_dir, report), strict=True)]
    profiles = [profile for _, profile in parts]

    def total(field: str) -> int:
        return sum(int(getattr(profile, field)) for profile in profiles)

    return StaticProfile(
        batch_size=batch_size,
        optimizer=report["training"]["optimizer"],
        parameter_bytes=total("parameter_bytes"),
        trainable_parameter_bytes=total("trainable_parameter_bytes"),
        gradient_bytes=total("gradient_bytes"),
        optimizer_state_bytes=total("optimizer_state_bytes"),
        retained_activation_bytes=max(profile.retained_activation_bytes for profile in profiles),
        forward_macs=total("forward_macs"),
        backward_macs=total("backward_macs"),
        nodes=tuple(dataclasses.replace(node, name=f"{where}/{node.name}") for where, profile in parts for node in profile.nodes),
        retained=tuple(sorted((dataclasses.replace(tensor, name=f"{where}/{tensor.name}") for where, profile in parts
                               for tensor in profile.retained), key=lambda t: -t.bytes)),
        unknown_shapes=tuple(f"{where}/{name}" for where, profile in parts for name in profile.unknown_shapes),
        dims=dict(dims),
    )


def _folder_profile(artifact_dir: Path, report: dict[str, Any], batch_size: int, dims: Mapping[str, int]) -> StaticProfile:
    training = onnx.load(str(artifact_dir / TRAINING_MODEL))
    evaluation = onnx.load(str(artifact_dir / EVAL_MODEL))
    forward = onnx.load(str(artifact_dir / FORWARD_MODEL))
    optimizer = report["training"]["optimizer"]

    sizes = {t.name: tensor_bytes(t) for t in forward.graph.initializer}
    trainable = set(report["parameters"]["trainable"])
    parameter_bytes = sum(sizes.values())
    trainable_bytes = sum(sizes[name] for name in trainable if name in sizes)

    data_inputs = {i["name"] for i in report["training"]["inputs"] + report["training"].get("extra_inputs", [])}
    data_inputs.add(report["training"]["labels_input"])
    shapes, dtypes = forward_shapes(evaluation, data_inputs, batch_size, dims)

    overrides = pass_costs(report, batch_size)
    for name, kept_shape in overrides.tensors.items():
        shapes[name] = kept_shape
        dtypes[name] = np.dtype(np.float32)

    backward_names = _backward_node_names(training)
    forward_nodes = [node for node in training.graph.node if node.name not in backward_names]
    backward_nodes = [node for node in training.graph.node if node.name in backward_names]
    produced_by = {out: node.name for node in forward_nodes for out in node.output if out}
    _add_runtime_op_shapes(forward_nodes, shapes, dtypes)
    constants = {t.name for t in training.graph.initializer} | set(sizes)

    readers: dict[str, list[str]] = {}
    for node in backward_nodes:
        if node.op_type in METADATA_OPS:
            continue
        for name in node.input:
            if name and name not in constants and (name in produced_by or name in data_inputs):
                readers.setdefault(name, []).append(node.name)

    retained: list[RetainedTensor] = []
    unknown: list[str] = []
    for name, consumers in readers.items():
        if name not in overrides.tensors and produced_by.get(name, "").startswith(overrides.accounted or ("\0",)):
            continue  # a view or small helper of what a pass keeps: its own list (`tensors`) counts the bytes
        shape = shapes.get(name)
        if shape is None:
            unknown.append(name)
            continue
        dtype = dtypes[name]
        retained.append(RetainedTensor(name, shape, dtype.name, math.prod(shape) * dtype.itemsize,
                                       produced_by.get(name, "<input>"), tuple(consumers)))

    gradients = {out for node in backward_nodes for out in node.output if out.endswith("_grad")}
    retained_by_producer: dict[str, int] = {}
    for tensor in retained:
        retained_by_producer[tensor.producer] = retained_by_producer.get(tensor.producer, 0) + tensor.bytes
    nodes = []
    for node in forward_nodes:
        if node.name.startswith(overrides.accounted):
            continue  # a pass's own forward nodes: their cost is in the layer's override below
        macs = forward_macs(node, shapes)
        if macs is None:
            unknown.append(node.output[0])
            macs = 0
        needed = sum(1 for name in node.input[:2] if name and f"{name}_grad" in gradients) if macs else 0
        backward, extra = overrides.nodes.get(node.name, (macs * needed, 0))
        retained_here = retained_by_producer.get(node.name, 0) + sum(
            size for producer, size in retained_by_producer.items() if overrides.owned.get(node.name) and producer.startswith(overrides.owned[node.name]))
        nodes.append(NodeCost(node.name, node.op_type, macs + extra, backward, retained_here))

    return StaticProfile(
        batch_size=batch_size,
        optimizer=optimizer,
        parameter_bytes=parameter_bytes,
        trainable_parameter_bytes=trainable_bytes,
        gradient_bytes=trainable_bytes,
        optimizer_state_bytes=trainable_bytes * OPTIMIZER_STATES.get(optimizer, 0),
        retained_activation_bytes=sum(t.bytes for t in retained),
        forward_macs=sum(n.forward_macs for n in nodes),
        backward_macs=sum(n.backward_macs for n in nodes),
        nodes=tuple(nodes),
        retained=tuple(sorted(retained, key=lambda t: -t.bytes)),
        unknown_shapes=tuple(sorted(set(unknown))),
        dims=dict(dims),
    )


@dataclasses.dataclass(frozen=True)
class PassCosts:
    """What passes that rewrite the training graph say it really costs (`details.static_costs` in their report
    entry): per layer node (backward MACs, extra forward MACs), the shapes of the tensors they keep for
    backward (which exist only in the training graph), and the name prefixes of their own forward nodes."""

    nodes: dict[str, tuple[int, int]]
    tensors: dict[str, tuple[int, ...]]
    accounted: tuple[str, ...]
    owned: dict[str, tuple[str, ...]]  # layer node -> prefixes of the nodes that produce what it keeps


def pass_costs(report: dict[str, Any], batch_size: int) -> PassCosts:
    """Collect `static_costs` from every pass entry, scaled from the pass's batch size to `batch_size`.

    A pass writes {"batch_size": B, "nodes": {node: {"backward_macs", "forward_extra_macs"}}, "tensors":
    {name: shape ("batch" for an axis that follows the batch)}, "node_prefixes": [...]} (docs/plugin-guide.md).
    MACs are scaled linearly with the batch, an approximation where a term does not depend on it."""
    nodes: dict[str, tuple[int, int]] = {}
    tensors: dict[str, tuple[int, ...]] = {}
    prefixes: list[str] = []
    owned: dict[str, tuple[str, ...]] = {}
    for entry in report.get("passes", []):
        costs = (entry.get("details") or {}).get("static_costs")
        if not isinstance(costs, dict):
            continue
        scale = batch_size / max(int(costs.get("batch_size") or batch_size), 1)
        for name, cost in costs.get("nodes", {}).items():
            nodes[name] = (round(cost.get("backward_macs", 0) * scale), round(cost.get("forward_extra_macs", 0) * scale))
        for name, shape in costs.get("tensors", {}).items():
            tensors[name] = tuple(batch_size if size == "batch" else int(size) for size in shape)
        prefixes += costs.get("node_prefixes", [])
    for name in nodes:
        owned[name] = tuple(prefix for prefix in prefixes if prefix.startswith(f"{name}."))
    return PassCosts(nodes, tensors, tuple(prefixes), owned)


def _backward_node_names(training: onnx.ModelProto) -> set[str]:
    """Nodes that run the backward pass: those fed by the loss's gradient seed, gradient
    builders' helpers (named `<node>_Grad/...`) and gradient accumulators.

    Not "whatever the eval model lacks": onnxruntime-training renames some forward
    nodes (Concat becomes `.../ConcatReplacement/`).
    """
    loss = training.graph.output[0].name
    index = GraphIndex(training)
    names = index.descendants([f"{loss}_grad"], float_only=False)
    names |= {node.name for node in training.graph.node if "_Grad/" in node.name or node.op_type == "InPlaceAccumulatorV2"}
    return names


def _add_runtime_op_shapes(nodes: list[onnx.NodeProto], shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype[Any]]) -> None:
    """Shapes of outputs that only the training graph's replacement ops have.

    BatchNormInternal (batch-statistics batch norm) saves the batch mean and inverse
    standard deviation for backward: one value per channel, like its scale.
    """
    for node in nodes:
        if node.op_type == "BatchNormInternal" and node.input[1] in shapes:
            for name in node.output[1:]:
                if name and name not in shapes:
                    shapes[name] = shapes[node.input[1]]
                    dtypes[name] = dtypes.get(node.input[1], np.dtype(np.float32))


def forward_shapes(evaluation: onnx.ModelProto, data_inputs: set[str], batch_size: int,
                   dims: Mapping[str, int] | None = None) -> tuple[dict[str, tuple[int, ...]], dict[str, np.dtype[Any]]]:
    """Shapes and dtypes of every tensor of the eval graph with the batch axis set, and the other
    dynamic axes of the data inputs that `dims` names (by axis name) set to those lengths."""
    model = onnx.ModelProto()
    model.CopyFrom(evaluation)
    lengths = dict(dims or {})
    for value in model.graph.input:
        shape = value.type.tensor_type.shape.dim
        if value.name not in data_inputs:
            continue
        for axis, dim in enumerate(shape):
            if dim.HasField("dim_value"):
                continue
            if axis == 0:
                dim.dim_value = batch_size
            elif dim.dim_param in lengths:
                dim.dim_value = lengths[dim.dim_param]
    del model.graph.value_info[:]
    _fold_constants(model)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError) as error:
        raise EdgeplugError(f"shape inference on the eval model failed: {error}") from None
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, np.dtype[Any]] = {}
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        tensor = value.type.tensor_type
        if not tensor.elem_type:
            continue
        dtypes[value.name] = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        if tensor.HasField("shape") and all(d.HasField("dim_value") for d in tensor.shape.dim):
            shapes[value.name] = tuple(int(d.dim_value) for d in tensor.shape.dim)
    for tensor in model.graph.initializer:
        shapes[tensor.name] = tuple(int(d) for d in tensor.dims)
        dtypes[tensor.name] = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return shapes, dtypes


def _fold_constants(model: onnx.ModelProto) -> None:
    """Evaluate nodes that depend on constants only, so shape inference sees their values.

    Exporters compute pad sizes and shapes with constant chains (Slice with negative
    steps, Transpose of data) that ONNX's data propagation cannot follow.
    """
    known = {t.name for t in model.graph.initializer}
    foldable = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type.startswith("Random"):
            continue
        if all(not name or name in known for name in node.input):
            foldable.append(node)
            known.update(name for name in node.output if name)
    if not foldable:
        return
    folded_outputs = {name for node in foldable for name in node.output if name}
    needed = sorted({name for node in model.graph.node if node not in foldable for name in node.input if name in folded_outputs}
                    | {value.name for value in model.graph.output if value.name in folded_outputs})
    if not needed:
        return
    sub = onnx.helper.make_graph(
        foldable, "constants", [], [onnx.helper.make_empty_tensor_value_info(name) for name in needed], list(model.graph.initializer)
    )
    submodel = onnx.helper.make_model(sub, opset_imports=list(model.opset_import))
    submodel.ir_version = model.ir_version
    values = _evaluate_constants(submodel)
    if values is None:
        return
    kept = [node for node in model.graph.node if node not in foldable]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    for name, value in zip(needed, values, strict=True):
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))



def _evaluate_constants(model: onnx.ModelProto) -> list[Any] | None:
    """The outputs of an input-less model: onnxruntime (loaded anyway, fast), else onnx's reference
    evaluator (whose first import alone takes ~2 s), else None."""
    try:
        from edgeplug import _ort

        runtime = _ort.inference_runtime()
        options = runtime.SessionOptions()
        options.log_severity_level = 3
        session = runtime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return list(session.run(None, {}))
    except Exception:  # noqa: BLE001 - an op or type onnxruntime does not run: try the reference evaluator
        pass
    try:
        from onnx.reference import ReferenceEvaluator

        return list(ReferenceEvaluator(model).run(None, {}))
    except Exception:  # folding is an aid to shape inference, never a requirement
        return None
