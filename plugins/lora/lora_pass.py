"""The `lora` pass: train low-rank adapters instead of the weights they adapt; merge them at export.

What users of transformer fine-tuning reach for first: the adapted weights stay frozen (so
`quantize-frozen` after this pass stores them in int8: QLoRA-style), only `rank * (in + out)`
values per layer train, and with `last` the backward pass stops at the earliest adapted layer.
"""

from __future__ import annotations

from typing import Any

import onnx

from edgeplug import ExportContext, ForwardState, Pass, PassContext, PassReport
from edgeplug.plugin_api import RecipeError, load_schema, tensor_values

from . import adapters as lora


class LoraPass(Pass):
    name = "lora"
    summary = "Low-rank adapters (rank, alpha) on chosen MatMul/Gemm weights; the weights freeze, the adapters train and merge at export."
    options_schema = load_schema("passes/lora")

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self._details: dict[str, Any] = {}

    def rewrite_forward(self, state: ForwardState, context: PassContext) -> ForwardState:
        options = self.options
        targets, skipped = lora.candidates(state.model, context.output_name)
        if not targets:
            reasons = "; ".join(f"{node}: {why}" for node, why in list(skipped.items())[:5]) or "none on the output's path"
            raise RecipeError(f"lora: no MatMul/Gemm with a 2-D float weight to adapt ({reasons})")
        classifier = targets[-1]
        chosen, not_chosen = lora.choose(targets, include=options["include"], exclude=options["exclude"], last=options.get("last"),
                                         classifier=classifier, adapt_classifier=options["classifier"] == "adapt")
        if not chosen:
            raise RecipeError("lora: the options leave no layer to adapt (" + "; ".join(f"{n}: {w}" for n, w in list(not_chosen.items())[:5])
                              + "); widen include, shrink exclude or raise last")
        model, inserted = lora.insert(state.model, chosen, rank=options["rank"], alpha=float(options["alpha"]), seed=options["seed"])
        head = lora.classifier_parameters(state.model, classifier)
        trainable = lora.trainable_after(state.trainable, inserted, classifier=head, classifier_mode=options["classifier"],
                                         freeze_others=options["freeze_others"])
        sizes = {t.name: tensor_values(t) for t in model.graph.initializer}
        adapter_values = sum(sizes[name] for a in inserted for name in (a.a, a.b))
        adapted_values = sum(sizes[a.weight] for a in inserted if a.weight in sizes) + sum(
            t.in_features * t.out_features for t in chosen if t.quantized)
        self._details = {
            "rank": options["rank"], "alpha": options["alpha"], "scale": options["alpha"] / options["rank"],
            "adapters": [a.to_dict() for a in inserted],
            "adapted_layers": len(inserted), "candidate_layers": len(targets),
            "adapter_values": adapter_values, "adapted_weight_values": adapted_values,
            "not_adapted": {**skipped, **not_chosen},
            "classifier": {"node": classifier.node, "mode": options["classifier"], "trains": bool(head & trainable)},
            "trainable_values": sum(sizes.get(name, 0) for name in trainable),
            "merge": options["merge"],
        }
        return ForwardState(model, frozenset(trainable))

    def rewrite_export(self, model: onnx.ModelProto, context: ExportContext) -> onnx.ModelProto:
        if context.details.get("merge", "weights") == "none":
            return model
        merged, _changes = lora.merge(model, [lora.Adapter.from_dict(a) for a in context.details.get("adapters", [])])
        return merged

    def report(self) -> PassReport:
        d = self._details
        share = d["adapter_values"] / d["adapted_weight_values"] if d["adapted_weight_values"] else 0.0
        head = "trains" if d["classifier"]["trains"] else ("adapted" if d["classifier"]["mode"] == "adapt" else "frozen")
        return PassReport(
            changed=True,
            summary=(f"{d['adapted_layers']} of {d['candidate_layers']} MatMul/Gemm layers adapted, rank {d['rank']}, alpha {d['alpha']}: "
                     f"{d['adapter_values']:,} adapter values for {d['adapted_weight_values']:,} frozen weights ({share:.2%}); "
                     f"classifier {head}; {d['trainable_values']:,} values train; merged at export: {d['merge']}"),
            details=d,
        )
