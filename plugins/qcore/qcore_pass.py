"""The `qcore` pass: checks that the model has layers to quantize and records the options.

Quantization needs trained weights, so the rewrite itself leaves the float model
unchanged (the float model is what trains); `edgeplug quantize` and `edgeplug
calibrate` read the options this pass writes to OUT/passes/qcore/config.json.
"""

from __future__ import annotations

import json
from typing import Any

from edgeplug import ForwardState, Pass, PassContext, PassReport
from edgeplug.plugin_api import RecipeError, load_schema

from .layers import batch_norms, find_layers


class QCorePass(Pass):
    name = "qcore"
    summary = "Quantize (2-8 bits, QDQ) with a forgetting coreset and bit-flip networks for forward-only recalibration (QCore)."
    options_schema = load_schema("passes/qcore")

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self._details: dict[str, Any] = {}

    def rewrite_forward(self, state: ForwardState, context: PassContext) -> ForwardState:
        if context.loss != "cross-entropy":
            raise RecipeError("qcore counts forgetting on classification: use loss 'cross-entropy'")
        if any(node.op_type == "DequantizeLinear" for node in state.model.graph.node):
            raise RecipeError("qcore quantizes float weights: remove quantize-frozen (or other quantization) from this recipe")
        initializers = {t.name for t in state.model.graph.initializer}
        # several data inputs (token ids + attention mask) are all fed from the examples; what gets quantized is the
        # weights of Conv/Gemm/MatMul layers and their inputs, never a graph input itself
        data_inputs = [i.name for i in state.model.graph.input if i.name not in initializers]
        layers = find_layers(state.model)
        self._details = {
            "bits": self.options["bits"], "record_bits": self.options["record_bits"],
            "layers": [layer.node for layer in layers], "batch_norms": [bn.name for bn in batch_norms(state.model)],
            "float_input_layers": [layer.node for layer in layers if layer.first], "data_inputs": data_inputs,
            "float_nodes": float_nodes(state.model),
        }
        context.work_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"options": self.options, **self._details}, indent=2) + "\n"
        (context.work_dir / "config.json").write_text(text, encoding="utf-8")
        return state

    def report(self) -> PassReport:
        layers = self._details.get("layers", [])
        return PassReport(
            changed=False,
            summary=f"{len(layers)} layers to quantize at {self.options['bits']} bits; run 'edgeplug quantize' after training",
            details=self._details,
        )


def float_nodes(model: Any) -> dict[str, int]:
    """What stays in float, by op type: everything but the quantized layers' weights and inputs (embedding lookups,
    LayerNorm, attention's activation-by-activation MatMuls, softmax...)."""
    quantized = {layer.node for layer in find_layers(model)}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.name not in quantized and node.op_type in ("Gather", "LayerNormalization", "BatchNormalization", "MatMul", "Gemm", "Conv", "Softmax"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
