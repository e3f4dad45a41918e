"""The pass contract: what a pass may change, and what it must report.

A pass is a small class. The framework runs passes in recipe order in two stages:

1. `rewrite_forward(state, context)` sees the forward model and the set of
   trainable parameter names before onnxruntime-training builds the gradient
   graph; it may rewrite the model and/or change which parameters train.
2. `rewrite_training(models, context)` sees the training, eval and optimizer
   models that onnxruntime-training generated, and may rewrite them (for
   example, replace a gradient node).

A pass may also contribute runtime hooks (`runtime_hooks`) that take part in the
training loop, and rewrite the inference model that `edgeplug export` writes
(`rewrite_export`, e.g. to merge adapters into the weights they adapt); it must
always return a report entry (`report`). The
framework, not the pass, checks that every returned model is valid ONNX.

A pass may also split training into **stages** (`ForwardState.stages`): models
that train one after another on each batch, each with its own loss, gradients and
optimizer, stage i reading what earlier stages pass on. No gradient crosses a
stage boundary, because each stage is its own training graph.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx

EMPTY_OPTIONS_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "properties": {},
    "additionalProperties": False,
}


def fill_defaults(options: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """Fill top-level defaults declared in a pass's options schema."""
    filled = copy.deepcopy(dict(options))
    for key, spec in schema.get("properties", {}).items():
        if key not in filled and isinstance(spec, Mapping) and "default" in spec:
            filled[key] = copy.deepcopy(spec["default"])
    return filled


@dataclasses.dataclass(frozen=True)
class Stage:
    """One separately trained piece of a staged model.

    `model` is a self-contained forward model. Its inputs are data inputs of the
    whole model or tensors that earlier stages pass on (matched by name); `output`
    is the output the recipe's loss is computed on; `passes_on` are outputs fed to
    later stages (the runtime cuts the gradient there). Parameter names that also
    occur in `ForwardState.model` are copied into it by `edgeplug export`; the rest
    (loss heads) train but are not exported.
    """

    name: str
    model: onnx.ModelProto
    trainable: frozenset[str]
    output: str
    passes_on: tuple[str, ...] = ()


@dataclasses.dataclass
class ForwardState:
    """The forward model and the names of the initializers that will get gradients.

    With `stages`, training runs the stages in order instead of `model`, and `model`
    is the inference model that `edgeplug export` fills with the stages' weights.
    """

    model: onnx.ModelProto
    trainable: frozenset[str]
    stages: tuple[Stage, ...] = ()


@dataclasses.dataclass(frozen=True)
class CarriedState:
    """A tensor the training graph carries from one step to the next, declared instead of a Python hook.

    Before every training step a runtime feeds the current value to graph input `input`
    (and to the eval model, when that takes it too); after the step it keeps graph output
    `output` as the next value, when the step's batch matched (see `batch_axis`) and the
    output is finite. The value starts at `initial`, is saved with every checkpoint and
    restored on resume. Any runtime can do this without Python (docs/device-runtime.md).

    `batch_axis`: the axis whose length is the batch size (None: the state does not
    depend on it). A batch of another size (the last, partial one) is fed the
    substitute `other_batch` ("identity": a 2-D identity of the batch's shape,
    "zeros") instead, and leaves the state unchanged.
    """

    input: str
    output: str
    initial: np.ndarray
    batch_axis: int | None = None
    other_batch: str = "identity"


OTHER_BATCH_RULES = ("identity", "zeros")


@dataclasses.dataclass
class TrainingModels:
    """The three models onnxruntime-training generated; parameter names must not change.

    `carried` lists the step-carried state the passes declared (`CarriedState`)."""

    training: onnx.ModelProto
    eval: onnx.ModelProto
    optimizer: onnx.ModelProto
    carried: tuple[CarriedState, ...] = ()


@dataclasses.dataclass(frozen=True)
class PassReport:
    """What a pass did, for report.json: `details` holds its numbers (JSON values only)."""

    changed: bool
    summary: str
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What the framework tells a pass about the run.

    `work_dir` is inside the artifact folder being built: files a pass writes there
    ship with the artifacts (under `passes/<pass name>/`). `calibration` holds the
    arrays from `--calibration-data` when given (for data-driven passes).
    """

    work_dir: Path
    output_name: str
    loss: str
    calibration: Mapping[str, np.ndarray] | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """The whole run as a pass's `requires` sees it before any pass runs.

    `passes` names every pass in run order (normalize first); `position` is this
    pass's index in it.
    """

    passes: tuple[str, ...]
    position: int
    loss: str
    optimizer: str
    output_name: str
    calibration: bool

    @property
    def is_last(self) -> bool:
        return self.position == len(self.passes) - 1


@dataclasses.dataclass(frozen=True)
class RuntimeContext:
    """What a pass's runtime hooks get: the artifact folder and the pass's own files."""

    artifact_dir: Path
    pass_dir: Path


@dataclasses.dataclass(frozen=True)
class ExportContext:
    """What a pass's `rewrite_export` gets: the artifact folder, the pass's own files, and the `details`
    its report entry recorded at rewrite time (JSON values)."""

    artifact_dir: Path
    pass_dir: Path
    details: Mapping[str, Any]


class Pass:
    """Base class for passes. Subclasses set `name`, `summary` and `options_schema`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options_schema: ClassVar[Mapping[str, Any]] = EMPTY_OPTIONS_SCHEMA

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)

    def requires(self, plan: Plan) -> None:
        """Preconditions on the recipe, checked for every pass before any pass runs (e.g. "must be
        last", "needs cross-entropy", "needs calibration data"). Raise RecipeError saying what to change."""

    def rewrite_forward(self, state: ForwardState, context: PassContext) -> ForwardState:
        """Rewrite the forward model and/or the trainable set. Default: unchanged."""
        return state

    def rewrite_training(self, models: TrainingModels, context: PassContext) -> TrainingModels:
        """Rewrite the generated training models. Default: unchanged."""
        return models

    def runtime_hooks(self, context: RuntimeContext) -> object | None:
        """Return an object with `@edgeplug.hookimpl` methods for the training loop, or None."""
        return None

    def rewrite_export(self, model: onnx.ModelProto, context: ExportContext) -> onnx.ModelProto:
        """Rewrite the exported inference model (trained weights in place) before it is written.
        Default: unchanged. Runs where `edgeplug export` runs, so the plugin must be installed there."""
        return model

    def report(self) -> PassReport:
        """Say what the pass changed, with numbers. Every pass must implement this."""
        raise NotImplementedError(f"pass {self.name!r} does not implement report()")


@dataclasses.dataclass(frozen=True)
class PassInfo:
    """A registered pass and where it came from."""

    name: str
    summary: str
    plugin: str
    version: str
    factory: type[Pass]
