"""Quantized models as QuantizeLinear/DequantizeLinear graphs, and a forward-only runner.

The *calibration graph* takes the integer weight codes and the batch-norm statistics
as graph inputs, so the device loop changes them between runs without rebuilding the
onnxruntime session; it can also return the float input of every quantized layer and
of every batch norm. The *export graph* bakes them in as initializers.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeplug.plugin_api import DataError, GraphIndex, ModelError, atomic_file, inference_runtime, write_text

from .examples import Examples, Inputs
from .examples import feeds as input_feeds
from .layers import QuantLayer, batch_norms, find_layers, initializer_array
from .quantize import (
    ActivationGrid,
    WeightGrid,
    dequantize_weights,
    quantize_weights,
    weight_grid,
)

BATCH = 16  # examples per forward pass: onnxruntime's buffers grow with it, its speed hardly does (HAPT 1D-CNN)


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


@dataclasses.dataclass
class Activations:
    """What a forward pass over a fixed set of examples left: the output and the probed tensors.

    The device loop keeps one of these for the coreset + chunk and, when one layer's codes change,
    recomputes only what lies after that layer (`QuantizedRunner.rerun_from`)."""

    logits: np.ndarray
    values: dict[str, np.ndarray]  # probed tensor name -> value over the examples

    def input_of(self, layer: QuantLayer) -> np.ndarray:
        return self.values[layer.input]

    def take(self, rows: np.ndarray) -> Activations:
        """The same activations for some of the examples only."""
        return Activations(self.logits[rows], {name: value[rows] for name, value in self.values.items()})


class QuantizedRunner:
    """Forward passes of a quantized model in plain onnxruntime; weights and statistics are fed per run.

    Sessions are built once: the whole calibration graph, and lazily a *suffix* per quantized layer
    (from the layer's input to the output: flips of one layer are judged without re-running the layers
    before it) and a *prefix* per batch norm (from the input to that norm's input: statistics are
    re-estimated without running the rest of the model). Batches are small (`batch`) and sessions run
    without memory arena or memory pattern, so a pass adds little to the device's resident memory.
    """

    def __init__(self, model: onnx.ModelProto, state: QuantState, *, probes: Iterable[str] | None = None,
                 threads: int | None = None, batch: int = BATCH) -> None:
        """`probes`: the tensors besides the output that runs may ask for (default: every quantized layer's
        input, every norm's input and every hidden layer's aligned output). onnxruntime keeps a graph output
        alive until the end of a run, so the device loop declares only those it reads."""
        self.model = model
        self.state = state
        self.batch = batch
        self.threads = threads
        self.layers = find_layers(model)
        self.norms = batch_norms(model)
        data_inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        if not data_inputs:
            raise ModelError("qcore: the model has no data input")
        # every data input is fed from the examples (an `Examples` for several, e.g. token ids + attention mask)
        self.input_names = data_inputs
        self.input_name = data_inputs[0]
        self.output_name = model.graph.output[0].name
        from .signals import aligned_outputs

        self.nodes = {n.name: n for n in model.graph.node}
        self.aligned = aligned_outputs(model, self.layers)
        every = [layer.input for layer in self.layers] + [bn.input[0] for bn in self.norms] + [a.tensor for a in self.aligned.values()]
        self.probes = list(dict.fromkeys(every if probes is None else probes))
        self.graph = _qdq_graph(model, state, bake=False, probes=self.probes)
        self.session = self._session(self.graph)
        self._suffixes: dict[str, tuple[Any, str, list[str]] | None] = {}
        self._prefixes: dict[str, Any] = {}

    def _session(self, graph: onnx.ModelProto) -> Any:
        ort = inference_runtime()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # no memory arena and no memory pattern: the device loop runs a few batch sizes once per chunk, and
        # both keep each run's peak (measured on HAPT: +35 MiB per calibration with the arena)
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        # basic graph optimisations only, for every session alike: onnxruntime 1.19.2's extended ones fail on a
        # suffix whose input feeds Clip -> QuantizeLinear ("RemoveNode ... should be unreachable"); on the whole
        # model they change neither the logits (bit for bit) nor the speed (measured on the HAPT 1D-CNN)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        return ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def _feeds(self, session: Any) -> dict[str, np.ndarray]:
        """Codes and statistics for every parameter input `session` declares."""
        wanted = {i.name for i in session.get_inputs()}
        feeds: dict[str, np.ndarray] = {}
        for layer in self.layers:
            if codes_input(layer) in wanted:
                feeds[codes_input(layer)] = layer.from_matrix(self.state.codes[layer.node])
        for bn in self.norms:
            mean, var = self.state.norm_stats[bn.name]
            if bn.input[3] in wanted:
                feeds[bn.input[3]], feeds[bn.input[4]] = mean.astype(np.float32), var.astype(np.float32)
        return feeds

    def run(self, x: Inputs, outputs: list[str], *, session: Any = None, input_name: str | None = None) -> list[np.ndarray]:
        """Named outputs over `x` (an array fed as `input_name` of `session`, default the whole model's input; or
        `Examples`, each array fed to the input of its name that the session declares), in batches."""
        session = session if session is not None else self.session
        input_name = input_name or self.input_name
        wanted = {i.name for i in session.get_inputs()}
        parts: list[list[np.ndarray]] = [[] for _ in outputs]
        feeds = self._feeds(session)
        for start in range(0, len(x), self.batch):
            feeds.update(input_feeds(x[start:start + self.batch], input_name, wanted))
            for part, value in zip(parts, session.run(outputs, feeds)):
                part.append(value)
        return [np.concatenate(p) for p in parts]

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.run(x, [self.output_name])[0]

    def correct(self, x: Inputs, y: np.ndarray) -> np.ndarray:
        return np.asarray(self.logits(x).argmax(axis=-1) == y)

    # -- activations kept across flips -----------------------------------------------------------

    def activations(self, x: Inputs, probes: Iterable[str]) -> Activations:
        """One pass over `x`: the output and the named probes (layer inputs, aligned outputs)."""
        names = list(dict.fromkeys(probes))
        logits, *values = self.run(x, [self.output_name, *names])
        return Activations(logits, dict(zip(names, values)))

    def prepare(self, layers: Iterable[QuantLayer], example: Inputs | None = None) -> None:
        """Build now the sessions the device loop will use (every norm's prefix, `layers`' suffixes) and, given
        an example, run each once (onnxruntime allocates on a session's first run), so that no calibration pays
        for either."""
        layers = list(layers)
        for bn in self.norms:
            self._prefix(bn)
        for layer in layers:
            self._suffix(layer)
        if example is None:
            return
        acts = self.activations(example, [layer.input for layer in layers])
        for bn in self.norms:
            self.run(example, [bn.input[0]], session=self._prefix(bn))
        for layer in layers:
            self.rerun_from(layer, acts, example)

    def rerun_from(self, layer: QuantLayer, current: Activations, x: Inputs) -> Activations:
        """`current` with everything after `layer` recomputed under the present codes and statistics.

        Runs the layer's suffix from its cached input (and the model inputs it still reads, e.g. an
        attention mask); where no suffix can be cut, runs the whole model on `x`."""
        suffix = self._suffix(layer)
        if suffix is None:
            return self.activations(x, current.values)
        session, _, reachable = suffix
        names = [name for name in current.values if name in reachable]
        source: Inputs = current.input_of(layer)
        declared = {i.name for i in session.get_inputs()}
        if any(name in declared for name in self.input_names):  # the suffix reads model inputs besides the cut
            given = x.arrays if isinstance(x, Examples) else {self.input_name: x}
            source = Examples({layer.input: source, **{k: v for k, v in given.items() if k in declared}})
        logits, *values = self.run(source, [self.output_name, *names], session=session, input_name=layer.input)
        return Activations(logits, {**current.values, **dict(zip(names, values))})

    def _suffix(self, layer: QuantLayer) -> tuple[Any, str, list[str]] | None:
        if layer.node not in self._suffixes:
            self._suffixes[layer.node] = None
            if not layer.first:
                reachable = [name for name in self.probes if name != layer.input and name in downstream(self.graph, layer.input)]
                params = [i.name for i in self.graph.graph.input if i.name not in self.input_names]
                # model inputs the layers after the cut read themselves (an attention mask) are suffix inputs too
                others = self.input_names if len(self.input_names) > 1 else []
                part = cut(self.graph, [layer.input, *params, *others], [self.output_name, *reachable])
                if part is not None:
                    self._suffixes[layer.node] = (self._session(part), layer.input, reachable)
        return self._suffixes[layer.node]

    # -- batch-norm statistics -------------------------------------------------------------------

    def refresh_norm_stats(self, x: Inputs, momentum: float = 1.0) -> None:
        """Batch-norm statistics of `x`, layer after layer (each sees the updated ones before it).

        Each norm's input comes from a session cut just before it, batch by batch, merged into per-channel
        mean and variance (float64, Chan et al.'s pairwise update), so no activation of all of `x` is held."""
        for bn in self.norms:
            session = self._prefix(bn)
            feeds = self._feeds(session)
            wanted = {i.name for i in session.get_inputs()}
            count, new_mean, squares = 0, 0.0, 0.0
            for start in range(0, len(x), self.batch):
                feeds.update(input_feeds(x[start:start + self.batch], self.input_name, wanted))
                (value,) = session.run([bn.input[0]], feeds)
                axes = (0, *range(2, value.ndim))
                n = value.size // value.shape[1]
                batch_mean = value.sum(axis=axes, dtype=np.float64) / n  # float64 accumulation, no float64 copy
                shape = (1, -1) + (1,) * (value.ndim - 2)
                np.subtract(value, batch_mean.astype(np.float32).reshape(shape), out=value)
                batch_squares = np.square(value, out=value).sum(axis=axes, dtype=np.float64)
                delta = batch_mean - new_mean
                total = count + n
                new_mean = new_mean + delta * (n / total)
                squares = squares + batch_squares + delta ** 2 * (count * n / total)
                count = total
                del value
            if count == 0:
                continue
            new_var = np.asarray(squares) / count
            mean, var = self.state.norm_stats[bn.name]
            self.state.norm_stats[bn.name] = (((1 - momentum) * mean + momentum * np.asarray(new_mean)).astype(np.float32),
                                              ((1 - momentum) * var + momentum * new_var).astype(np.float32))

    def _prefix(self, bn: onnx.NodeProto) -> Any:
        if bn.name not in self._prefixes:
            params = [i.name for i in self.graph.graph.input if i.name not in self.input_names]
            part = cut(self.graph, [*self.input_names, *params], [bn.input[0]])
            self._prefixes[bn.name] = self.session if part is None else self._session(part)
        return self._prefixes[bn.name]

    # -- convenience views -------------------------------------------------------------------------

    def channel_stats(self, x: Inputs) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per input channel mean and standard deviation of every quantized layer's float input on `x`.

        Accumulated batch by batch (float64 sums), so that an encoder's [batch, sequence, features] inputs
        of every layer are never held for all of `x` at once."""
        sums: dict[str, list[Any]] = {}
        for start in range(0, len(x), self.batch):
            inputs = self.layer_inputs(x[start:start + self.batch])
            for layer in self.layers:
                rows = channel_rows(layer, inputs[layer.node])
                total = sums.setdefault(layer.node, [0, 0.0, 0.0])
                total[0] += rows.shape[0]
                total[1] = total[1] + rows.sum(axis=0, dtype=np.float64)
                total[2] = total[2] + np.square(rows, dtype=np.float64).sum(axis=0)
            del inputs
        out = {}
        for name, (count, first, second) in sums.items():
            mean = first / max(count, 1)
            out[name] = (mean.astype(np.float32), np.sqrt(np.maximum(second / max(count, 1) - mean**2, 0.0)).astype(np.float32))
        return out

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


def cut(model: onnx.ModelProto, inputs: Sequence[str], outputs: Iterable[str]) -> onnx.ModelProto | None:
    """The nodes of `model` that compute `outputs` from `inputs` (and initializers), as a model whose graph
    inputs are the first of `inputs` (the cut) and those of the others the kept nodes read; None when an output needs anything else (another graph input, a tensor from around
    the cut, a subgraph). Plain onnx, so the device loop does not load the graph-surgery library."""
    graph = model.graph
    outputs = list(outputs)
    given = set(inputs)
    produced = {name: node for node in graph.node for name in node.output}
    initializers = {t.name for t in graph.initializer}
    needed, stack, kept_inits = set(), list(outputs), set()
    while stack:
        name = stack.pop()
        if name in given or name in needed or name == "":
            continue
        if name in initializers:
            kept_inits.add(name)
            continue
        node = produced.get(name)
        if node is None or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        needed.add(name)
        stack.extend(node.input)
    nodes = [node for node in graph.node if any(name in needed for name in node.output)]
    read = {name for node in nodes for name in node.input} | set(outputs)
    inputs = [name for position, name in enumerate(inputs) if position == 0 or name in read]
    types = {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]}
    value_inputs = [types.get(name) or helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in inputs]
    value_outputs = [types.get(name) or helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs]
    part = helper.make_graph(nodes, f"{graph.name}_cut", value_inputs, value_outputs,
                             [t for t in graph.initializer if t.name in kept_inits])
    result = helper.make_model(part, opset_imports=list(model.opset_import))
    result.ir_version = model.ir_version
    return result


def downstream(model: onnx.ModelProto, tensor: str) -> set[str]:
    """Every tensor computed (directly or not) from `tensor`."""
    reached = {tensor}
    for node in model.graph.node:  # graph order is topological
        if any(name in reached for name in node.input):
            reached.update(node.output)
    return reached


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
    """Mean and standard deviation per input channel (axis 1 of a Conv input, the last axis otherwise: a MatMul on
    [batch, sequence, features] counts every token as a row)."""
    channels = value.reshape(value.shape[0], value.shape[1], -1) if layer.op_type == "Conv" else value.reshape(-1, value.shape[-1])[:, :, None]
    return channels.mean(axis=(0, 2)), channels.std(axis=(0, 2))


def channel_rows(layer: QuantLayer, value: np.ndarray) -> np.ndarray:
    """`value` as [rows, channels] in the sense of `channel_stats`."""
    if layer.op_type == "Conv":
        return np.moveaxis(value.reshape(value.shape[0], value.shape[1], -1), 1, 2).reshape(-1, value.shape[1])
    return value.reshape(-1, value.shape[-1])
