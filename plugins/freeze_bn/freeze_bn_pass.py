"""Keep batch normalisation in inference mode while training.

onnxruntime-training turns every BatchNormalization of a training graph into
BatchNormInternal, which normalises with the statistics of the current batch,
even when the layer is frozen. Fine-tuning on a few samples then shifts every
frozen layer. This pass replaces those nodes by their inference-mode arithmetic
with the stored running statistics, which the gradient builder leaves alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper

from edgeplug import ForwardState, Pass, PassContext, PassReport
from edgeplug.plugin_api import GraphEditor, GraphIndex, ModelError, load_schema, remove_unused, replace_nodes, tensor_ranks

PER_EXAMPLE_NORMS = frozenset({"LayerNormalization", "InstanceNormalization", "GroupNormalization", "SimplifiedLayerNormalization"})


class FreezeBatchNormPass(Pass):
    name = "freeze-bn"
    summary = "Run batch norm of frozen layers in inference mode (running statistics) during training."
    options_schema = load_schema("passes/freeze-bn")

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self._folded: list[str] = []
        self._folded_values = 0
        self._affine: list[str] = []
        self._left: list[str] = []
        self._per_example: list[str] = []
        self._per_example_kinds: set[str] = set()

    def rewrite_forward(self, state: ForwardState, context: PassContext) -> ForwardState:
        model = onnx.ModelProto()
        model.CopyFrom(state.model)
        ranks = tensor_ranks(model)
        initializers = GraphIndex(model)
        editor = GraphEditor(model)
        replacements: dict[str, list[onnx.NodeProto]] = {}
        # LayerNorm / InstanceNorm / GroupNorm normalise each example by its own statistics in training and inference
        # alike: no running statistics, nothing that batch composition changes, so nothing to freeze
        self._per_example = [n.name for n in model.graph.node if n.op_type in PER_EXAMPLE_NORMS]
        self._per_example_kinds = {n.op_type for n in model.graph.node if n.op_type in PER_EXAMPLE_NORMS}
        for node in [n for n in model.graph.node if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]:
            scale, bias, mean, var = node.input[1:5]
            trains = scale in state.trainable or bias in state.trainable
            if trains and self.options["layers"] == "frozen":
                self._left.append(node.name)
                continue
            if len([o for o in node.output if o]) > 1:
                raise ModelError(f"freeze-bn: BatchNormalization '{node.name}' exports training-mode running statistics as outputs; re-export the model in eval mode")
            rank = ranks.get(node.input[0])
            if rank is None:
                raise ModelError(f"freeze-bn: the rank of the input of '{node.name}' is unknown; run 'normalize' with infer_shapes first")
            found = {name: initializers.value(name) for name in (scale, bias, mean, var)}
            values = {name: value for name, value in found.items() if value is not None}
            if len(values) < len(found):
                raise ModelError(f"freeze-bn: BatchNormalization '{node.name}' takes computed statistics, not initializers; cannot freeze it")
            epsilon = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "epsilon"), 1e-5)
            broadcast = (-1,) + (1,) * (rank - 2)
            inv_std = 1.0 / np.sqrt(values[var].astype(np.float64) + epsilon)
            dtype = values[scale].dtype
            if trains:
                centred = editor.node("Sub", [node.input[0], editor.constant(f"{node.name}_mean", values[mean].reshape(broadcast).astype(dtype))], f"{node.name}_centred")
                normalised = editor.node("Mul", [centred, editor.constant(f"{node.name}_inv_std", inv_std.reshape(broadcast).astype(dtype))], f"{node.name}_normalised")
                shape = editor.constant(f"{node.name}_param_shape", np.array(broadcast, dtype=np.int64))
                scaled = editor.node("Mul", [normalised, editor.node("Reshape", [scale, shape], f"{node.name}_scale_b")], f"{node.name}_scaled")
                editor.node("Add", [scaled, editor.node("Reshape", [bias, shape], f"{node.name}_bias_b")], f"{node.name}_out")
                self._affine.append(node.name)
            else:
                multiplier = values[scale].astype(np.float64) * inv_std
                shift = values[bias].astype(np.float64) - values[mean].astype(np.float64) * multiplier
                scaled = editor.node("Mul", [node.input[0], editor.constant(f"{node.name}_folded_scale", multiplier.reshape(broadcast).astype(dtype))], f"{node.name}_scaled")
                editor.node("Add", [scaled, editor.constant(f"{node.name}_folded_shift", shift.reshape(broadcast).astype(dtype))], f"{node.name}_out")
                self._folded.append(node.name)
                self._folded_values += int(values[scale].size + values[bias].size)
            replacements[node.name] = editor.take_replacement(node)
        replace_nodes(model, replacements)
        remove_unused(model)
        return ForwardState(model, state.trainable)

    def report(self) -> PassReport:
        count = len(self._folded) + len(self._affine)
        return PassReport(
            changed=count > 0,
            summary=f"{len(self._folded)} frozen BatchNormalization folded to running statistics "
            f"(their {self._folded_values:,} scale/bias values become constants), "
            f"{len(self._affine)} trainable ones use running statistics, {len(self._left)} left in batch mode"
            + (f"; {len(self._per_example)} {'/'.join(sorted(self._per_example_kinds))} left as they are "
               "(per-example statistics: the same in training and inference, nothing to freeze)" if self._per_example else ""),
            details={"folded": self._folded, "folded_values": self._folded_values,
                     "running_stats_trainable_affine": self._affine, "batch_mode": self._left,
                     "per_example_norms": self._per_example},
        )

