"""Quantized models as QuantizeLinear/DequantizeLinear graphs, and a forward-only runner.

The *calibration graph* takes the integer weight codes and the batch-norm statistics
as graph inputs, so the device loop changes them between runs without rebuilding the
onnxruntime session; it can also return the float input of every quantized layer and
of every batch norm. The *export graph* bakes them in as initializers.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeplug.plugin_api import DataError, GraphIndex, ModelError, atomic_file, inference_runtime, write_text

from .layers import QuantLayer, batch_norms, find_layers, initializer_array
from .quantize import (
    ActivationGrid,
    WeightGrid,
    dequantize_weights,
    quantize_weights,
    weight_grid,
)

BATCH = 64


@dataclasses.dataclass
class QuantState:
    """Everything a quantized model is besides the float graph: grids, integer codes, norm statistics."""

    bits: int
    weight_grids: dict[str, WeightGrid]
    activation_grids: dict[str, ActivationGrid | None]
    codes: dict[str, np.ndarray]  # layer node -> int8 [out, fan_in]
    norm_stats: dict[str, tuple[np.ndarray, np.ndarray]]  # batch-norm node -> (mean, var)

    def copy(self) -> QuantState:
        return QuantState(self.bits, dict(self.weight_grids), dict(self.activation_grids),
                          {k: v.copy() for k, v in self.codes.items()},
                          {k: (m.copy(), v.copy()) for k, (m, v) in self.norm_stats.items()})

    def save(self, path: Path) -> None:
        arrays: dict[str, Any] = {}
        meta: dict[str, Any] = {"bits": self.bits, "activations": {}}
        for name, grid in self.weight_grids.items():
            arrays[f"scale/{name}"], arrays[f"zero_point/{name}"] = grid.scale, grid.zero_point
            arrays[f"codes/{name}"] = self.codes[name]
        for name, act in self.activation_grids.items():
            meta["activations"][name] = None if act is None else dataclasses.asdict(act)
        for name, (mean, var) in self.norm_stats.items():
            arrays[f"mean/{name}"], arrays[f"var/{name}"] = mean, var
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        with atomic_file(path) as staged, open(staged, "wb") as handle:
            np.savez(handle, **arrays)

    @classmethod
    def load(cls, path: Path) -> QuantState:
        if not path.is_file():
            raise DataError(f"quantized state not found: {path}; run 'edgeplug quantize' on the artifact folder first")
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        meta = json.loads(arrays["meta"].tobytes().decode())
        bits = int(meta["bits"])
        grids = {k.split("/", 1)[1]: WeightGrid(v, arrays["zero_point/" + k.split("/", 1)[1]], bits)
                 for k, v in arrays.items() if k.startswith("scale/")}
        acts = {k: None if v is None else ActivationGrid(**v) for k, v in meta["activations"].items()}
        codes = {name: arrays[f"codes/{name}"] for name in grids}
        stats = {k.split("/", 1)[1]: (v, arrays["var/" + k.split("/", 1)[1]]) for k, v in arrays.items() if k.startswith("mean/")}
        return cls(bits, grids, acts, codes, stats)


def codes_input(layer: QuantLayer) -> str:
    return f"{layer.weight}__qcodes"


def _qdq_graph(model: onnx.ModelProto, state: QuantState, *, bake: bool, probes: Iterable[str] = ()) -> onnx.ModelProto:
    """The float model with weights (and layer inputs) passed through Q/DQ at the state's grids."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    layers = find_layers(model)
    norms = {n.name: n for n in batch_norms(model)}
    stat_names = {n.input[i] for n in norms.values() for i in (3, 4)}
    weights = {layer.weight for layer in layers}
    kept = [t for t in graph.initializer if t.name not in weights and (bake or t.name not in stat_names)]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    prefix: list[onnx.NodeProto] = []
    renamed: dict[tuple[str, str], str] = {}
    for layer in layers:
        grid = state.weight_grids[layer.node]
        shape = layer.shape
        broadcast_axis = layer.axis
        scale, zero = f"{layer.weight}__scale", f"{layer.weight}__zero_point"
        graph.initializer.extend([numpy_helper.from_array(grid.scale, scale), numpy_helper.from_array(grid.zero_point, zero)])
        source = codes_input(layer)
        if bake:
            graph.initializer.append(numpy_helper.from_array(layer.from_matrix(state.codes[layer.node]), source))
        else:
            graph.input.append(helper.make_tensor_value_info(source, TensorProto.INT8, list(shape)))
        prefix.append(helper.make_node("DequantizeLinear", [source, scale, zero], [layer.weight],
                                       name=f"{layer.node}__weight_dq", axis=broadcast_axis))
        act = state.activation_grids.get(layer.node)
        if act is not None:
            base = f"{layer.node}__input"
            graph.initializer.extend([
                numpy_helper.from_array(np.array(act.low, np.float32), f"{base}_low"),
                numpy_helper.from_array(np.array(act.high, np.float32), f"{base}_high"),
                numpy_helper.from_array(np.array(act.scale, np.float32), f"{base}_scale"),
                numpy_helper.from_array(np.array(act.zero_point, np.uint8), f"{base}_zero_point"),
            ])
            renamed[(layer.node, layer.input)] = f"{base}_dq"
    nodes: list[onnx.NodeProto] = list(prefix)
    for node in graph.node:
        key = next((k for k in renamed if k[0] == node.name), None)
        if key is not None:
            base = f"{node.name}__input"
            nodes += [
                helper.make_node("Clip", [key[1], f"{base}_low", f"{base}_high"], [f"{base}_clipped"], name=f"{base}_clip"),
                helper.make_node("QuantizeLinear", [f"{base}_clipped", f"{base}_scale", f"{base}_zero_point"], [f"{base}_q"], name=f"{base}_q"),
                helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zero_point"], [f"{base}_dq"], name=f"{base}_dq"),
            ]
            node.input[0] = renamed[key]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    if bake:
        for name, (mean, var) in state.norm_stats.items():
            bn = norms[name]
            for tensor in graph.initializer:
                if tensor.name == bn.input[3]:
                    tensor.CopyFrom(numpy_helper.from_array(mean.astype(np.float32), bn.input[3]))
                elif tensor.name == bn.input[4]:
                    tensor.CopyFrom(numpy_helper.from_array(var.astype(np.float32), bn.input[4]))
    else:
        for bn in norms.values():
            channels = state.norm_stats[bn.name][0].shape
            for slot in (3, 4):
                graph.input.append(helper.make_tensor_value_info(bn.input[slot], TensorProto.FLOAT, list(channels)))
    existing = {o.name for o in graph.output}
    for name in probes:
        if name not in existing:
            graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
            existing.add(name)
    return out


def export_model(model: onnx.ModelProto, state: QuantState) -> onnx.ModelProto:
    """Inference model with int8 weight initializers; runs in plain onnxruntime."""
    exported = _qdq_graph(model, state, bake=True)
    onnx.checker.check_model(exported)
    return exported


def initial_state(model: onnx.ModelProto, bits: int) -> QuantState:
    """Weights on their per-channel grids, activations still float, stored statistics."""
    grids, codes = {}, {}
    index = GraphIndex(model)
    for layer in find_layers(model):
        matrix = layer.to_matrix(initializer_array(index, layer.weight))
        grids[layer.node] = weight_grid(matrix, bits)
        codes[layer.node] = quantize_weights(matrix, grids[layer.node])
    stats = {bn.name: (initializer_array(index, bn.input[3]), initializer_array(index, bn.input[4])) for bn in batch_norms(model)}
    return QuantState(bits, grids, {layer.node: None for layer in find_layers(model)}, codes, stats)


class QuantizedRunner:
    """Forward passes of a quantized model in plain onnxruntime; weights and statistics are fed per run."""

    def __init__(self, model: onnx.ModelProto, state: QuantState) -> None:
        self.model = model
        self.state = state
        self.layers = find_layers(model)
        self.norms = batch_norms(model)
        data_inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        if len(data_inputs) != 1:
            raise ModelError(f"qcore: the model must have one data input, it has {len(data_inputs)}: {data_inputs}")
        self.input_name = data_inputs[0]
        self.output_name = model.graph.output[0].name
        from .signals import aligned_outputs

        self.nodes = {n.name: n for n in model.graph.node}
        self.aligned = aligned_outputs(model, self.layers)
        probes = [layer.input for layer in self.layers] + [bn.input[0] for bn in self.norms] + [a.tensor for a in self.aligned.values()]
        graph = _qdq_graph(model, state, bake=False, probes=probes)
        ort = inference_runtime()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # no memory arena: the device loop runs a few batch sizes once per chunk, and an arena keeps
        # each run's peak (measured on HAPT: +35 MiB per calibration with it)
        options.enable_cpu_mem_arena = False
        self.session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def _feeds(self, x: np.ndarray) -> dict[str, np.ndarray]:
        feeds: dict[str, np.ndarray] = {self.input_name: x}
        for layer in self.layers:
            feeds[codes_input(layer)] = layer.from_matrix(self.state.codes[layer.node])
        for bn in self.norms:
            mean, var = self.state.norm_stats[bn.name]
            feeds[bn.input[3]], feeds[bn.input[4]] = mean.astype(np.float32), var.astype(np.float32)
        return feeds

    def run(self, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        """Named outputs over `x`, in batches, concatenated along the batch axis."""
        parts: list[list[np.ndarray]] = [[] for _ in outputs]
        for start in range(0, len(x), BATCH):
            values = self.session.run(outputs, self._feeds(x[start:start + BATCH]))
            for part, value in zip(parts, values):
                part.append(value)
        return [np.concatenate(p) for p in parts]

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.run(x, [self.output_name])[0]

    def correct(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.asarray(self.logits(x).argmax(axis=-1) == y)

    def refresh_norm_stats(self, x: np.ndarray, momentum: float = 1.0) -> None:
        """Batch-norm statistics of `x`, layer after layer (each sees the updated ones before it)."""
        for bn in self.norms:
            (value,) = self.run(x, [bn.input[0]])
            axes = tuple(i for i in range(value.ndim) if i != 1)
            mean, var = self.state.norm_stats[bn.name]
            new_mean, new_var = value.mean(axis=axes), value.var(axis=axes)
            self.state.norm_stats[bn.name] = ((1 - momentum) * mean + momentum * new_mean, (1 - momentum) * var + momentum * new_var)

    def channel_stats(self, x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per input channel mean and standard deviation of every quantized layer's float input on `x`."""
        inputs = self.layer_inputs(x)
        return {layer.node: channel_stats(layer, inputs[layer.node]) for layer in self.layers}

    def logits_and_inputs(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The output and every quantized layer's float input, from one pass."""
        logits, *values = self.run(x, [self.output_name, *(layer.input for layer in self.layers)])
        return logits, dict(zip([layer.node for layer in self.layers], values))

    def forward_all(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The output, every quantized layer's float input and every hidden layer's aligned output, from one pass."""
        names = [layer.input for layer in self.layers] + [a.tensor for a in self.aligned.values()]
        logits, *values = self.run(x, [self.output_name, *names])
        count = len(self.layers)
        inputs = dict(zip([layer.node for layer in self.layers], values[:count]))
        outputs = dict(zip(list(self.aligned), values[count:]))
        return logits, inputs, outputs

    def norm_gain(self, layer: str) -> np.ndarray | float:
        """d(aligned output)/d(layer output) per channel under the current statistics."""
        from .signals import norm_gain

        aligned = self.aligned[layer]
        if aligned.norm is None:
            return 1.0
        node = self.nodes[aligned.norm]
        return norm_gain(node, initializer_array(GraphIndex(self.model), node.input[1]), self.state.norm_stats[aligned.norm][1])

    def layer_inputs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip([layer.node for layer in self.layers], self.run(x, [layer.input for layer in self.layers])))


def dequantized_float_model(model: onnx.ModelProto, state: QuantState) -> onnx.ModelProto:
    """The float model with every quantized weight replaced by its dequantized value and current statistics."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    by_name = {layer.weight: layer for layer in find_layers(model)}
    norms = {bn.input[3]: (bn.name, 0) for bn in batch_norms(model)} | {bn.input[4]: (bn.name, 1) for bn in batch_norms(model)}
    for tensor in out.graph.initializer:
        if tensor.name in by_name:
            layer = by_name[tensor.name]
            value = layer.from_matrix(dequantize_weights(state.codes[layer.node], state.weight_grids[layer.node]))
            tensor.CopyFrom(numpy_helper.from_array(value.astype(np.float32), tensor.name))
        elif tensor.name in norms:
            node, which = norms[tensor.name]
            tensor.CopyFrom(numpy_helper.from_array(state.norm_stats[node][which].astype(np.float32), tensor.name))
    return out


def write_json(path: Path, value: Mapping[str, Any]) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def channel_stats(layer: QuantLayer, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation per input channel (axis 1 of a Conv input, the last axis otherwise)."""
    channels = value.reshape(value.shape[0], value.shape[1], -1) if layer.op_type == "Conv" else value.reshape(-1, value.shape[-1])[:, :, None]
    return channels.mean(axis=(0, 2)), channels.std(axis=(0, 2))
