"""The `quantize-frozen` pass: frozen layer weights as int8 + DequantizeLinear in the training graph.

One job: shrink what a device stores and loads for the layers that do not train.
It reads only the trainable set that earlier passes left (whatever chose it:
`trainable`, `sparse-update`, ...), so it composes with them without knowing them.
"""

from __future__ import annotations

from typing import Any

from edgeplug import ForwardState, Pass, PassContext, PassReport
from edgeplug.plugin_api import load_schema

from .frozen import FrozenResult, quantize_frozen


class QuantizeFrozenPass(Pass):
    name = "quantize-frozen"
    summary = ("Store frozen Conv/Gemm/MatMul weights as int8 per output channel (DequantizeLinear) and frozen embedding tables per row "
               "(only gathered rows dequantized); trained weights stay float.")
    options_schema = load_schema("passes/quantize-frozen")

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self._details: dict[str, Any] = {}

    def rewrite_forward(self, state: ForwardState, context: PassContext) -> ForwardState:
        result = quantize_frozen(state.model, state.trainable, bits=self.options["bits"],
                                 op_types=self.options["op_types"], exclude=self.options["exclude"])
        self._details = _details(result, self.options["bits"], len(state.trainable))
        return ForwardState(result.model, state.trainable)

    def report(self) -> PassReport:
        d = self._details
        count = len(d.get("quantized", []))
        before, after = d.get("float_bytes", 0), d.get("quantized_bytes", 0)
        ratio = f" ({before / after:.2f}x smaller)" if after else ""
        return PassReport(
            changed=count > 0,
            summary=f"{count} frozen weights to int{d.get('bits', 8)} per output channel: {_kib(before)} -> {_kib(after)}{ratio}; "
            f"{len(d.get('skipped', {}))} stay float; {d.get('trainable', 0)} trained parameters stay float",
            details=d,
        )


def _details(result: FrozenResult, bits: int, trainable: int) -> dict[str, Any]:
    return {
        "bits": bits,
        "quantized": [{"weight": q.weight, "nodes": list(q.nodes), "values": q.values,
                       "float_bytes": q.float_bytes, "quantized_bytes": q.quantized_bytes} for q in result.quantized],
        "skipped": dict(result.skipped),
        "float_bytes": sum(q.float_bytes for q in result.quantized),
        "quantized_bytes": sum(q.quantized_bytes for q in result.quantized),
        "trainable": trainable,
    }


def _kib(value: int) -> str:
    return f"{value / 1024:,.1f} KiB"
