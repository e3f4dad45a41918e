"""The `new-head` pass: give a pretrained model a classifier for the user's own classes.

The last Gemm/MatMul (or 1x1 Conv head) is replaced by one with `classes` outputs, so
the exported model outputs that many logits. Its weights start from the labelled
support set (class prototypes, or a linear probe on the frozen features) or without
data (seeded random, zeros).
"""

from __future__ import annotations

import collections
import time
from typing import Any

from edgeplug import ForwardState, Pass, PassContext, PassReport
from edgeplug.plugin_api import ModelError, RecipeError, load_schema

from . import inits
from .features import penultimate_features, support_set
from .locate import find_head, replace_head

DATA_INITS = ("prototypes", "linear-probe")


class NewHeadPass(Pass):
    name = "new-head"
    summary = "Replace the classifier by one with `classes` outputs, initialised from the support set (prototypes, linear probe) or random."
    options_schema = load_schema("passes/new-head")

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self._details: dict[str, Any] = {}

    def rewrite_forward(self, state: ForwardState, context: PassContext) -> ForwardState:
        started = time.perf_counter()
        options = self.options
        init = options["init"]
        head = find_head(state.model, context.output_name, options.get("node"))
        classes: int | None = options.get("classes")
        counts: collections.Counter[int] = collections.Counter()
        details: dict[str, Any] = {"node": head.node.name, "op_type": head.node.op_type, "init": init,
                                   "in_features": head.in_features, "old_classes": head.classes}
        if init in DATA_INITS or (classes is None and context.calibration is not None):
            if init in DATA_INITS and context.loss != "cross-entropy":
                raise RecipeError(f"init '{init}' fits class labels and needs the cross-entropy loss (the recipe's loss is "
                                  f"{context.loss}); use init 'random' or 'zeros'")
            if context.calibration is None:
                raise RecipeError(f"init '{init}' needs the labelled support set: edgeplug rewrite ... --calibration-data "
                                  "support.npz (or rewrite(..., calibration=arrays)), with the labels under 'y'; "
                                  "or use init 'random'")
            data = support_set(state.model, context.calibration, classes)
            labels = data.labels
            classes = classes if classes is not None else int(labels.max()) + 1
            counts.update(int(label) for label in labels)
            details |= {"support_samples": len(data), "samples_per_class": [counts.get(c, 0) for c in range(classes)]}
        if classes is None:
            raise RecipeError("give the number of classes (options: {classes: N}), or --calibration-data with the "
                              "labelled support set to count them")
        if init in DATA_INITS:
            missing = [c for c in range(classes) if counts.get(c, 0) == 0]
            if missing:
                shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
                raise RecipeError(f"init '{init}' needs at least one support example of every class; the support set "
                                  f"has none of class {shown} (of {classes}); add examples, lower 'classes', or use init 'random'")
            features = penultimate_features(state.model, head, data, options["calibration_batch"])
            if init == "prototypes":
                try:
                    chosen = inits.prototypes(features, labels, classes, options["scale"])
                except ValueError as error:
                    raise ModelError(f"no prototypes from the features {head.features!r}: {error}") from None
                details["scale"] = options["scale"]
            else:
                chosen = inits.linear_probe(features, labels, classes, options["probe_l2"])
                details["probe_l2"] = options["probe_l2"]
            logits = features @ chosen.weight.T + chosen.bias
            details["support_accuracy"] = round(float((logits.argmax(axis=1) == labels).mean()), 6)
            details["support_logit_std"] = round(float(logits.std()), 6)
        elif init == "random":
            chosen = inits.random(classes, head.in_features, options["seed"])
            details["seed"] = options["seed"]
        else:
            chosen = inits.zeros(classes, head.in_features)
        details |= {key: round(value, 6) if isinstance(value, float) else value for key, value in chosen.details.items()}
        model, replaced = replace_head(state.model, head, chosen.weight, chosen.bias)
        old_names = {head.weight, *([head.bias] if head.bias else [])}
        was_trained = head.weight in state.trainable
        trainable = (set(state.trainable) - old_names) | ({replaced.weight, replaced.bias} if was_trained else set())
        details |= {"classes": classes, "weight": replaced.weight, "bias": replaced.bias, "bias_added": replaced.bias_added,
                    "reshapes_resized": replaced.reshapes_resized, "trainable": was_trained,
                    "seconds": round(time.perf_counter() - started, 3)}
        self._details = details
        return ForwardState(model, frozenset(trainable))

    def report(self) -> PassReport:
        d = self._details
        source = ""
        if d["init"] in DATA_INITS:
            source = f" from {d['support_samples']} support samples (support accuracy {d['support_accuracy']:.2f})"
        elif d["init"] == "random":
            source = f" (seed {d['seed']})"
        return PassReport(
            changed=True,
            summary=f"{d['op_type']} '{d['node']}': {d['old_classes']} -> {d['classes']} classes "
                    f"({d['in_features']} features), init {d['init']}{source}",
            details=d,
        )
