"""The device contract: what any training runtime needs to know about an artifact folder.

`edgeplug rewrite` calls `write_device_files` once per artifact set (the folder, or
each stage) after the passes ran, and `device_runtime` once for the folder; the
result goes to report.json `device_runtime` (docs/device-runtime.md explains every
field). Besides the four onnxruntime-training files, each artifact set gets:

- `training_model_gradients.onnx`: the training model with each trainable
  parameter's gradient as an extra output `gradient/<name>`;
- `optimizer_step.onnx`: the optimizer model with plain tensor inputs and outputs
  (one per parameter instead of tensor sequences), so that a runtime can run the
  update itself with the same onnxruntime kernel;
- `carried_state.safetensors`: initial values of the step-carried state.

The first two are for runtimes whose training API lacks a learning-rate setter or
checkpoint saving: onnxruntime-web 1.19.2 has neither, so the JavaScript runtime
keeps parameters and optimizer moments itself. Runtimes with the full API (Python,
C, C++, Java/Kotlin, Swift) use the standard files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from edgeplug import tensorfile
from edgeplug.layout import (
    CARRIED_STATE_FILE,
    CHECKPOINT,
    EVAL_MODEL,
    GRADIENTS_MODEL,
    LABELS_INPUT,
    OPTIMIZER_MODEL,
    OPTIMIZER_STEP_MODEL,
    STATE_EVAL_MODEL,
    TRAINING_MODEL,
)
from edgeplug.memory_settings import recipe_memory, switches
from edgeplug.modelio import save_model
from edgeplug.passes import OTHER_BATCH_RULES, CarriedState, TrainingModels

CONTRACT_VERSION = 1
GRADIENT_PREFIX = "gradient/"
UPDATED_OUTPUT = "updated_parameters"
# ops that update frozen parameters in place while training: op -> indices of those inputs
_IN_PLACE_UPDATES = {"BatchNormInternal": (3, 4)}  # running mean and variance
_BUFFER_SUFFIX = "_grad.accumulation.buffer"
_RESET_INPUT = "lazy_reset_grad"
_ACCUMULATOR = "InPlaceAccumulatorV2"

# optimizer op -> {index of a sequence input that the step updates: index of the optional output with its new value}
_UPDATED_OUTPUTS: dict[str, dict[int, int]] = {
    "AdamWOptimizer": {2: 1, 4: 2, 5: 3},  # weights, first and second moments
    "SGDOptimizerV2": {1: 1, 3: 2},  # weights, momentums
}


def check_carried(carried: Sequence[CarriedState], models: TrainingModels) -> str | None:
    """Why the declared carried state does not fit the training model, or None."""
    inputs = {value.name: value for value in models.training.graph.input}
    outputs = {value.name: value for value in models.training.graph.output}
    seen: set[str] = set()
    for state in carried:
        if not isinstance(state, CarriedState):
            return f"carried holds {type(state).__name__}, expected CarriedState"
        if state.input in seen:
            return f"carried state for input {state.input!r} is declared twice"
        seen.add(state.input)
        if state.input not in inputs or state.input == LABELS_INPUT:
            return f"carried state input {state.input!r} is not an input of the training model"
        if state.output not in outputs:
            return f"carried state output {state.output!r} is not an output of the training model"
        if state.other_batch not in OTHER_BATCH_RULES:
            return f"carried state {state.input!r}: other_batch must be one of {', '.join(OTHER_BATCH_RULES)}"
        initial = np.asarray(state.initial)
        if state.batch_axis is not None and not 0 <= state.batch_axis < initial.ndim:
            return f"carried state {state.input!r}: batch_axis {state.batch_axis} is not an axis of its {initial.ndim}-d value"
        if state.other_batch == "identity" and state.batch_axis is not None and initial.ndim != 2:
            return f"carried state {state.input!r}: other_batch 'identity' needs a 2-d value"
        for label, value in (("input", inputs[state.input]), ("output", outputs[state.output])):
            described = _describe(value)
            if described["dtype"] != initial.dtype.name:
                return f"carried state {state.input!r}: initial value is {initial.dtype.name}, the {label} is {described['dtype']}"
            fixed = [(axis, dim) for axis, dim in enumerate(described["shape"]) if isinstance(dim, int) and dim > 0]
            if len(described["shape"]) != initial.ndim or any(initial.shape[axis] != dim for axis, dim in fixed):
                return f"carried state {state.input!r}: initial shape {list(initial.shape)} does not fit the {label}'s {described['shape']}"
    return None


def write_device_files(folder: Path, models: TrainingModels, parameter_names: set[str], trainable: Sequence[str],
                       *, output: str, passes_on: Sequence[str] = (), relative_dir: str = ".") -> dict[str, Any]:
    """Write the portable models and carried state into `folder`; return its `artifact_sets` entry."""
    training, evaluation = models.training, models.eval
    parameters = [value for value in training.graph.input if value.name in parameter_names]
    trainable_set = set(trainable)
    known = parameter_names | {_RESET_INPUT}
    train_inputs = [v.name for v in training.graph.input if v.name not in known and not v.name.endswith(_BUFFER_SUFFIX)]
    train_outputs = [v.name for v in training.graph.output if not v.name.endswith("_grad.accumulation.out")]
    eval_inputs = [v.name for v in evaluation.graph.input if v.name not in parameter_names]
    eval_outputs = [v.name for v in evaluation.graph.output]
    carried = []
    for state in models.carried:
        initial = np.asarray(state.initial)
        carried.append({"input": state.input, "output": state.output, "dtype": initial.dtype.name,
                        "shape": list(initial.shape), "batch_axis": state.batch_axis, "other_batch": state.other_batch,
                        "eval": state.input in eval_inputs})
    if models.carried:
        tensorfile.save(folder / CARRIED_STATE_FILE, {s.input: np.ascontiguousarray(s.initial) for s in models.carried},
                        {"format": "edgeplug-carried-state"})
    entry: dict[str, Any] = {
        "dir": relative_dir,
        "training_model": TRAINING_MODEL,
        "eval_model": EVAL_MODEL,
        "optimizer_model": OPTIMIZER_MODEL,
        "checkpoint": CHECKPOINT,
        "train_inputs": train_inputs,
        "train_outputs": train_outputs,
        "eval_inputs": eval_inputs,
        "eval_outputs": eval_outputs,
        "loss_output": train_outputs[0],
        "output": output,
        "passes_on": list(passes_on),
        "parameters": [{**_describe(value), "trainable": value.name in trainable_set} for value in parameters],
        "carried_state": carried,
        "carried_state_file": CARRIED_STATE_FILE if carried else None,
        "portable": None,
        "portable_missing_because": None,
    }
    ordered = [value.name for value in parameters if value.name in trainable_set]
    try:
        gradients = gradients_model(training, ordered)
        step, step_info = optimizer_step_model(models.optimizer, [_describe(v) for v in parameters if v.name in trainable_set])
    except _NotPortable as reason:
        entry["portable_missing_because"] = str(reason)
        return entry
    save_model(gradients, folder / GRADIENTS_MODEL)
    save_model(step, folder / OPTIMIZER_STEP_MODEL)
    updated = updated_in_place(training, parameter_names - trainable_set)
    if updated:
        save_model(state_eval_model(evaluation, updated), folder / STATE_EVAL_MODEL)
    entry["portable"] = {
        "training_model": GRADIENTS_MODEL,
        "gradient_outputs": [GRADIENT_PREFIX + name for name in ordered],
        "optimizer_step_model": OPTIMIZER_STEP_MODEL,
        **step_info,
        "updated_parameters": updated,
        "state_eval_model": STATE_EVAL_MODEL if updated else None,
        "updated_output": UPDATED_OUTPUT if updated else None,
    }
    return entry


def updated_in_place(training: onnx.ModelProto, frozen: set[str]) -> list[str]:
    """Frozen parameters the training graph overwrites while it runs (batch-norm running statistics in
    training mode), in graph order: a runtime must save them with the trained parameters."""
    found: list[str] = []
    for node in training.graph.node:
        for index in _IN_PLACE_UPDATES.get(node.op_type, ()):
            if index < len(node.input) and node.input[index] in frozen and node.input[index] not in found:
                found.append(node.input[index])
    return found


def state_eval_model(evaluation: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """The eval model with one more output, `updated_parameters`: the current values of parameters
    `names`, flattened and concatenated in that order (float32).

    Reading them from the eval model leaves the training model as it is: a training-model output
    would stop onnxruntime from updating the statistic in place. One output, last: onnxruntime-web
    1.19.2 names eval results after the training model's outputs, so an eval model must not have
    more outputs than the training model (which has at least one gradient more).
    """
    model = onnx.ModelProto()
    model.CopyFrom(evaluation)
    types = {value.name: value.type.tensor_type.elem_type for value in evaluation.graph.input}
    missing = [name for name in names if name not in types]
    if missing or any(types[name] != onnx.TensorProto.FLOAT for name in names):
        raise _NotPortable(f"the eval model does not read {', '.join(missing[:3])}" if missing else "updated parameters must be float32")
    shape = f"{UPDATED_OUTPUT}_flat_shape"
    model.graph.node.append(helper.make_node("Constant", [], [shape], value=helper.make_tensor(shape, onnx.TensorProto.INT64, [1], [-1])))
    flat = []
    for number, name in enumerate(names):
        flat.append(f"{UPDATED_OUTPUT}_{number}")
        model.graph.node.append(helper.make_node("Reshape", [name, shape], [flat[-1]], name=f"edgeplug_flatten_{number}"))
    model.graph.node.append(helper.make_node("Concat", flat, [UPDATED_OUTPUT], axis=0, name="edgeplug_updated_parameters"))
    model.graph.output.append(helper.make_tensor_value_info(UPDATED_OUTPUT, onnx.TensorProto.FLOAT, [None]))
    return model


def device_runtime(report: Mapping[str, Any], recipe: Mapping[str, Any], sets: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """report.json `device_runtime`: everything a runtime in any language needs, and whether it needs Python."""
    training = report["training"]
    reasons = [f"pass '{entry['name']}' runs Python runtime hooks in the training loop (plugin '{entry['plugin']}')"
               for entry in report["passes"] if entry.get("runtime_hooks")]
    data_inputs = {spec["name"] for spec in training["inputs"]}
    for number, entry in enumerate(sets):
        fed = data_inputs | {LABELS_INPUT} | {s["input"] for s in entry["carried_state"]}
        fed |= {name for earlier in sets[:number] for name in earlier["passes_on"]}
        unfed = [name for name in entry["train_inputs"] if name not in fed]
        if unfed and not reasons:
            reasons.append(f"training inputs {', '.join(unfed)} are fed by Python runtime hooks")
    labels = _labels(training, report)
    optimizer = dict(recipe.get("optimizer") or {})
    return {
        "contract_version": CONTRACT_VERSION,
        "needs_python": bool(reasons),
        "needs_python_because": reasons,
        "data_inputs": training["inputs"],
        "labels": labels,
        "loss": training["loss"],
        "accuracy": "argmax" if training["loss"] == "cross-entropy" else None,
        "output": training["output"],
        "optimizer": {
            "name": optimizer.get("name", training["optimizer"]),
            "lr": float(optimizer.get("lr", training["lr"])),
            "schedule": optimizer.get("schedule") or {"name": "constant"},
        },
        "training": _training_sessions(recipe),
        "artifact_sets": list(sets),
    }


def _training_sessions(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe's training.memory and the onnxruntime session options it stands for."""
    memory = recipe_memory(recipe)
    return {"memory": memory, **dataclasses.asdict(switches(memory))}


def _labels(training: Mapping[str, Any], report: Mapping[str, Any]) -> dict[str, Any]:
    """The labels input: class indices for cross-entropy, else float targets shaped like the output."""
    if training["loss"] == "cross-entropy":
        return {"name": LABELS_INPUT, "dtype": "int64", "shape": [None]}
    return {"name": LABELS_INPUT, "dtype": "float32", "shape": training.get("output_shape") or [None]}


class _NotPortable(Exception):
    pass


def gradients_model(training: onnx.ModelProto, ordered: Sequence[str]) -> onnx.ModelProto:
    """The training model with output `gradient/<p>`: what its gradient accumulator adds to p's buffer."""
    added = {}
    for node in training.graph.node:
        if node.op_type == _ACCUMULATOR and node.input and node.input[0].endswith(_BUFFER_SUFFIX):
            added[node.input[0].removesuffix(_BUFFER_SUFFIX)] = node.input[1]
    missing = [name for name in ordered if name not in added]
    if missing:
        raise _NotPortable(f"the training model has no gradient accumulator for {', '.join(missing[:3])}")
    model = onnx.ModelProto()
    model.CopyFrom(training)
    types = {value.name: value.type.tensor_type.elem_type for value in training.graph.input}
    for name in ordered:
        model.graph.node.append(helper.make_node("Identity", [added[name]], [GRADIENT_PREFIX + name],
                                                 name=f"edgeplug_gradient_output_{name}"))
        model.graph.output.append(helper.make_tensor_value_info(GRADIENT_PREFIX + name, types[name], None))
    return model


def optimizer_step_model(optimizer: onnx.ModelProto, parameters: Sequence[Mapping[str, Any]]) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The optimizer model with tensor inputs `<sequence>.<k>` and outputs `<sequence>.<k>.new`.

    k is the parameter's place in the trainable buffer order. The same op with the same
    attributes runs, so the update is the one onnxruntime's own optimizer makes.
    """
    nodes = list(optimizer.graph.node)
    if len(nodes) != 1 or nodes[0].op_type not in _UPDATED_OUTPUTS:
        ops = ", ".join(sorted({node.op_type for node in nodes})) or "none"
        raise _NotPortable(f"the optimizer model's ops ({ops}) have no portable step")
    node = nodes[0]
    graph_inputs = {value.name: value for value in optimizer.graph.input}
    updated = _UPDATED_OUTPUTS[node.op_type]
    inputs, body, outputs = [], [], []
    scalars: list[dict[str, Any]] = []
    sequences, state = [], []
    for index, name in enumerate(node.input):
        if not name:
            continue
        value = graph_inputs.get(name)
        if value is None:
            raise _NotPortable(f"the optimizer op reads {name!r}, which is not a graph input")
        if value.type.HasField("tensor_type"):
            inputs.append(value)
            scalars.append(_describe(value))
            continue
        members = [f"{name}.{k}" for k in range(len(parameters))]
        for member, spec in zip(members, parameters, strict=True):
            dtype = helper.np_dtype_to_tensor_dtype(np.dtype(spec["dtype"]))
            inputs.append(helper.make_tensor_value_info(member, dtype, spec["shape"]))
        body.append(helper.make_node("SequenceConstruct", members, [name], name=f"edgeplug_pack_{name}"))
        sequences.append(name)
        if index in updated:
            state.append(name)
    op_outputs = ["updated_flag"] + [""] * max(updated.values())
    for index, output_index in updated.items():
        if index < len(node.input) and node.input[index]:
            op_outputs[output_index] = f"{node.input[index]}.updated"
    while op_outputs and not op_outputs[-1]:
        op_outputs.pop()
    step_node = helper.make_node(node.op_type, list(node.input), op_outputs, name=node.name or "optimizer", domain=node.domain)
    step_node.attribute.extend(node.attribute)
    body.append(step_node)
    outputs.append(helper.make_tensor_value_info("updated_flag", onnx.TensorProto.BOOL, None))
    for name in state:
        for k, spec in enumerate(parameters):
            index_name = f"{name}.{k}.index"
            body.append(helper.make_node("Constant", [], [index_name], value=helper.make_tensor(index_name, onnx.TensorProto.INT64, [], [k])))
            body.append(helper.make_node("SequenceAt", [f"{name}.updated", index_name], [f"{name}.{k}.new"]))
            dtype = helper.np_dtype_to_tensor_dtype(np.dtype(spec["dtype"]))
            outputs.append(helper.make_tensor_value_info(f"{name}.{k}.new", dtype, spec["shape"]))
    graph = helper.make_graph(body, "edgeplug_optimizer_step", inputs, outputs)
    model = helper.make_model(graph, opset_imports=list(optimizer.opset_import))
    model.ir_version = optimizer.ir_version
    return model, {"optimizer_op": node.op_type, "scalar_inputs": scalars, "sequences": sequences, "state": state,
                   "flag_output": "updated_flag"}


def _describe(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    return {
        "name": value.name,
        "dtype": helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "unknown",
        "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim],
    }
