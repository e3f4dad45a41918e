"""The rewrite pipeline: model + recipe -> passes -> onnxruntime-training artifacts.

`rewrite` loads and checks its inputs, then a `Rewrite` runs the passes and writes
one artifact set (or one per stage) with the report on top. The pieces it calls
have a module each: `pass_checks` (what is checked around every pass phase),
`trainability` (what the runtime can train), `generation` (onnxruntime-training's
generate_artifacts, ORT conversion, smoke load), `report` (report.json),
`surgery` (pruning to the output).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeplug.artifacts import is_artifact_folder
from edgeplug.atomic import atomic_directory
from edgeplug.device_contract import device_runtime, write_device_files
from edgeplug.errors import ModelError, NoGradientError, RecipeError
from edgeplug.generation import convert_to_ort, generate, name_targets_labels, smoke_load
from edgeplug.gradients import missing_gradients
from edgeplug.graph import GraphIndex
from edgeplug.guard import (
    RUNTIME_FOOTPRINT,
    check_artifacts_budget,
    check_forward_budget,
    check_pass_timeout,
    parse_size,
    pass_timeout_from_environment,
    trim_heap,
)
from edgeplug.layout import (
    EVAL_MODEL,
    FORWARD_MODEL,
    OPTIMIZER_MODEL,
    RECIPE_FILE,
    REPORT_FILE,
    TRAINING_MODEL,
    stage_dir,
)
from edgeplug.locking import output_lock, real_target
from edgeplug.modelio import check_model, load_model, save_model
from edgeplug.pass_checks import check_forward, check_stages, check_training, run_phase
from edgeplug.passes import ForwardState, Pass, PassContext, PassInfo, Plan, TrainingModels, fill_defaults
from edgeplug.plugins import CORE_STAGES, PluginHost, default_host
from edgeplug.progress import Progress
from edgeplug.recipe import PassSpec, Recipe, check_recipe, load_recipe
from edgeplug.report import SourceModel, artifact_sizes, build_report, check_report, report_entry
from edgeplug.surgery import extract
from edgeplug.trainability import check_runtime_support, check_trainable_widths, untie_frozen_norm_parameters
from edgeplug.validation import first_error


@dataclasses.dataclass(frozen=True)
class RewriteResult:
    """Where the artifacts went and what report.json says."""

    output_dir: Path
    report: Mapping[str, Any]


log = logging.getLogger(__name__)


def rewrite(
    model: str | Path | onnx.ModelProto,
    recipe: str | Path | Recipe | None = None,
    output_dir: str | Path = "out",
    *,
    force: bool = False,
    calibration: Mapping[str, np.ndarray] | None = None,
    host: PluginHost | None = None,
    max_memory: int | str | None = None,
    pass_timeout: float | None = None,
    ort_format: bool = False,
    nominal_checkpoint: bool = False,
) -> RewriteResult:
    """Run the recipe's passes on `model` and write training artifacts to `output_dir`.

    The folder appears whole or not at all. Raises an EdgeplugError subclass on bad
    input; the message names the problem and what to do. `max_memory` (bytes or
    "512M") refuses artifacts whose training step at batch size 1 would not fit;
    `pass_timeout` (seconds, 0 for none) defaults to EDGEPLUG_PASS_TIMEOUT or 600 s.
    For mobile apps: `ort_format` also writes ORT-format copies of the training, eval
    and optimizer models (after the passes; the .onnx files stay), `nominal_checkpoint`
    a checkpoint without parameter values (names, shapes, dtypes) for apps that bundle
    the training model and fill in the weights at run time.
    """
    host = host or default_host()
    budget = parse_size(max_memory) if max_memory is not None else None
    timeout = pass_timeout_from_environment() if pass_timeout is None else (check_pass_timeout(pass_timeout) or None)
    source = str(model) if not isinstance(model, onnx.ModelProto) else "<ModelProto>"
    loaded = model if isinstance(model, onnx.ModelProto) else load_model(model)
    check_model(loaded)
    if recipe is None:
        recipe = Recipe(passes=())
    elif not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, host=host)
    else:  # built in Python: the same checks as a recipe file (finite numbers, schema)
        check_recipe(recipe)
    passes = _instantiate(recipe, host, timeout)
    output_name = _output_name(loaded, recipe)
    _check_preconditions(passes, recipe, output_name, calibration is not None, timeout)

    shown = Path(output_dir)
    output_dir = real_target(output_dir)  # `-o .`, `-o link`: the real folder, one lock, staging beside it
    with output_lock(output_dir, purpose=f"edgeplug rewrite {source} -o {shown}"), \
            atomic_directory(output_dir, overwrite=force, replaceable=is_artifact_folder,
                             replaceable_kind="an edgeplug artifact folder") as stage:
        context = PassContext(work_dir=stage / "passes", output_name=output_name, loss=recipe.loss, calibration=calibration)
        with Progress("rewrite", total=2 * len(passes) + 2, unit="phase") as bar:
            run = Rewrite(recipe, passes, context, SourceModel.of(source, loaded), output_name, timeout=timeout, budget=budget,
                          ort_format=ort_format, nominal_checkpoint=nominal_checkpoint, progress=bar)
            start = [ForwardState(loaded, frozenset(GraphIndex(loaded).parameters()))]
            del loaded  # from here only the passes' states hold the model: the source goes once a pass replaces it
            state = run.forward(start)
            if state.stages:  # each stage is an artifact set: generation, every pass's rewrite_training, device files
                bar.set_total(len(passes) + len(state.stages) * (len(passes) + 2))
            report = run.write_stages(state, stage) if state.stages else run.write_folder(state, stage)
    return RewriteResult(shown, report)


@dataclasses.dataclass
class Rewrite:
    """One run of the recipe's passes and the artifacts written from their result.

    Holds what every step needs (the passes, their context, limits and output
    options, the time each pass took) so each step takes only its own arguments.
    """

    recipe: Recipe
    passes: list[tuple[PassInfo, Pass]]
    context: PassContext
    source: SourceModel
    output_name: str
    timeout: float | None = None
    budget: int | None = None
    ort_format: bool = False
    nominal_checkpoint: bool = False
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    progress: Progress = dataclasses.field(default_factory=lambda: Progress("rewrite", show=False))
    """The bar a person watching the rewrite sees (one item per pass phase and artifact-set step)."""

    def _phase(self, text: str) -> None:
        """Say what runs now, on the bar and in the debug log."""
        self.progress.status(text)
        log.debug("%s", text)

    def forward(self, start: list[ForwardState]) -> ForwardState:
        """Every pass's rewrite_forward, in recipe order, each result checked. `start` holds the first state and
        is emptied, so that no caller keeps the source model alive once a pass has replaced it."""
        state = start.pop()
        staged_by: str | None = None
        for info, instance in self.passes:
            if staged_by is not None:
                raise RecipeError(f"pass '{info.name}' comes after '{staged_by}', which split the model into training "
                                  f"stages; list '{staged_by}' last")
            started = time.perf_counter()
            self._phase(f"{info.name}: rewrite_forward")
            state = run_phase(info, "rewrite_forward", instance.rewrite_forward, state, self._context(info), timeout=self.timeout)
            trim_heap()  # what the pass freed (sessions, protobufs) leaves the process before the checks and the next pass
            check_forward(info, state)
            trim_heap()
            self.progress.advance()
            if state.stages:
                check_stages(info, state, self.output_name)
                staged_by = info.name
            self.timings[info.name] = time.perf_counter() - started
        return state

    def write_folder(self, state: ForwardState, out: Path) -> dict[str, Any]:
        """A plain artifact folder: one artifact set, recipe.json and report.json."""
        forward = _prune_to_output(state.model, self.output_name, reuse=True)  # the passes are done with state.model
        trainable = sorted(state.trainable)
        if not trainable:
            raise RecipeError("no parameter is trainable after the passes ran; widen the 'trainable' pass's selection")
        device = self.write_artifact_set(forward, trainable, self.output_name, out)
        report = build_report(self.source, forward, self.recipe, self.output_name, trainable,
                              self._entries(), out)
        report["training"]["carried_state"] = device["carried_state"]
        report["device_runtime"] = device_runtime(report, self.recipe.to_dict(), [device])
        self._write_documents(out, report)
        check_artifacts_budget(out, 1, self.budget, baseline=RUNTIME_FOOTPRINT,
                               when="train fewer parameters or layers (the 'trainable' pass) or use sgd")
        return report

    def write_artifact_set(self, forward: onnx.ModelProto, trainable: list[str], output_name: str, folder: Path, *,
                           passes_on: tuple[str, ...] = (), label: str = "", relative_dir: str = ".") -> dict[str, Any]:
        """One artifact set in `folder`: checks, budget, generation, every pass's rewrite_training, the device
        runtime's files, smoke load. Returns the set's entry of report.json `device_runtime.artifact_sets`."""
        check_trainable_widths(forward, output_name, trainable, label)
        check_runtime_support(forward, output_name, trainable, label)
        untie_frozen_norm_parameters(forward, trainable)
        missing = missing_gradients(forward, set(trainable), output_name)
        if missing:
            raise NoGradientError(label + missing[0].message() + (f" ({len(missing) - 1} more such ops)" if len(missing) > 1 else ""))
        check_forward_budget(forward, trainable, self.recipe.optimizer, self.budget)
        self._phase(f"{label}generating the training, eval and optimizer models (onnxruntime-training)")
        generate(forward, trainable, self.recipe, output_name, folder, nominal_checkpoint=self.nominal_checkpoint,
                 passes_on=passes_on)
        trim_heap()  # generate_artifacts' copies of the model
        models = TrainingModels(*(onnx.load(str(folder / name)) for name in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL)))
        name_targets_labels(models.training)
        name_targets_labels(models.eval)
        self.progress.advance()
        for info, instance in self.passes:
            started = time.perf_counter()
            self._phase(f"{label}{info.name}: rewrite_training")
            models = run_phase(info, "rewrite_training", instance.rewrite_training, models, self._context(info),
                               timeout=self.timeout)
            check_training(info, models)
            self.timings[info.name] += time.perf_counter() - started
            self.progress.advance()
        self._phase(f"{label}writing the device files and loading the artifacts once")
        for name, proto in zip((TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL), (models.training, models.eval, models.optimizer), strict=True):
            save_model(proto, folder / name)
        save_model(forward, folder / FORWARD_MODEL)
        device = write_device_files(folder, models, {t.name for t in forward.graph.initializer}, trainable,
                                    output=output_name, passes_on=passes_on, relative_dir=relative_dir)
        del models  # written: the smoke load reads the files, and the device holds no second copy meanwhile
        trim_heap()
        smoke_load(folder)
        trim_heap()
        if self.ort_format:
            convert_to_ort(folder)
            smoke_load(folder, ort_format=True)
        self.progress.advance()
        return device

    def write_stages(self, state: ForwardState, out: Path) -> dict[str, Any]:
        """One regular artifact set per stage under stages/<i>/, the inference model and report.json on top."""
        passed: set[str] = set()
        stage_reports: list[dict[str, Any]] = []
        devices: list[dict[str, Any]] = []
        for number, stage in enumerate(state.stages):
            folder = out / stage_dir(number)
            folder.mkdir(parents=True)
            forward = _prune_to_output(stage.model, stage.output, stage.passes_on)
            trainable = sorted(stage.trainable)
            devices.append(self.write_artifact_set(forward, trainable, stage.output, folder, passes_on=stage.passes_on,
                                                   label=f"stage {stage.name!r}: ", relative_dir=stage_dir(number)))
            stage_report = build_report(self.source, forward, self.recipe, stage.output, trainable, [],
                                        folder, data_inputs=passed)
            stage_report["training"]["carried_state"] = devices[-1]["carried_state"]
            self._write_documents(folder, stage_report)
            stage_reports.append(stage_report)
            passed |= set(stage.passes_on)

        inference = _prune_to_output(state.model, self.output_name)
        save_model(inference, out / FORWARD_MODEL)
        trainable_all = sorted({name for stage in state.stages for name in stage.trainable})
        exported = {tensor.name for tensor in inference.graph.initializer}
        report = build_report(self.source, inference, self.recipe, self.output_name,
                              [n for n in trainable_all if n in exported], self._entries(), out)
        report["parameters"] = {
            "trainable": trainable_all,
            "trainable_count": len(trainable_all),
            "frozen_count": sum(r["parameters"]["frozen_count"] for r in stage_reports),
            "trainable_values": sum(r["parameters"]["trainable_values"] for r in stage_reports),
            "total_values": sum(r["parameters"]["total_values"] for r in stage_reports),
        }
        report["stages"] = [
            {
                "name": stage.name,
                "dir": stage_dir(number),
                "inputs": [value.name for value in onnx.load(str(out / stage_dir(number) / FORWARD_MODEL)).graph.input],
                "output": stage.output,
                "passes_on": list(stage.passes_on),
                "trainable_count": stage_report["parameters"]["trainable_count"],
                "trainable_values": stage_report["parameters"]["trainable_values"],
            }
            for number, (stage, stage_report) in enumerate(zip(state.stages, stage_reports, strict=True))
        ]
        for number in range(len(state.stages)):
            report["artifacts"].update(artifact_sizes(out / stage_dir(number), prefix=f"{stage_dir(number)}/"))
        report["training"]["carried_state"] = []
        report["device_runtime"] = device_runtime(report, self.recipe.to_dict(), devices)
        self._write_documents(out, report)
        check_artifacts_budget(out, 1, self.budget, baseline=RUNTIME_FOOTPRINT,
                               when="split the model into fewer stages, train fewer parameters or use sgd")
        return report

    def _context(self, info: PassInfo) -> PassContext:
        return dataclasses.replace(self.context, work_dir=self.context.work_dir / info.name)

    def _entries(self) -> list[dict[str, Any]]:
        return [report_entry(info, instance, self.timings[info.name], self.timeout) for info, instance in self.passes]

    def _write_documents(self, folder: Path, report: dict[str, Any]) -> None:
        check_report(report)
        (folder / RECIPE_FILE).write_text(json.dumps(self.recipe.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _instantiate(recipe: Recipe, host: PluginHost, timeout: float | None = None) -> list[tuple[PassInfo, Pass]]:
    specs = list(recipe.passes)
    listed = {spec.name for spec in specs}
    for name in sorted(CORE_STAGES - listed):  # the core's stages run first, with defaults unless the recipe sets them
        specs.insert(0, PassSpec(name, fill_defaults({}, host.get_pass(name).factory.options_schema)))
    instances = []
    for spec in specs:
        info = host.get_pass(spec.name)
        problem = first_error(dict(spec.options), info.factory.options_schema)
        if problem:
            raise RecipeError(f"options of pass '{spec.name}': {problem}")
        instance = run_phase(info, "__init__", info.factory, dict(spec.options), timeout=timeout)
        instances.append((info, instance))
    return instances


def _check_preconditions(passes: list[tuple[PassInfo, Pass]], recipe: Recipe, output_name: str, calibration: bool,
                         timeout: float | None) -> None:
    """Every pass's `requires`, before any pass runs: a recipe a pass cannot serve fails at once."""
    names = tuple(info.name for info, _ in passes)
    for position, (info, instance) in enumerate(passes):
        plan = Plan(names, position, recipe.loss, recipe.optimizer, output_name, calibration)
        run_phase(info, "requires", instance.requires, plan, timeout=timeout)


def _output_name(model: onnx.ModelProto, recipe: Recipe) -> str:
    outputs = [value.name for value in model.graph.output]
    if not outputs:
        raise ModelError("the model has no outputs")
    if recipe.output is None:
        return outputs[0]
    if recipe.output not in outputs:
        raise RecipeError(f"output: the model has no output named {recipe.output!r} (outputs: {', '.join(outputs)})")
    return recipe.output


def _prune_to_output(model: onnx.ModelProto, output_name: str, also: tuple[str, ...] = (), *,
                     reuse: bool = False) -> onnx.ModelProto:
    """Keep only the trained output (and `also`, outputs a stage passes on) and what computes them.

    With `reuse`, a model that has nothing to prune is returned itself rather than copied (the caller then
    owns it): the artifact generation that follows holds one copy of the weights less."""
    if reuse and _nothing_to_prune(model, [output_name, *also]):
        return model
    return extract(model, [output_name, *also], [value.name for value in model.graph.input
                                                 if value.name not in {t.name for t in model.graph.initializer}])


def _nothing_to_prune(model: onnx.ModelProto, outputs: list[str]) -> bool:
    """The model's outputs are exactly `outputs`, every node computes part of them and every initializer is read."""
    graph = model.graph
    if [value.name for value in graph.output] != outputs or model.functions or any(
            attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for node in graph.node for attribute in node.attribute):
        return False
    names = [node.name for node in graph.node]
    if "" in names or len(set(names)) < len(names):  # ancestors() goes by node name
        return False
    needed = GraphIndex(model).ancestors(outputs)
    read = {name for node in graph.node for name in node.input if name}
    return all(node.name in needed for node in graph.node) and all(tensor.name in read for tensor in graph.initializer)
