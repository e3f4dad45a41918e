"""The `lls` pass: train each block of a model on its own local loss, with no gradient across blocks.

The model is cut into blocks (automatically, or after the nodes the recipe names).
Each block becomes a training stage whose input is the previous block's output:
block + a loss head (fixed basis by default, see heads.py) with its own loss and
optimizer; the last stage is the rest of the model (the classifier), trained with
the recipe's loss on its own input. The inference model is left as it was, so
`edgeplug export` writes the plain model with the trained weights and no heads.
"""

from __future__ import annotations

from typing import Any

import onnx

from edgeplug.plugin_api import ForwardState, ModelError, Pass, PassContext, PassReport, Plan, RecipeError, Stage, extract, load_schema

from .blocks import Cut, auto_cuts, named_cuts
from .heads import HeadSpec, append_head


class LocalLearningPass(Pass):
    name = "lls"
    summary = "Split the model into blocks trained by local losses on fixed-basis heads (LLS); no gradient crosses a block."
    options_schema = load_schema("passes/lls")

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self._details: dict[str, Any] = {}

    def requires(self, plan: Plan) -> None:
        if plan.loss != "cross-entropy":
            raise RecipeError(f"lls trains classifiers: set 'loss: cross-entropy' (the recipe has {plan.loss!r})")
        if not plan.is_last:
            raise RecipeError(f"lls splits the model into training stages, so it must be the last pass; move "
                              f"{', '.join(repr(name) for name in plan.passes[plan.position + 1:])} before it")

    def rewrite_forward(self, state: ForwardState, context: PassContext) -> ForwardState:
        model = state.model
        classes = _classes(model, context.output_name)
        blocks = self.options["blocks"]
        cuts = auto_cuts(model) if blocks == "auto" else named_cuts(model, blocks)
        if not cuts:
            raise ModelError("lls: found no block boundary (layer + activation with nothing else crossing it); "
                             "name the cut nodes with the 'blocks' option")
        shapes = _shapes(model)
        nodes = list(model.graph.node)
        bounds = [-1, *(cut.position for cut in cuts), len(nodes) - 1]
        pools: list[int] = self.options["pool"] if isinstance(self.options["pool"], list) else [self.options["pool"]]
        stages: list[Stage] = []
        blocks_report: list[dict[str, Any]] = []
        for number in range(len(bounds) - 1):
            chosen = nodes[bounds[number] + 1: bounds[number + 1] + 1]
            incoming = cuts[number - 1] if number > 0 else None
            outgoing = cuts[number] if number < len(cuts) else None
            stage_model = _stage_model(model, chosen, incoming, shapes, f"block{number}")
            own = {name for node in chosen for name in node.input} & set(state.trainable)
            if not own:
                raise RecipeError(f"lls: block {number} (nodes {chosen[0].name} .. {chosen[-1].name}) has no trainable "
                                  "parameter; every block trains in LLS: widen the 'trainable' pass or name other 'blocks'")
            if outgoing is None:
                stages.append(Stage(f"block{number}", stage_model, frozenset(own), context.output_name))
                blocks_report.append({"nodes": [chosen[0].name, chosen[-1].name], "head": None, "parameters": len(own)})
                continue
            spec = HeadSpec(self.options["variant"], self.options["basis"], pools[min(number, len(pools) - 1)],
                            float(self.options["temperature"]), classes, int(self.options["seed"]) + number)
            read = outgoing.activation if self.options["head_input"] == "before-pool" and outgoing.activation else outgoing.tensor
            head = append_head(stage_model, read, _feature_shape(shapes, read), spec, f"lls{number}")
            stage_model.graph.output.append(_value_info(shapes, outgoing.tensor))
            stages.append(Stage(f"block{number}", stage_model, frozenset(own | set(head.parameters)), head.logits,
                                (outgoing.tensor,)))
            blocks_report.append({"nodes": [chosen[0].name, chosen[-1].name], "cut": outgoing.tensor, "head_reads": read,
                                  "head": {"pool": spec.pool, "features": head.features, "parameters": head.parameter_values},
                                  "parameters": len(own)})
        self._details = {
            "blocks": len(stages), "variant": self.options["variant"], "basis": self.options["basis"],
            "temperature": float(self.options["temperature"]), "classes": classes,
            "head_parameters": sum(b["head"]["parameters"] for b in blocks_report if b["head"]),
            "stages": blocks_report,
        }
        return ForwardState(model, state.trainable, tuple(stages))

    def report(self) -> PassReport:
        d = self._details
        heads = d["blocks"] - 1
        return PassReport(
            changed=True,
            summary=(f"{d['blocks']} blocks train apart: {heads} {d['variant']} heads"
                     + (f" on a {d['basis']} basis" if d["variant"] != "local-classifier" else "")
                     + f" ({d['head_parameters']} trainable head values), then the classifier"),
            details=d,
        )


def _classes(model: onnx.ModelProto, output: str) -> int:
    value = next(v for v in model.graph.output if v.name == output)
    dims = value.type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[1].HasField("dim_value") or dims[1].dim_value < 2:
        raise ModelError(f"lls: the output {output!r} must be [batch, classes] logits with a fixed number of classes")
    return int(dims[1].dim_value)


def _shapes(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    inferred = onnx.shape_inference.infer_shapes(model)
    return {v.name: v for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)}


def _value_info(shapes: dict[str, onnx.ValueInfoProto], name: str) -> onnx.ValueInfoProto:
    if name not in shapes:
        raise ModelError(f"lls: the shape of {name!r} is unknown; run the 'normalize' pass (infer_shapes) before 'lls'")
    value = onnx.ValueInfoProto()
    value.CopyFrom(shapes[name])
    return value


def _feature_shape(shapes: dict[str, onnx.ValueInfoProto], tensor: str) -> tuple[int, ...]:
    dims = _value_info(shapes, tensor).type.tensor_type.shape.dim
    if len(dims) < 2 or not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims[1:]):
        raise ModelError(f"lls: block output {tensor!r} needs a fixed shape after the batch axis; export the model "
                         "with a fixed input size")
    return tuple(int(d.dim_value) for d in dims[1:])


def _stage_model(model: onnx.ModelProto, chosen: list[onnx.NodeProto], incoming: Cut | None,
                 shapes: dict[str, onnx.ValueInfoProto], name: str) -> onnx.ModelProto:
    """A model of `chosen` nodes: reads the data inputs it needs and the previous block's output."""
    produced = {out for node in chosen for out in node.output}
    read = [name for node in chosen for name in node.input if name and name not in produced]
    if incoming is not None and incoming.tensor not in read:
        raise ModelError(f"lls: {name} does not read the previous block's output {incoming.tensor!r}")
    data = {v.name for v in model.graph.input} - {t.name for t in model.graph.initializer}
    inputs = ([incoming.tensor] if incoming else []) + [tensor for tensor in dict.fromkeys(read) if tensor in data]
    model_outputs = [value.name for value in model.graph.output if value.name in produced]
    stage = extract(model, model_outputs or [chosen[-1].output[0]], inputs, name=name)
    if incoming is not None:
        stage.graph.input[0].CopyFrom(_value_info(shapes, incoming.tensor))
    if not model_outputs:  # a block inside the model: the caller adds its output and its head's
        del stage.graph.output[:]
    stage.producer_name = "edgeplug-lls"
    return stage
