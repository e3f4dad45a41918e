"""ONNX graphs of the fast domain adaptor (FDA): anchor summary -> slot values.

The generator is an MLP on the standardised anchor summary whose output, cut per
slot, is a residual on the slot's original value: value = default + delta * scale,
with the last layer initialised to zero so that an untrained generator is exactly
"no adaptation". The same nodes serve two graphs: standalone (what the cloud runs
to personalise) and joined in front of the frozen device model (what it trains).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeplug.plugin_api import GraphEditor, clamp_ir_version, remove_unused, replace_nodes

from .manifest import Manifest, Slot
from .model_facts import inferred_shapes

SUMMARY = "anchor_summary"
PREFIX = "personalize.generator"
OPSET = 17


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each parameter slot sits in the generator's output vector."""

    slots: tuple[Slot, ...]
    offsets: tuple[int, ...]
    scales: tuple[float, ...]
    summary_mean: np.ndarray
    summary_std: np.ndarray
    hidden: int

    @property
    def width(self) -> int:
        return sum(s.size for s in self.slots)


def layout_for(manifest: Manifest, defaults: Mapping[str, np.ndarray], summaries: np.ndarray, hidden: int) -> Layout:
    slots = manifest.parameter_slots()
    offsets, position = [], 0
    for slot in slots:
        offsets.append(position)
        position += slot.size
    scales = tuple(max(float(np.sqrt(np.mean(defaults[s.name].astype(np.float64) ** 2))), 0.05) for s in slots)
    std = summaries.std(axis=0)
    return Layout(slots, tuple(offsets), scales, summaries.mean(axis=0).astype(np.float32),
                  np.where(std > 1e-6, std, 1.0).astype(np.float32), hidden)


def initial_parameters(layout: Layout, seed: int) -> dict[str, np.ndarray]:
    """He-initialised hidden layers; the output layer starts at zero (generated = defaults)."""
    rng = np.random.default_rng(seed)
    width_in = len(layout.summary_mean)
    h = layout.hidden
    return {
        f"{PREFIX}.fc0.weight": (rng.standard_normal((width_in, h)) * np.sqrt(2.0 / width_in)).astype(np.float32),
        f"{PREFIX}.fc0.bias": np.zeros(h, np.float32),
        f"{PREFIX}.fc1.weight": (rng.standard_normal((h, h)) * np.sqrt(2.0 / h)).astype(np.float32),
        f"{PREFIX}.fc1.bias": np.zeros(h, np.float32),
        f"{PREFIX}.out.weight": np.zeros((h, layout.width), np.float32),
        f"{PREFIX}.out.bias": np.zeros(layout.width, np.float32),
    }


def _generator_nodes(editor: GraphEditor, layout: Layout, defaults: Mapping[str, np.ndarray],
                     outputs: Mapping[str, str]) -> list[onnx.NodeProto]:
    """Nodes from SUMMARY to one tensor per slot (named by `outputs`); parameters are initializers named PREFIX.*."""
    z = editor.node("Sub", [SUMMARY, editor.constant(f"{PREFIX}.summary_mean", layout.summary_mean[None])], f"{PREFIX}.centred")
    z = editor.node("Div", [z, editor.constant(f"{PREFIX}.summary_std", layout.summary_std[None])], f"{PREFIX}.standardised")
    for layer in ("fc0", "fc1"):
        z = editor.node("Gemm", [z, f"{PREFIX}.{layer}.weight", f"{PREFIX}.{layer}.bias"], f"{PREFIX}.{layer}")
        z = editor.node("Relu", [z], f"{PREFIX}.{layer}.relu")
    delta = editor.node("Gemm", [z, f"{PREFIX}.out.weight", f"{PREFIX}.out.bias"], f"{PREFIX}.delta")
    nodes = editor.take_nodes()
    for slot, offset, scale in zip(layout.slots, layout.offsets, layout.scales):
        base = f"{PREFIX}.{slot.name}"
        starts = editor.constant(f"{base}.start", np.array([offset], np.int64))
        ends = editor.constant(f"{base}.end", np.array([offset + slot.size], np.int64))
        axes = editor.constant(f"{base}.axis", np.array([1], np.int64))
        piece = editor.node("Slice", [delta, starts, ends, axes], f"{base}.piece")
        shaped = editor.node("Reshape", [piece, editor.constant(f"{base}.shape", np.array(slot.shape, np.int64))], f"{base}.shaped")
        scaled = editor.node("Mul", [shaped, editor.constant(f"{base}.scale", np.array(scale, np.float32))], f"{base}.scaled")
        editor.node("Add", [scaled, editor.constant(f"{base}.default", defaults[slot.name].astype(np.float32))], f"{base}.value")
        built = editor.take_nodes()
        built[-1].output[0] = outputs[slot.name]
        nodes += built
    return nodes


def standalone_model(layout: Layout, defaults: Mapping[str, np.ndarray], parameters: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """summary[1, S] -> one output per parameter slot, named as the slot."""
    graph = helper.make_graph([], "personalize_generator", [], [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeplug-personalize")
    editor = GraphEditor(model)
    names = {slot.name: slot.name for slot in layout.slots}
    for name in names:
        editor.fresh(name)  # reserve: the outputs carry the slot names
    nodes = _generator_nodes(editor, layout, defaults, names)
    model.graph.node.extend(nodes)
    model.graph.input.append(helper.make_tensor_value_info(SUMMARY, TensorProto.FLOAT, [1, len(layout.summary_mean)]))
    model.graph.initializer.extend(numpy_helper.from_array(v, n) for n, v in parameters.items())
    for slot in layout.slots:
        model.graph.output.append(helper.make_tensor_value_info(slot.name, TensorProto.FLOAT, list(slot.shape)))
    clamp_ir_version(model)
    onnx.checker.check_model(model)
    return model


def joined_model(device: onnx.ModelProto, manifest: Manifest, layout: Layout, defaults: Mapping[str, np.ndarray],
                 parameters: Mapping[str, np.ndarray], *, device_statistics: bool) -> onnx.ModelProto:
    """Generator in front of the device model: inputs (x, summary[, statistics]), output logits; only PREFIX.* may train.

    Parameter slots stop being initializers and become generator outputs; batch norms
    become inference-mode arithmetic so the training graph uses the given statistics
    (onnxruntime-training would otherwise normalise with batch statistics). With
    `device_statistics` the statistics slots stay graph inputs, fed per step with the
    values the device re-estimates on its own samples.
    """
    model = onnx.ModelProto()
    model.CopyFrom(device)
    statistics = {slot.name for slot in manifest.slots if slot.role == "statistics"} if device_statistics else set()
    slot_names = {slot.name for slot in manifest.slots} - statistics
    generated = {slot.name for slot in layout.slots}
    graph = model.graph
    kept_inputs = [i for i in graph.input if i.name not in slot_names]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    graph.input.append(helper.make_tensor_value_info(SUMMARY, TensorProto.FLOAT, [1, len(layout.summary_mean)]))
    kept_outputs = [o for o in graph.output if o.name == manifest.output]
    del graph.output[:]
    graph.output.extend(kept_outputs)
    kept = [t for t in graph.initializer if t.name not in generated | statistics]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    editor = GraphEditor(model)
    _inference_batch_norms(model, editor, {name: len(shape) for name, shape in inferred_shapes(device).items()})
    remove_unused(model)
    nodes = _generator_nodes(editor, layout, defaults, {name: name for name in generated})
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + body)
    graph.initializer.extend(numpy_helper.from_array(v, n) for n, v in parameters.items())
    clamp_ir_version(model)
    onnx.checker.check_model(model)
    return model


def _inference_batch_norms(model: onnx.ModelProto, editor: GraphEditor, ranks: Mapping[str, int]) -> None:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    replacements: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        x, scale, bias, mean, var = node.input[:5]
        epsilon = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "epsilon"), 1e-5)
        broadcast = (1, -1) + (1,) * (ranks.get(x, 4) - 2)
        shape = editor.constant(f"{node.name}.channel_shape", np.array(broadcast, np.int64))
        if mean in values and var in values:  # constants: fold 1/sqrt(var + eps) now
            inv_std = 1.0 / np.sqrt(values[var].astype(np.float64) + epsilon)
            mean_b = editor.constant(f"{node.name}.mean", values[mean].reshape(broadcast).astype(np.float32))
            inv_std_b = editor.constant(f"{node.name}.inv_std", inv_std.reshape(broadcast).astype(np.float32))
        else:  # fed per step
            mean_b = editor.node("Reshape", [mean, shape], f"{node.name}.mean_b")
            std = editor.node("Sqrt", [editor.node("Add", [var, editor.constant(f"{node.name}.epsilon", np.array(epsilon, np.float32))],
                                                   f"{node.name}.var_eps")], f"{node.name}.std")
            inv_std_b = editor.node("Reshape", [editor.node("Reciprocal", [std], f"{node.name}.inv_std"), shape], f"{node.name}.inv_std_b")
        centred = editor.node("Sub", [x, mean_b], f"{node.name}.centred")
        normalised = editor.node("Mul", [centred, inv_std_b], f"{node.name}.normalised")
        scaled = editor.node("Mul", [normalised, editor.node("Reshape", [scale, shape], f"{node.name}.scale_b")], f"{node.name}.scaled")
        editor.node("Add", [scaled, editor.node("Reshape", [bias, shape], f"{node.name}.bias_b")], f"{node.name}.out")
        replacements[node.name] = editor.take_replacement(node)
    replace_nodes(model, replacements)
