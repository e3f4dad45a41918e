"""Low-rank adapters on MatMul/Gemm weights: where they can go, how they enter the graph, how they merge back.

A layer `Y = X @ W` (MatMul with a 2-D weight, or Gemm) gets `Y = X @ W + s * (X @ A) @ B` with
`A` [in, rank], `B` [rank, out] and `s = alpha / rank` (Hu et al. 2021). `B` starts at zero, so
the adapted model computes exactly what the model did. The base node keeps its inputs; its
output is renamed and an Add with the adapter branch produces the old name, so every consumer
(and any pass that rewrote the layer before, e.g. `quantize-frozen`'s DequantizeLinear feeding
the weight) stays as it is. Merging computes `W + s * A @ B` (transposed for a Gemm with
`transB`, divided by the Gemm's `alpha`) and removes the branch.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeplug.plugin_api import GraphEditor, GraphIndex, ModelError

LAYER_OPS = ("MatMul", "Gemm")


@dataclasses.dataclass(frozen=True)
class Target:
    """A layer that can carry an adapter: its node, weight and the weight's layout."""

    node: str
    op_type: str
    weight: str
    in_features: int
    out_features: int
    transposed: bool  # weight stored [out, in] (Gemm transB=1)
    gemm_alpha: float
    quantized: bool  # the weight is a DequantizeLinear of initializers (quantize-frozen ran first)


@dataclasses.dataclass(frozen=True)
class Adapter:
    """What was inserted for one target (JSON-able for the report, read back when merging)."""

    node: str
    weight: str
    a: str
    b: str
    scale: float
    transposed: bool
    gemm_alpha: float
    base_output: str  # the base node's renamed output
    output: str  # the layer's original output, now the Add's
    nodes: tuple[str, ...]  # the branch's nodes: X@A, (.)@B, *s, +

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"nodes": list(self.nodes)}

    @staticmethod
    def from_dict(values: Mapping[str, Any]) -> Adapter:
        return Adapter(**{**values, "nodes": tuple(values["nodes"])})


def candidates(model: onnx.ModelProto, output: str) -> tuple[list[Target], dict[str, str]]:
    """Every MatMul/Gemm on the output's path whose weight is a 2-D float initializer (or its
    DequantizeLinear), in graph order; and the layers left out, with why."""
    index = GraphIndex(model)
    on_path = index.ancestors([output])
    initializers = {t.name: t for t in model.graph.initializer}
    graph_inputs = {v.name for v in model.graph.input}
    found: list[Target] = []
    skipped: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in LAYER_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2 or node.name not in on_path:
            continue
        weight = node.input[1]
        shape, quantized = _weight_shape(index, initializers, weight)
        if shape is None:
            continue  # activation x activation (attention scores): nothing to adapt
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if len(shape) != 2:
            skipped[node.name] = f"its weight has {len(shape)} dimensions (adapters need a 2-D weight)"
            continue
        if weight in graph_inputs:
            skipped[node.name] = "its weight is also a graph input"
            continue
        users = [n for n, _slot in index.consumers.get(weight, [])]
        if len(users) != 1:
            skipped[node.name] = f"its weight '{weight}' is shared by {len(users)} nodes (a merged adapter would change the others)"
            continue
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            skipped[node.name] = "Gemm with transA"
            continue
        transposed = node.op_type == "Gemm" and bool(attrs.get("transB", 0))
        in_features, out_features = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
        alpha = float(attrs.get("alpha", 1.0)) if node.op_type == "Gemm" else 1.0
        found.append(Target(node.name, node.op_type, weight, int(in_features), int(out_features), transposed, alpha, quantized))
    return found, skipped


def _weight_shape(index: GraphIndex, initializers: Mapping[str, onnx.TensorProto], name: str) -> tuple[tuple[int, ...] | None, bool]:
    tensor = initializers.get(name)
    if tensor is not None:
        return (tuple(int(d) for d in tensor.dims), False) if tensor.data_type == onnx.TensorProto.FLOAT else (None, False)
    producer = index.producer.get(name)
    if producer is not None and producer.op_type == "DequantizeLinear" and producer.input and producer.input[0] in initializers:
        return tuple(int(d) for d in initializers[producer.input[0]].dims), True
    return None, False


def choose(targets: Sequence[Target], *, include: Sequence[str], exclude: Sequence[str], last: int | None,
           classifier: Target | None, adapt_classifier: bool) -> tuple[list[Target], dict[str, str]]:
    """The targets that get adapters, and why the others do not."""
    chosen, skipped = [], {}
    for target in targets:
        names = (target.node, target.weight)
        if target is classifier and not adapt_classifier:
            skipped[target.node] = "the classifier (option classifier)"
        elif include and not any(fnmatch.fnmatchcase(n, p) for p in include for n in names):
            skipped[target.node] = "not matched by include"
        elif any(fnmatch.fnmatchcase(n, p) for p in exclude for n in names):
            skipped[target.node] = "excluded"
        else:
            chosen.append(target)
    if last is not None and len(chosen) > last:
        for target in chosen[:-last]:
            skipped[target.node] = f"before the last {last} (option last)"
        chosen = chosen[-last:]
    return chosen, skipped


def insert(model: onnx.ModelProto, targets: Sequence[Target], *, rank: int, alpha: float, seed: int) -> tuple[onnx.ModelProto, list[Adapter]]:
    """A copy of `model` with an adapter on every target (A ~ U(+-1/sqrt(in)), B = 0)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    editor = GraphEditor(result)
    rng = np.random.default_rng(seed)
    by_node = {t.node: t for t in targets}
    adapters: list[Adapter] = []
    nodes: list[onnx.NodeProto] = []
    for node in result.graph.node:
        nodes.append(node)
        target = by_node.get(node.name)
        if target is None:
            continue
        r = min(rank, target.in_features, target.out_features)
        bound = 1.0 / np.sqrt(target.in_features)
        a = editor.fresh(f"{target.weight}.lora_A")
        b = editor.fresh(f"{target.weight}.lora_B")
        scale = editor.fresh(f"{target.weight}.lora_scale")
        result.graph.initializer.extend([
            numpy_helper.from_array(rng.uniform(-bound, bound, (target.in_features, r)).astype(np.float32), a),
            numpy_helper.from_array(np.zeros((r, target.out_features), np.float32), b),
        ])
        output = node.output[0]
        base = editor.fresh(f"{output}.lora_base")
        node.output[0] = base
        down, up, scaled = editor.fresh(f"{output}.lora_down"), editor.fresh(f"{output}.lora_up"), editor.fresh(f"{output}.lora_scaled")
        branch = [
            helper.make_node("MatMul", [node.input[0], a], [down], name=editor.fresh(f"{node.name}/lora/A")),
            helper.make_node("MatMul", [down, b], [up], name=editor.fresh(f"{node.name}/lora/B")),
            helper.make_node("Constant", [], [scale], name=editor.fresh(f"{node.name}/lora/scale"),
                             value=numpy_helper.from_array(np.array(alpha / r, np.float32))),
            helper.make_node("Mul", [up, scale], [scaled], name=editor.fresh(f"{node.name}/lora/mul")),
            helper.make_node("Add", [base, scaled], [output], name=editor.fresh(f"{node.name}/lora/add")),
        ]
        nodes.extend(branch)
        adapters.append(Adapter(node.name, target.weight, a, b, float(np.float32(alpha / r)), target.transposed, target.gemm_alpha,
                                base, output, tuple(n.name for n in branch)))
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    return result, adapters


def merge(model: onnx.ModelProto, adapters: Sequence[Adapter]) -> tuple[onnx.ModelProto, dict[str, float]]:
    """A copy of `model` with every adapter folded into its weight and its branch removed.

    A weight that `quantize-frozen` stored as int8 codes becomes a float initializer again (exact).
    Returns the model and, per weight, the largest absolute change the merge made to it.
    """
    from edgeplug.plugin_api import remove_unused

    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    index = GraphIndex(result)
    initializers = {t.name: t for t in graph.initializer}
    removed: set[str] = set()
    renamed: dict[str, str] = {}
    changes: dict[str, float] = {}
    for adapter in adapters:
        base_node = index.producer.get(adapter.base_output)
        add_node = index.producer.get(adapter.output)
        if base_node is None or add_node is None or add_node.op_type != "Add":
            raise ModelError(f"lora: the adapter of '{adapter.node}' is not in the exported model (missing '{adapter.base_output}' "
                             f"or the Add producing '{adapter.output}')")
        a, b = _array(initializers, adapter.a), _array(initializers, adapter.b)
        delta = adapter.scale * (a @ b)
        if adapter.transposed:
            delta = delta.T
        delta = delta / adapter.gemm_alpha
        weight = _base_weight(result, index, initializers, adapter.weight, removed)
        merged = (weight + delta).astype(np.float32)
        changes[adapter.weight] = float(np.abs(delta).max()) if delta.size else 0.0
        tensor = numpy_helper.from_array(merged, adapter.weight)
        if adapter.weight in initializers:
            initializers[adapter.weight].CopyFrom(tensor)
        else:
            graph.initializer.append(tensor)
            initializers[adapter.weight] = graph.initializer[-1]
        removed.update(adapter.nodes)
        renamed[adapter.base_output] = adapter.output
    kept = [n for n in graph.node if n.name not in removed]
    for node in kept:
        for slot, name in enumerate(node.output):
            if name in renamed:
                node.output[slot] = renamed[name]
    del graph.node[:]
    graph.node.extend(kept)
    stale = set(renamed)
    kept_info = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    remove_unused(result)
    return result, changes


def _array(initializers: Mapping[str, onnx.TensorProto], name: str) -> np.ndarray:
    tensor = initializers.get(name)
    if tensor is None:
        raise ModelError(f"lora: the exported model has no initializer '{name}'")
    return numpy_helper.to_array(tensor).astype(np.float32)


def _base_weight(model: onnx.ModelProto, index: GraphIndex, initializers: Mapping[str, onnx.TensorProto], name: str,
                 removed: set[str]) -> np.ndarray:
    """The weight's float value: the initializer, or its DequantizeLinear computed (that node then goes)."""
    if name in initializers:
        return _array(initializers, name)
    producer = index.producer.get(name)
    if producer is None or producer.op_type != "DequantizeLinear":
        raise ModelError(f"lora: weight '{name}' is neither an initializer nor a DequantizeLinear of initializers")
    codes = numpy_helper.to_array(initializers[producer.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(initializers[producer.input[1]]).astype(np.float32)
    zero = numpy_helper.to_array(initializers[producer.input[2]]).astype(np.float32) if len(producer.input) > 2 and producer.input[2] else np.zeros_like(scale)
    axis = next((int(a.i) for a in producer.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * codes.ndim
        shape[axis] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    removed.add(producer.name)
    return (codes - zero) * scale


def classifier_parameters(model: onnx.ModelProto, target: Target) -> set[str]:
    """The classifier's weight and bias (Gemm input 2, or the initializer of the Add after a MatMul)."""
    index = GraphIndex(model)
    node = next(n for n in model.graph.node if n.name == target.node)
    names = {target.weight}
    initializers = {t.name for t in model.graph.initializer}
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] in initializers:
        names.add(node.input[2])
    consumers = index.consumers.get(node.output[0], [])
    if node.op_type == "MatMul" and len(consumers) == 1 and consumers[0][0].op_type == "Add":
        names |= {name for name in consumers[0][0].input if name in initializers}
    return names


def trainable_after(previous: Collection[str], adapters: Sequence[Adapter], *, classifier: set[str], classifier_mode: str,
                    freeze_others: bool) -> set[str]:
    """Adapters train; adapted weights never; the classifier by `classifier_mode`; the rest by `freeze_others`."""
    adapted = {a.weight for a in adapters}
    trainable = {name for a in adapters for name in (a.a, a.b)}
    if not freeze_others:
        trainable |= set(previous) - adapted
    head = classifier - adapted
    if classifier_mode == "train":
        trainable |= head & set(previous)
    elif classifier_mode == "frozen":
        trainable -= head
    return trainable
