"""Choose which parameters train: by pattern, by 'last N layers', or 'classifier only'."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from typing import Any

import onnx

from edgeplug import ForwardState, Pass, PassContext, PassReport
from edgeplug.plugin_api import WEIGHT_OPS, GraphIndex, RecipeError, load_schema, tensor_values

# Ops that, placed right after a weight layer, belong to it (its bias or normalisation).
FOLLOWER_OPS = frozenset({"Add", "BatchNormalization", "LayerNormalization", "InstanceNormalization", "Mul"})
NORM_OPS = frozenset({"BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
                      "SimplifiedLayerNormalization"})


class TrainablePass(Pass):
    name = "trainable"
    summary = "Choose the trainable parameters (patterns, last N layers, classifier only); freeze the rest."
    options_schema = load_schema("passes/trainable")

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self._details: dict[str, Any] = {}

    def rewrite_forward(self, state: ForwardState, context: PassContext) -> ForwardState:
        index = GraphIndex(state.model)
        parameters = index.parameters()
        selective = "include" in self.options or self.options.get("biases") or self.options.get("norms")
        layers_option = self.options.get("layers", "none" if selective else "all")
        chosen = set(_by_layers(index, parameters, layers_option, context.output_name))
        extras: dict[str, int] = {}
        if self.options["biases"]:
            found = _biases(index, set(parameters))
            chosen |= found
            extras["biases"] = len(found)
        if self.options["norms"]:
            found = _norms(index, set(parameters))
            chosen |= found
            extras["norms"] = len(found)
        matcher = _matcher(self.options["syntax"])
        for pattern in self.options.get("include", []):
            chosen |= _matching(pattern, parameters, matcher, "include")
        for pattern in self.options.get("exclude", []):
            chosen -= _matching(pattern, parameters, matcher, "exclude")
        trainable = frozenset(chosen)
        self._details = {
            "layers": layers_option,
            "trainable": sorted(trainable),
            "trainable_parameters": len(trainable),
            "frozen_parameters": len(parameters) - len(trainable),
            "trainable_elements": _values(state.model, trainable),
            "total_elements": _values(state.model, parameters),
            "before": len(state.trainable),
            **extras,
        }
        return ForwardState(state.model, trainable)

    def report(self) -> PassReport:
        d = self._details
        share = d["trainable_elements"] / d["total_elements"] if d["total_elements"] else 0.0
        return PassReport(
            changed=d["trainable_parameters"] != d["before"],
            summary=f"{d['trainable_parameters']} of {d['trainable_parameters'] + d['frozen_parameters']} parameters train "
            f"({d['trainable_elements']:,} of {d['total_elements']:,} values, {share:.1%})",
            details=d,
        )


def _by_layers(index: GraphIndex, parameters: list[str], option: str | int, output: str) -> list[str]:
    if option == "all":
        return parameters
    if option == "none":
        return []
    groups = _weight_layer_groups(index, output)
    if not groups:
        raise RecipeError("trainable: the model has no Conv/Gemm/MatMul layer with parameters; use 'include' patterns")
    count = 1 if option == "classifier" else int(option)
    if count > len(groups):
        raise RecipeError(f"trainable: layers={count} but the model has only {len(groups)} weight layers")
    return [name for group in groups[-count:] for name in group]


def _weight_layer_groups(index: GraphIndex, output: str) -> list[list[str]]:
    """Parameters of each Conv/Gemm/MatMul on the output's path, with the bias/norm that follows."""
    parameters = set(index.parameters())
    on_path = index.ancestors([output])
    groups = []
    for node in index.model.graph.node:
        if node.op_type not in WEIGHT_OPS or node.name not in on_path:
            continue
        owned = [name for name in node.input if name in parameters]
        if not owned:
            continue
        follower = _single_consumer(index, node)
        while follower is not None and follower.op_type in FOLLOWER_OPS:
            extra = [name for name in follower.input if name in parameters and name not in owned]
            if not extra:
                # a residual Add right before a normalisation (post-LN transformers: dense -> bias -> + x -> LayerNorm):
                # the norm still belongs to the layer
                after = _single_consumer(index, follower)
                if follower.op_type == "Add" and after is not None and after.op_type in NORM_OPS and \
                        any(name in parameters for name in after.input[1:]):
                    follower = after
                    continue
                break
            owned += extra
            follower = _single_consumer(index, follower)
        groups.append(owned)
    return groups


def _biases(index: GraphIndex, parameters: set[str]) -> set[str]:
    """Every bias of a weight layer: Conv/ConvTranspose/Gemm input 2, or the parameter an Add adds to a MatMul's output."""
    found = set()
    for node in index.model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2 and node.input[2] in parameters:
            found.add(node.input[2])
        elif node.op_type == "MatMul":
            consumer = _single_consumer(index, node)
            if consumer is not None and consumer.op_type == "Add":
                found |= {name for name in consumer.input if name in parameters}
    return found


def _norms(index: GraphIndex, parameters: set[str]) -> set[str]:
    """Scale and shift of every normalisation layer (LayerNorm, BatchNorm, InstanceNorm, GroupNorm)."""
    return {name for node in index.model.graph.node if node.op_type in NORM_OPS for name in node.input[1:3] if name in parameters}


def _single_consumer(index: GraphIndex, node: onnx.NodeProto) -> onnx.NodeProto | None:
    consumers = index.consumers.get(node.output[0], [])
    return consumers[0][0] if len(consumers) == 1 else None


def _matcher(syntax: str) -> Callable[[str, str], bool]:
    if syntax == "regex":
        return lambda pattern, name: re.search(pattern, name) is not None
    return lambda pattern, name: fnmatch.fnmatchcase(name, pattern)


def _matching(pattern: str, parameters: list[str], matcher: Callable[[str, str], bool], option: str) -> set[str]:
    try:
        found = {name for name in parameters if matcher(pattern, name)}
    except re.error as error:
        raise RecipeError(f"trainable: {option} pattern {pattern!r} is not a valid regular expression: {error}") from None
    if not found:
        sample = ", ".join(parameters[:8]) + (", ..." if len(parameters) > 8 else "")
        raise RecipeError(f"trainable: {option} pattern {pattern!r} matches no parameter (parameters: {sample})")
    return found


def _values(model: onnx.ModelProto, names: Iterable[str]) -> int:
    wanted = set(names)
    return sum(tensor_values(tensor) for tensor in model.graph.initializer if tensor.name in wanted)
