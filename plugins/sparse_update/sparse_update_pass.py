"""The `sparse-update` pass: train a few layers and channels chosen for the task, under budgets.

TinyTrain (Kwon et al., ICML 2024) picks layers and channels from one backward
pass over the support set; MCUNetV3 (Lin et al., NeurIPS 2022) fixes a sparse
scheme offline. Both make training cheap only if backward neither computes nor
keeps what frozen channels would need; `split.py` rewrites the forward graph so
that onnxruntime-training's own gradient builder gets there.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from edgeplug import ForwardState, Pass, PassContext, PassReport
from edgeplug.plugin_api import RecipeError, data_axis_lengths, load_schema, trim_heap

from . import split
from .candidates import find_candidates, model_facts
from .costs import Update, plan_cost, trained_biases
from .criterion import Potentials, fisher_potentials
from .lean import LeanResult, lean_frozen_path
from .selection import criterion, feasible, layer_loop, needs_input_potentials, select


class SparseUpdatePass(Pass):
    name = "sparse-update"
    summary = "Train only the layers and channels that matter for the task (TinyTrain), under backward memory/MAC budgets."
    options_schema = load_schema("passes/sparse-update")

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self._details: dict[str, Any] = {}

    def rewrite_forward(self, state: ForwardState, context: PassContext) -> ForwardState:
        started = time.perf_counter()
        trim_heap()  # what earlier passes freed goes back to the system before the probe allocates
        options = self.options
        dims = sequence_dims(state.model, options.get("dims"), context.calibration)
        facts = model_facts(state.model, context.output_name, options["batch_size"], dims)
        candidates = find_candidates(facts, state.trainable)
        if not candidates:
            raise RecipeError("sparse-update: no trainable Conv/Gemm/MatMul layer with an initializer weight on the output's path")
        ranks = {name: len(shape) for name, shape in facts.shapes.items()}
        feasibility = feasible(options, facts, candidates, context.loss)
        pool = feasibility.kept
        potentials: Potentials | None = None
        if pool and (options["strategy"] == "tinytrain" or options["channels"] == "fisher"):
            if context.calibration is None:
                raise RecipeError("sparse-update: the Fisher criterion needs the support set: "
                                  "edgeplug rewrite ... --calibration-data support.npz (or rewrite(..., calibration=arrays))")
            # chunks no larger than the training batch: the probe then keeps no more than a training step would
            chunk = min(options["calibration_batch"], options["batch_size"])
            potentials = fisher_potentials(facts, pool, context.loss, context.calibration, chunk,
                                           needs_input_potentials(options, pool))
        trim_heap()  # the probe's sessions are gone
        chosen_at = time.perf_counter()
        selection = select(options, facts, candidates, potentials, context.loss, pool)
        model, trainable = split.rewrite(state.model, candidates, selection.updates, selection.biases, ranks)
        lean: LeanResult | None = None
        if options["lean_backward"]:
            lean = lean_frozen_path(model, trainable, facts.shapes, in_place=True)  # `model` is split's own copy
            model = lean.model
        selection_seconds = time.perf_counter() - started

        everything = {c.position: Update(c) for c in candidates}
        full = plan_cost(facts, candidates, everything, trained_biases(facts, candidates, everything, "chosen"),
                         options["optimizer"], context.loss)
        total_values = sum(c.weight_values + c.bias_values for c in candidates)
        trainable_values = sum(u.weight_values for u in selection.updates.values()) + sum(
            candidates[p].bias_values for p in selection.biases)
        layers = []
        for position in sorted(selection.updates):
            update, c = selection.updates[position], candidates[position]
            layers.append({
                "node": c.node, "op_type": c.op_type, "kind": c.kind, "weight": c.weight,
                "axis": update.axis, "weight_axis": c.weight_axis(update.axis), "ratio": round(update.ratio, 6),
                "channels_total": c.slice_channels if update.axis == "input" else c.channels,
                "channels": list(update.channels) if update.channels is not None else None,
                "score": selection.scores.get(position),
                "potential": float(potentials.output[position].sum()) if potentials and position in potentials.output else None,
            })
        ranking = sorted(selection.scores, key=lambda p: -selection.scores[p])
        budgets = {"memory_bytes": options.get("memory_budget_bytes"), "backward_macs": options.get("backward_macs_budget"),
                   "batch_size": options["batch_size"], "dims": dims, "optimizer": options["optimizer"]}
        self._details = {
            "strategy": options["strategy"],
            "criterion": criterion(options),
            "loop": layer_loop(options),
            "budgets": budgets,
            "candidates": len(candidates),
            "feasible": len(pool),
            "probe": {**feasibility.summary(candidates, budgets), "probed": len(pool) if potentials else 0,
                      "input_probes": bool(potentials and potentials.input)},
            "layers": layers,
            "bias_only": [candidates[p].node for p in sorted(selection.biases) if p not in selection.updates],
            "trainable": sorted(trainable),
            "trainable_values": trainable_values,
            "candidate_values": total_values,
            "predicted": selection.cost.to_dict(),
            "predicted_all_layers": full.to_dict(),
            "score_ranking": [{"node": candidates[p].node, "score": selection.scores[p]} for p in ranking[:10]],
            "calibration_samples": potentials.samples if potentials else 0,
            "lean_backward": None if lean is None else {"matmul_convs": len(lean.matmul_convs)},
            "probe_graph": {"tail_nodes": potentials.tail_nodes, "prefix_nodes": potentials.prefix_nodes} if potentials else None,
            "seconds": {
                "selection_total": round(selection_seconds, 4),
                "probe_build": round(potentials.build_seconds, 4) if potentials else 0.0,
                "probe_run": round(potentials.run_seconds, 4) if potentials else 0.0,
                "probe_prefix": round(potentials.prefix_seconds, 4) if potentials else 0.0,
                "select_and_split": round(time.perf_counter() - chosen_at, 4),
            },
        }
        return ForwardState(model, trainable)

    def report(self) -> PassReport:
        d = self._details
        if not d:
            return PassReport(False, "did not run")
        partial = sum(1 for layer in d["layers"] if layer["channels"] is not None)
        mem, full = d["predicted"]["backward_memory_bytes"], d["predicted_all_layers"]["backward_memory_bytes"]
        return PassReport(
            changed=True,
            summary=f"{d['strategy']}: {len(d['layers'])} of {d['candidates']} layers train ({partial} in part), "
            f"{len(d['bias_only'])} bias-only; {d['trainable_values']:,} values; predicted backward memory "
            f"{mem / 2**20:.2f} MiB ({full / max(mem, 1):.0f}x less than all layers), selection {d['seconds']['selection_total']:.2f} s",
            details=d,
        )



def sequence_dims(model: onnx.ModelProto, given: Mapping[str, int] | None,
                  calibration: Mapping[str, np.ndarray] | None) -> dict[str, int]:
    """Lengths of the data inputs' named dynamic axes besides the batch (a text model's sequence), which the
    budgets are counted at: the `dims` option, else the widths of the calibration arrays (the padded length
    the support set was prepared at; training trims each batch to its longest mask, so this is the most a
    step keeps). Without either, a model with such an axis is refused: its costs would be unknown."""
    dims, missing = data_axis_lengths(model, given, calibration)
    if missing:
        names = ", ".join(f"'{name}' (of {', '.join(inputs)})" for name, inputs in missing.items())
        example = ", ".join(f"{name}: 128" for name in missing)
        raise RecipeError(f"sparse-update: the budgets need the length of the dynamic axis {names}: "
                          f"set the option dims: {{{example}}} or give --calibration-data")
    return dims
