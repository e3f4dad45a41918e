"""The `activation-shortcut` pass: backward keeps a compressed input, not the input itself.

Vanilla backprop keeps each trained layer's input X until backward only to compute
dW = f(X, dY). This pass rewrites the generated training graph so that dW comes from
a compressed form (ASI Tucker core + factors, or gradient filtering's patch means),
dX stays exact, and no backward node reads X (see build.py). ASI ranks come from
the recipe or from a memory budget on a calibration batch (ranks.py); its factors
are step-carried state (CarriedState): any runtime feeds and keeps them, no Python hook.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgeplug import ForwardState, Pass, PassContext, PassReport, TrainingModels
from edgeplug.plugin_api import CarriedState, GraphEditor, ModelError, RecipeError, data_axis_lengths, forward_shapes, load_schema

from . import build, calibrate, ranks, tucker
from .layers import Layer, backward_nodes, backward_readers, find_layers, select

FLOAT_BYTES = 4
SELECTIONS = ("compression", "memory_budget_bytes", "energy", "ranks")


class ActivationShortcutPass(Pass):
    name = "activation-shortcut"
    summary = "Train conv/linear layers from a compressed input (ASI Tucker factors or gradient filtering); exact input gradients."
    options_schema = load_schema("passes/activation-shortcut")

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self._details: dict[str, Any] = {}
        self._parameters: dict[str, np.ndarray] = {}
        self._data_inputs: set[str] = set()
        self._dims: dict[str, int] = {}
        self._undetermined: dict[str, list[str]] = {}

    def rewrite_forward(self, state: ForwardState, context: PassContext) -> ForwardState:
        """Nothing changes here; remember the weights and data inputs for the calibration run."""
        self._check_options(context)
        graph = state.model.graph
        self._parameters = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self._data_inputs = {v.name for v in graph.input if v.name not in self._parameters}
        # a text model's sequence axis: the built graph and its factors hold one length (the carried state then
        # keeps the trainer from trimming batches); without a length, layers on that axis are left vanilla
        self._dims, self._undetermined = data_axis_lengths(state.model, self.options.get("dims"), context.calibration)
        return state

    def _check_options(self, context: PassContext) -> None:
        o = self.options
        if o["method"] == "gradient-filter":
            given = [k for k in SELECTIONS if k in o]
            if given:
                raise RecipeError(f"{', '.join(given)} only apply to method 'asi'")
            return
        chosen = [k for k in SELECTIONS if k in o]
        if len(chosen) != 1:
            raise RecipeError("method 'asi' needs exactly one of compression, memory_budget_bytes, energy "
                              f"(these read --calibration-data) or ranks; got {chosen or 'none'}")
        if chosen[0] != "ranks" and context.calibration is None:
            raise RecipeError(f"{chosen[0]} chooses ranks on a calibration batch: "
                              "edgeplug rewrite ... --calibration-data train.npz (or rewrite(..., calibration=arrays)), "
                              "or give fixed 'ranks'")

    def rewrite_training(self, models: TrainingModels, context: PassContext) -> TrainingModels:
        started = time.perf_counter()
        o = self.options
        training = onnx.ModelProto()
        training.CopyFrom(models.training)
        opset = next((i.version for i in training.opset_import if i.domain in ("", "ai.onnx")), 0)
        if opset < 13:
            raise ModelError(f"the training graph has opset {opset}; 13 or later is needed")
        batch = int(o["batch_size"])
        shapes, _ = forward_shapes(models.eval, self._data_inputs | {"labels"}, batch, self._dims)
        found, skipped = find_layers(training, shapes, o["op_types"])
        if self._undetermined:
            axes = ", ".join(f"'{name}'" for name in self._undetermined)
            for entry in skipped:
                if entry["reason"].startswith("input/output shapes are not static"):
                    entry["reason"] += f" (the length of {axes} is unknown: set the option dims or give --calibration-data)"
        if o["method"] == "gradient-filter":
            skipped += [{"node": la.node, "reason": "gradient-filter applies to Conv only"} for la in found if not la.is_conv]
            found = [la for la in found if la.is_conv]
        chosen = select(found, o)
        if not chosen:
            # Composed recipes meet this when an earlier pass (sparse-update) trains no layer of op_types,
            # e.g. only the classifier at a large input size: the training graph stays as generated.
            self._details = {"method": o["method"], "layers": [], "skipped": skipped, "candidates": [la.node for la in found],
                             "nothing_to_compress": True, "seconds": round(time.perf_counter() - started, 4)}
            return models
        plans, factors, choice = self._plans(chosen, training, context, opset)

        removable = backward_nodes(training)
        editor = GraphEditor(training)
        forward: dict[str, list[onnx.NodeProto]] = {}
        replacements: dict[str, list[onnx.NodeProto]] = {}
        results: list[tuple[build.Plan, build.Built]] = []
        for plan in plans:
            built, nodes, replaced, inputs, outputs = build.rewrite_layer(training, editor, plan)
            forward[plan.layer.node] = nodes
            replacements.update(replaced)
            training.graph.input.extend(inputs)
            training.graph.output.extend(outputs)
            results.append((plan, built))
        aliases = dict(built.anchored for _, built in results if built.anchored)
        build.apply(training, forward, replacements, removable, aliases)

        after = backward_nodes(training)
        # The factors are step-carried state: every runtime feeds U_m before a step and keeps the graph's
        # refreshed U_m (the `.next` output) after it, saved with each checkpoint. A batch-mode factor is
        # B x K: a batch of another size gets an identity warm start and leaves the factor unchanged.
        carried = tuple(CarriedState(plan.factor_input(mode), plan.factor(mode), factors[(plan.layer.node, mode)],
                                     batch_axis=0 if mode == 0 else None, other_batch="identity")
                        for plan in plans if plan.method == "asi" for mode in plan.active)
        self._details = self._report(results, skipped, choice, after, training, time.perf_counter() - started)
        # The eval model stays as generated: it takes no factor (runtimes feed carried state only to
        # the models that declare the input).
        return dataclasses.replace(models, training=training, carried=(*models.carried, *carried))

    def _plans(self, layers: list[Layer], training: onnx.ModelProto, context: PassContext, opset: int
               ) -> tuple[list[build.Plan], dict[tuple[str, int], np.ndarray], dict[str, Any]]:
        o = self.options
        if o["method"] == "gradient-filter":
            return [build.Plan(la, "gradient-filter", patch=int(o["patch"])) for la in layers], {}, {}
        factors: dict[tuple[str, int], np.ndarray] = {}
        if "ranks" in o:
            rng = np.random.default_rng(o["seed"])
            plans = []
            for real in layers:
                la = real.compressed
                wanted = list(la.x_shape) if o["ranks"] == "full" else list(o["ranks"]) + list(la.x_shape[len(o["ranks"]):])
                rank = tuple(min(int(k), d) for k, d in zip(wanted, la.x_shape))
                if not o["compress_batch"]:
                    rank = (la.x_shape[0], *rank[1:])
                plan = build.Plan(la, "asi", ranks=rank, center=bool(o["center"]), opset=opset, original=real)
                for mode in plan.active:
                    factors[(la.node, mode)] = tucker.orth(rng.standard_normal((la.x_shape[mode], rank[mode])))
                plans.append(plan)
            return plans, factors, {"ranks": o["ranks"]}
        assert context.calibration is not None
        batch = calibrate.calibration_batch(context.calibration, context_model(training, self._data_inputs), set(self._parameters),
                                            context.loss, int(o["batch_size"]))
        missing = [la.weight for la in layers if la.weight not in self._parameters]
        if missing:
            raise RecipeError(f"weights {missing[:3]} were created by a pass after this one; put "
                              "activation-shortcut after the passes that rewrite the forward model")
        views = [la.compressed for la in layers]
        names = [n for la in views for n in (la.input, f"{la.output}_grad")]
        values = calibrate.capture(training, self._parameters, batch, names)
        thresholds = [float(o["energy"])] if "energy" in o else [float(t) for t in o["thresholds"]]
        options_per_layer = [ranks.candidates(la, values[la.input], values[f"{la.output}_grad"], thresholds, o["compress_batch"],
                                              bool(o["center"])) for la in views]
        if "energy" in o:
            picks = [0] * len(layers)
            budget = None
        else:
            budget = budget_bytes(o, layers)
            picks = ranks.choose(options_per_layer, budget, ratio=o.get("compression"), vanilla=sum(vanilla_bytes(la) for la in layers))
        plans = []
        for real, la, found, pick in zip(layers, views, options_per_layer, picks):
            plan = build.Plan(la, "asi", ranks=found[pick].ranks, center=bool(o["center"]), opset=opset, original=real)
            for mode, factor in enumerate(found[pick].factors):
                if factor is not None:
                    factors[(la.node, mode)] = factor
            plans.append(plan)
        choice = {
            "calibration_samples": int(o["batch_size"]),
            "thresholds": thresholds,
            "memory_budget_bytes": budget,
            "compression": o.get("compression"),
            "candidates": {la.node: [c.to_dict() for c in found] for la, found in zip(layers, options_per_layer)},
            "chosen": {la.node: found[pick].to_dict() for la, found, pick in zip(layers, options_per_layer, picks)},
        }
        return plans, factors, choice

    def _report(self, results: list[tuple[build.Plan, build.Built]], skipped: list[dict[str, str]], choice: dict[str, Any],
                backward: set[str], training: onnx.ModelProto, seconds: float) -> dict[str, Any]:
        layers = []
        for plan, built in results:
            la = plan.real
            vanilla = vanilla_bytes(la)
            compressed = sum(math.prod(shape) for shape in built.stored.values()) * FLOAT_BYTES
            readers = backward_readers(training, la.input, backward)
            if plan.layer.input != la.input:  # compressed through a Pad: its source must be free too
                readers += backward_readers(training, plan.layer.input, backward)
            entry = {**la.to_dict(), "vanilla_bytes": vanilla, "compressed_bytes": compressed,
                     "compression": round(vanilla / compressed, 3) if compressed else None,
                     "stored": {name: list(shape) for name, shape in built.stored.items()},
                     "input_freed": not readers, "input_read_in_backward_by": readers,
                     "backward_macs": built.backward_macs, "vanilla_backward_macs": built.vanilla_backward_macs,
                     "forward_extra_macs": built.forward_extra_macs,
                     "backward_intermediate_bytes": built.backward_intermediate * FLOAT_BYTES}
            if plan.method == "asi":
                entry["ranks"] = list(plan.ranks)
                if plan.layer.input != la.input:
                    entry["compressed_input"] = {"tensor": plan.layer.input, "shape": list(plan.layer.x_shape),
                                                 "through": "Pad", "pads": list(plan.layer.geometry.pads) if plan.layer.geometry else []}
                chosen = choice.get("chosen", {}).get(la.node)
                if chosen:
                    entry["gradient_error"], entry["relative_gradient_error"] = chosen["error"], chosen["relative_error"]
            else:
                entry["patch"] = plan.patch
            layers.append(entry)
        vanilla_total = sum(e["vanilla_bytes"] for e in layers)
        compressed_total = sum(e["compressed_bytes"] for e in layers)
        static_costs = {  # read by `edgeplug profile` (edgeplug/profiling/static.py): the training graph's real costs
            "batch_size": int(self.options["batch_size"]),
            "nodes": {e["node"]: {"backward_macs": e["backward_macs"], "forward_extra_macs": e["forward_extra_macs"]} for e in layers},
            "tensors": {name: _batch_marked(built, name, shape) for _, built in results for name, shape in built.stored.items()},
            "node_prefixes": sorted({f"{plan.real.node}.{tag}." for plan, _ in results for tag in ("asi", "gf", "shortcut")}),
        }
        return {
            "method": self.options["method"], "batch_size": int(self.options["batch_size"]), "dims": dict(self._dims),
            "layers": layers, "skipped": skipped,
            "vanilla_bytes": vanilla_total, "compressed_bytes": compressed_total,
            "compression": round(vanilla_total / compressed_total, 3) if compressed_total else None,
            "backward_macs": sum(e["backward_macs"] for e in layers),
            "vanilla_backward_macs": sum(e["vanilla_backward_macs"] for e in layers),
            "inputs_freed": sum(1 for e in layers if e["input_freed"]),
            "rank_selection": choice, "static_costs": static_costs, "seconds": round(seconds, 4),
        }

    def report(self) -> PassReport:
        d = self._details
        if not d:
            return PassReport(False, "did not run")
        if d.get("nothing_to_compress"):
            why = f"{len(d['skipped'])} trained layers not supported" if d["skipped"] else \
                f"no trained {'/'.join(self.options['op_types'])} layer" + (" left by include/exclude/last" if d["candidates"] else "")
            return PassReport(False, f"{d['method']}: nothing to compress ({why}); the training graph is unchanged", details=d)
        return PassReport(
            changed=True,
            summary=f"{d['method']}: {len(d['layers'])} layers keep {d['compressed_bytes'] / 2**10:,.1f} KiB instead of "
            f"{d['vanilla_bytes'] / 2**10:,.1f} KiB of input ({d['compression']}x less; {d['inputs_freed']} inputs freed "
            f"after forward); backward MACs {d['backward_macs']:,} vs {d['vanilla_backward_macs']:,}",
            details=d,
        )


def _batch_marked(built: build.Built, name: str, shape: tuple[int, ...]) -> list[int | str]:
    """A stored tensor's shape with "batch" for its first axis when that follows the training batch."""
    return ["batch" if axis == 0 and name in built.batch_sized else int(size) for axis, size in enumerate(shape)]


def vanilla_bytes(layer: Layer) -> int:
    """Bytes of the layer's input that vanilla backprop keeps (float32)."""
    return math.prod(layer.x_shape) * FLOAT_BYTES


def budget_bytes(options: dict[str, Any], layers: list[Layer]) -> int:
    """The byte budget of the compressed inputs: given, or the layers' input bytes over `compression`
    (which keeps a recipe valid at any input size and for whichever layers an earlier pass chose)."""
    if "compression" in options:
        return int(sum(vanilla_bytes(la) for la in layers) / float(options["compression"]))
    return int(options["memory_budget_bytes"])


def context_model(training: onnx.ModelProto, data_inputs: set[str]) -> onnx.ModelProto:
    """A model whose graph inputs are the data inputs only, for the calibration data check."""
    model = onnx.ModelProto()
    model.graph.input.extend(v for v in training.graph.input if v.name in data_inputs)
    return model
