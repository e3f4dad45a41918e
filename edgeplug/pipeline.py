"""The rewrite pipeline: model + recipe -> passes -> onnxruntime-training artifacts."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx

from edgeplug import __version__, _ort
from edgeplug.artifacts import is_artifact_folder
from edgeplug.atomic import atomic_directory
from edgeplug.device_contract import check_carried, device_runtime, write_device_files
from edgeplug.errors import (
    DiskFullError,
    EdgeplugError,
    ModelError,
    NoGradientError,
    PassError,
    PluginError,
    RecipeError,
    disk_full_detail,
    is_disk_full,
)
from edgeplug.gradients import MissingGradient, missing_gradients
from edgeplug.graph import GraphIndex, tensor_values
from edgeplug.guard import (
    RUNTIME_FOOTPRINT,
    PassTimeout,
    check_artifacts_budget,
    check_forward_budget,
    check_pass_timeout,
    parse_size,
    pass_timeout_from_environment,
    time_limit,
)
from edgeplug.layout import (
    CARRIED_STATE_FILE,
    CHECKPOINT,
    EVAL_MODEL,
    FORWARD_MODEL,
    GRADIENTS_MODEL,
    LABELS_INPUT,
    NOMINAL_CHECKPOINT,
    OPERATOR_CONFIGS,
    OPTIMIZER_MODEL,
    OPTIMIZER_STEP_MODEL,
    ORT_MODELS,
    RECIPE_FILE,
    REPORT_FILE,
    TRAINING_MODEL,
    stage_dir,
)
from edgeplug.locking import output_lock, real_target
from edgeplug.losses import LOSS_TYPES
from edgeplug.modelio import (
    check_model,
    clamp_ir_version,
    default_opset,
    load_model,
    save_model,
)
from edgeplug.optimizers import OPTIMIZER_TYPES
from edgeplug.passes import (
    ForwardState,
    Pass,
    PassContext,
    PassInfo,
    PassReport,
    Stage,
    TrainingModels,
    fill_defaults,
)
from edgeplug.plugins import PluginHost, default_host
from edgeplug.recipe import PassSpec, Recipe, check_recipe, load_recipe
from edgeplug.surgery import extract
from edgeplug.trainability import check_runtime_support
from edgeplug.validation import first_error, load_schema

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class RewriteResult:
    """Where the artifacts went and what report.json says."""

    output_dir: Path
    report: Mapping[str, Any]


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

    shown = Path(output_dir)
    output_dir = real_target(output_dir)  # `-o .`, `-o link`: the real folder, one lock, staging beside it
    with output_lock(output_dir, purpose=f"edgeplug rewrite {source} -o {shown}"), \
            atomic_directory(output_dir, overwrite=force, replaceable=is_artifact_folder,
                             replaceable_kind="an edgeplug artifact folder") as stage:
        context = PassContext(work_dir=stage / "passes", output_name=output_name, loss=recipe.loss, calibration=calibration)
        index = GraphIndex(loaded)
        state = ForwardState(loaded, frozenset(index.parameters()))
        entries: list[dict[str, Any]] = []
        timings: dict[str, float] = {}
        staged_by: str | None = None
        for info, instance in passes:
            if staged_by is not None:
                raise RecipeError(f"pass '{info.name}' comes after '{staged_by}', which split the model into training "
                                  f"stages; list '{staged_by}' last")
            started = time.perf_counter()
            state = _run_phase(info, "rewrite_forward", instance.rewrite_forward, state, _pass_context(context, info), timeout=timeout)
            _check_forward(info, state)
            if state.stages:
                _check_stages(info, state, loaded, output_name)
                staged_by = info.name
            timings[info.name] = time.perf_counter() - started
        if state.stages:
            report = _write_stages(state, passes, context, timings, recipe, source, loaded, output_name, stage,
                                   timeout=timeout, budget=budget, ort_format=ort_format, nominal_checkpoint=nominal_checkpoint)
            return RewriteResult(shown, report)
        forward = _prune_to_output(state.model, output_name)
        trainable = sorted(state.trainable)
        if not trainable:
            raise RecipeError("no parameter is trainable after the passes ran; widen the 'trainable' pass's selection")
        device = _write_training_models(forward, trainable, output_name, stage, passes, context, timings, recipe,
                                        timeout=timeout, budget=budget, ort_format=ort_format, nominal_checkpoint=nominal_checkpoint)
        for info, instance in passes:
            entries.append(_report_entry(info, instance, timings[info.name], timeout))
        report = _report(source, loaded, forward, recipe, output_name, trainable, entries, stage)
        report["training"]["carried_state"] = device["carried_state"]
        report["device_runtime"] = device_runtime(report, recipe.to_dict(), [device])
        _check_report(report)
        (stage / RECIPE_FILE).write_text(json.dumps(recipe.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        (stage / REPORT_FILE).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        check_artifacts_budget(stage, 1, budget, baseline=RUNTIME_FOOTPRINT,
                               when="train fewer parameters or layers (the 'trainable' pass) or use sgd")
    return RewriteResult(shown, report)


def _instantiate(recipe: Recipe, host: PluginHost, timeout: float | None = None) -> list[tuple[PassInfo, Pass]]:
    specs = list(recipe.passes)
    if not any(spec.name == "normalize" for spec in specs):
        if "normalize" not in host.passes():
            raise PluginError("the 'normalize' pass always runs first but its plugin is not loaded; add 'normalize' to EDGEPLUG_PLUGINS")
        normalize = host.get_pass("normalize").factory
        specs.insert(0, PassSpec("normalize", fill_defaults({}, normalize.options_schema)))
    instances = []
    for spec in specs:
        info = host.get_pass(spec.name)
        problem = first_error(dict(spec.options), info.factory.options_schema)
        if problem:
            raise RecipeError(f"options of pass '{spec.name}': {problem}")
        instance = _run_phase(info, "__init__", info.factory, dict(spec.options), timeout=timeout)
        instances.append((info, instance))
    return instances


def _pass_context(context: PassContext, info: PassInfo) -> PassContext:
    return dataclasses.replace(context, work_dir=context.work_dir / info.name)


def _run_phase(info: PassInfo, phase: str, call: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
    """Call one phase of a pass under a time limit; any failure names the pass and the phase."""
    stopped = (f"pass '{info.name}' ({phase}): did not finish within {timeout:g} s and ignored every interruption "
               f"(plugin '{info.plugin}' {info.version}); stopped edgeplug: report it to the plugin's author" if timeout else "")
    try:
        with time_limit(timeout, stopped):
            return call(*args)
    except PassTimeout as error:
        raise PassError(info.name, phase, f"{error} (plugin '{info.plugin}' {info.version}); the plugin hangs or the "
                        "model is very large: report it to the plugin's author, or raise EDGEPLUG_PASS_TIMEOUT") from None
    except EdgeplugError as error:
        if not isinstance(error, PassError):
            error.args = (f"pass '{info.name}': {error}",)
        raise
    except OSError as error:
        if is_disk_full(error):  # not the plugin's fault
            raise DiskFullError(disk_full_detail(error)) from None
        raise PassError(info.name, phase, f"raised {type(error).__name__}: {error} (plugin '{info.plugin}' {info.version})") from error
    except (Exception, SystemExit) as error:  # a plugin bug: name the pass and phase, keep the cause for --debug
        raise PassError(info.name, phase, f"raised {type(error).__name__}: {error} (plugin '{info.plugin}' {info.version})") from error


def _check_forward(info: PassInfo, state: object) -> None:
    if not isinstance(state, ForwardState) or not isinstance(state.model, onnx.ModelProto):
        raise PassError(info.name, "rewrite_forward", f"returned {type(state).__name__}, expected ForwardState")
    try:
        check_model(state.model, full=True)
    except ModelError as error:
        raise PassError(info.name, "rewrite_forward", f"returned an invalid model: {error}") from None
    parameters = set(GraphIndex(state.model).parameters())
    unknown = sorted(set(state.trainable) - parameters)
    if unknown:
        raise PassError(info.name, "rewrite_forward", f"marked non-parameters as trainable: {', '.join(unknown[:5])}")




def _check_training(info: PassInfo, models: object) -> None:
    if not isinstance(models, TrainingModels):
        raise PassError(info.name, "rewrite_training", f"returned {type(models).__name__}, expected TrainingModels")
    for label, proto in (("training", models.training), ("eval", models.eval), ("optimizer", models.optimizer)):
        try:
            onnx.checker.check_model(_runtime_gradient_ops_apart(proto) if label == "training" else proto)
        except onnx.checker.ValidationError as error:
            raise PassError(info.name, "rewrite_training", f"returned an invalid {label} model: {str(error).splitlines()[0]}") from None
    problem = check_carried(models.carried, models)
    if problem:
        raise PassError(info.name, "rewrite_training", problem)


def _runtime_gradient_ops_apart(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for the checker with onnxruntime's *Grad ops (MaxPoolGrad) moved out of the ONNX domain.

    onnxruntime puts some gradient ops in the ONNX domain, where onnx does not know
    them; the checker would stop at the first one and check nothing after it.
    """
    if not any(node.op_type.endswith("Grad") and node.domain in ("", "ai.onnx") for node in model.graph.node):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type.endswith("Grad") and node.domain in ("", "ai.onnx"):
            node.domain = "com.microsoft"
    if not any(opset.domain == "com.microsoft" for opset in copy.opset_import):
        copy.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return copy


def _output_name(model: onnx.ModelProto, recipe: Recipe) -> str:
    outputs = [value.name for value in model.graph.output]
    if not outputs:
        raise ModelError("the model has no outputs")
    if recipe.output is None:
        return outputs[0]
    if recipe.output not in outputs:
        raise RecipeError(f"output: the model has no output named {recipe.output!r} (outputs: {', '.join(outputs)})")
    return recipe.output


def _prune_to_output(model: onnx.ModelProto, output_name: str, also: tuple[str, ...] = ()) -> onnx.ModelProto:
    """Keep only the trained output (and `also`, outputs a stage passes on) and what computes them."""
    return extract(model, [output_name, *also], [value.name for value in model.graph.input
                                                 if value.name not in {t.name for t in model.graph.initializer}])


_NO_GRADIENT = re.compile(r"gradient builder has not been registered:\s*(\w+)(?: for node (\S*))?")


def _generate(forward: onnx.ModelProto, trainable: list[str], recipe: Recipe, output_name: str, stage: Path,
              *, nominal_checkpoint: bool = False, passes_on: tuple[str, ...] = ()) -> None:
    artifacts = _ort.training_artifacts()
    trainable_set = set(trainable)
    frozen = [t.name for t in forward.graph.initializer if t.name not in trainable_set]
    with _ort.captured_native_stderr() as native_log:
        try:
            artifacts.generate_artifacts(
                clamp_ir_version(forward),
                requires_grad=trainable,
                frozen_params=frozen,
                loss=getattr(artifacts.LossType, LOSS_TYPES[recipe.loss]),
                optimizer=getattr(artifacts.OptimType, OPTIMIZER_TYPES[recipe.optimizer]),
                artifact_directory=str(stage),
                additional_output_names=[output_name, *passes_on],
                loss_input_names=[output_name],
                nominal_checkpoint=nominal_checkpoint,  # passes keep parameter names, so it stays valid
            )
            error = None
        except Exception as caught:  # onnxruntime raises RuntimeError/Fail/InvalidArgument
            error = caught
    if error is None:
        return
    if is_disk_full(error):
        raise DiskFullError(disk_full_detail(error)) from None
    text = str(error)
    match = _NO_GRADIENT.search(text + "\n" + "\n".join(native_log))
    if match:
        op_type, node_name = match.group(1), (match.group(2) or "?")
        index = GraphIndex(forward)
        dragging = tuple(p for p in trainable if node_name in index.descendants([p]))
        raise NoGradientError(MissingGradient(op_type, node_name, dragging or tuple(trainable)).message()) from None
    raise ModelError(f"onnxruntime-training could not build the training graph: {_runtime_message(error)}") from None


_ORT_TARGET_INPUT = "target"
"""onnxruntime-training names the target of its MSE, BCE and L1 losses 'target' (cross entropy: 'labels')."""


def _name_targets_labels(model: onnx.ModelProto) -> None:
    """One name for the label input whatever the loss, so the same .npz trains every recipe."""
    graph = model.graph
    names = {value.name for value in graph.input}
    if _ORT_TARGET_INPUT not in names or LABELS_INPUT in names:
        return  # cross-entropy (its input is 'labels' already; a 'target' is then the model's own tensor)
    for value in graph.input:
        if value.name == _ORT_TARGET_INPUT:
            value.name = LABELS_INPUT
    for node in graph.node:
        node.input[:] = [LABELS_INPUT if name == _ORT_TARGET_INPUT else name for name in node.input]


def _runtime_message(error: BaseException) -> str:
    """onnxruntime's message on one line, from its '[ONNXRuntimeError] ... FAIL :' part on."""
    text = " ".join(str(error).split())
    for marker in (" FAIL : ", " INVALID_ARGUMENT : ", " INVALID_GRAPH : ", " NOT_IMPLEMENTED : "):
        if marker in text:
            text = text.split(marker, 1)[1]
            break
    return text[:800]


def _smoke_load(stage: Path, *, ort_format: bool = False) -> None:
    """Load the artifacts once, so a folder that cannot train is never published."""
    with _ort.captured_native_stderr():
        try:
            _ort.open_artifacts(stage, ort_format=ort_format)
        except Exception as error:
            which = "ORT-format artifacts" if ort_format else "artifacts"
            raise ModelError(f"the generated {which} do not load in onnxruntime-training: {_runtime_message(error)}") from None


def _convert_to_ort(stage: Path) -> None:
    """Write X.ort (and X.required_operators.config) beside each final training/eval/optimizer model.

    The same conversion generate_artifacts(ort_format=True) does, run here on the models
    the passes rewrote; its progress output is swallowed unless it fails.
    """
    converter = _ort.ort_converter()
    chatter = io.StringIO()
    with _ort.captured_native_stderr() as native_log, contextlib.redirect_stdout(chatter):
        try:
            for name in ORT_MODELS:
                converter.convert_onnx_models_to_ort(
                    stage / name, output_dir=stage, optimization_styles=[converter.OptimizationStyle.Fixed])
            error = None
        except Exception as caught:
            error = caught
    missing = [ort for ort in ORT_MODELS.values() if not (stage / ort).is_file()]
    if error is not None or missing:
        log = " ".join([*chatter.getvalue().split(), *" ".join(native_log).split()]) or "no output"
        detail = _runtime_message(error) if error is not None else log[-800:]
        raise ModelError(f"could not convert the training models to ORT format: {detail}; "
                         "rewrite without --ort-format and report it") from None


def _report_entry(info: PassInfo, instance: Pass, seconds: float, timeout: float | None = None) -> dict[str, Any]:
    report = _run_phase(info, "report", instance.report, timeout=timeout)
    if not isinstance(report, PassReport):
        raise PassError(info.name, "report", f"returned {type(report).__name__}, expected PassReport")
    try:
        details = json.loads(json.dumps(dict(report.details), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise PassError(info.name, "report", f"details are not JSON values: {error}") from None
    return {
        "name": info.name,
        "plugin": info.plugin,
        "version": info.version,
        "changed": bool(report.changed),
        "summary": str(report.summary),
        "details": details,
        "seconds": round(seconds, 4),
        "runtime_hooks": type(instance).runtime_hooks is not Pass.runtime_hooks,
    }


def _report(source: str, original: onnx.ModelProto, forward: onnx.ModelProto, recipe: Recipe, output_name: str,
            trainable: list[str], entries: list[dict[str, Any]], stage: Path,
            data_inputs: set[str] | None = None) -> dict[str, Any]:
    sizes = {tensor.name: tensor_values(tensor) for tensor in forward.graph.initializer}
    source_inputs = {value.name for value in original.graph.input} | (data_inputs or set())
    parameters = GraphIndex(forward).parameters()
    trainable_values = sum(sizes[name] for name in trainable)
    report = {
        "edgeplug_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "path": source,
            "sha256": hashlib.sha256(original.SerializeToString()).hexdigest(),
            "ir_version": int(original.ir_version),
            "opset": default_opset(original),
            "producer": f"{original.producer_name} {original.producer_version}".strip(),
        },
        "training": {
            "output": output_name,
            "output_shape": _describe(next(v for v in forward.graph.output if v.name == output_name))["shape"],
            "loss": recipe.loss,
            "optimizer": recipe.optimizer,
            "lr": recipe.lr,
            "inputs": [_describe(value) for value in forward.graph.input if value.name in source_inputs],
            "extra_inputs": _extra_inputs(forward, stage, source_inputs, set(sizes) | set(trainable)),
            "labels_input": LABELS_INPUT,
        },
        "parameters": {
            "trainable": trainable,
            "trainable_count": len(trainable),
            "frozen_count": len(parameters) - len(set(trainable) & set(parameters)),
            "trainable_values": trainable_values,
            "total_values": sum(sizes[name] for name in parameters),
        },
        "passes": entries,
        "artifacts": _artifact_sizes(stage),
    }
    return report


def _artifact_sizes(folder: Path, prefix: str = "") -> dict[str, int]:
    names = (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, FORWARD_MODEL, CHECKPOINT, NOMINAL_CHECKPOINT,
             *ORT_MODELS.values(), *OPERATOR_CONFIGS.values(), GRADIENTS_MODEL, OPTIMIZER_STEP_MODEL, CARRIED_STATE_FILE)
    return {prefix + name: (folder / name).stat().st_size for name in names if (folder / name).is_file()}


def _check_report(report: Mapping[str, Any]) -> None:
    problem = first_error(dict(report), load_schema("report"))
    if problem:
        raise EdgeplugError(f"internal error: report.json does not match its schema: {problem}")


# -- staged models (a pass returned ForwardState.stages) ----------------------------------


def _check_stages(info: PassInfo, state: ForwardState, original: onnx.ModelProto, output_name: str) -> None:
    """Stages form a chain: each input is data or passed on by an earlier stage; the last trains the output."""
    available = {value.name for value in state.model.graph.input}
    names: set[str] = set()
    for number, stage in enumerate(state.stages):
        where = f"stage {number} ({stage.name!r})"
        if not isinstance(stage, Stage) or not isinstance(stage.model, onnx.ModelProto):
            raise PassError(info.name, "rewrite_forward", f"{where} is {type(stage).__name__}, expected Stage")
        if not stage.name or stage.name in names:
            raise PassError(info.name, "rewrite_forward", f"{where}: stage names must be unique and not empty")
        names.add(stage.name)
        try:
            check_model(stage.model, full=True)
        except ModelError as error:
            raise PassError(info.name, "rewrite_forward", f"{where} is an invalid model: {error}") from None
        parameters = set(GraphIndex(stage.model).parameters())
        if not stage.trainable or not set(stage.trainable) <= parameters:
            bad = sorted(set(stage.trainable) - parameters)[:5]
            raise PassError(info.name, "rewrite_forward", f"{where}: trainable must be parameters of the stage, at least one"
                            + (f" (not parameters: {', '.join(bad)})" if bad else ""))
        outputs = {value.name for value in stage.model.graph.output}
        lacking = [name for name in (stage.output, *stage.passes_on) if name not in outputs]
        if lacking:
            raise PassError(info.name, "rewrite_forward", f"{where} has no output named {', '.join(lacking)}")
        unfed = [value.name for value in stage.model.graph.input if value.name not in available]
        if unfed:
            raise PassError(info.name, "rewrite_forward", f"{where} reads {', '.join(unfed)}, which neither the data "
                            "nor an earlier stage provides")
        available |= set(stage.passes_on)
    if state.stages[-1].output != output_name:
        raise PassError(info.name, "rewrite_forward", f"the last stage trains {state.stages[-1].output!r}, "
                        f"not the model's output {output_name!r}")


def _write_training_models(forward: onnx.ModelProto, trainable: list[str], output_name: str, folder: Path,
                           passes: list[tuple[PassInfo, Pass]], context: PassContext, timings: dict[str, float],
                           recipe: Recipe, *, timeout: float | None, budget: int | None, ort_format: bool,
                           nominal_checkpoint: bool, passes_on: tuple[str, ...] = (), label: str = "",
                           relative_dir: str = ".") -> dict[str, Any]:
    """One artifact set in `folder`: gradient check, budget, generation, every pass's rewrite_training, the device
    runtime's files, smoke load. Returns the set's entry of report.json `device_runtime.artifact_sets`."""
    check_trainable_widths(forward, output_name, trainable, label)
    check_runtime_support(forward, output_name, trainable, label)
    missing = missing_gradients(forward, set(trainable), output_name)
    if missing:
        raise NoGradientError(label + missing[0].message() + (f" ({len(missing) - 1} more such ops)" if len(missing) > 1 else ""))
    check_forward_budget(forward, trainable, recipe.optimizer, budget)
    _generate(forward, trainable, recipe, output_name, folder, nominal_checkpoint=nominal_checkpoint, passes_on=passes_on)
    models = TrainingModels(*(onnx.load(str(folder / name)) for name in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL)))
    _name_targets_labels(models.training)
    _name_targets_labels(models.eval)
    for info, instance in passes:
        started = time.perf_counter()
        models = _run_phase(info, "rewrite_training", instance.rewrite_training, models, _pass_context(context, info), timeout=timeout)
        _check_training(info, models)
        timings[info.name] += time.perf_counter() - started
    for name, proto in zip((TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL), (models.training, models.eval, models.optimizer), strict=True):
        save_model(proto, folder / name)
    save_model(forward, folder / FORWARD_MODEL)
    device = write_device_files(folder, models, {t.name for t in forward.graph.initializer}, trainable, output=output_name,
                                passes_on=passes_on, relative_dir=relative_dir)
    _smoke_load(folder)
    if ort_format:
        _convert_to_ort(folder)
        _smoke_load(folder, ort_format=True)
    return device


def check_trainable_widths(forward: onnx.ModelProto, output_name: str, trainable: list[str], label: str = "") -> None:
    """Refuse zero-width tensors where training would use them: onnxruntime-training crashes natively
    (SIGSEGV in the loss) on an output of width 0, and fails on empty weights and inputs."""
    graph = forward.graph
    for value in graph.output:
        if value.name == output_name and _has_zero_dim(value):
            raise ModelError(f"{label}output '{output_name}' has shape {_shape_text(value)}: a zero-width output "
                             "leaves nothing to train (a classifier with 0 classes?); fix the model's last layer")
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    for name in trainable:
        tensor = initializers.get(name)
        if tensor is not None and 0 in tensor.dims:
            raise ModelError(f"{label}parameter '{name}' has shape {list(tensor.dims)}, no values: a zero-width layer "
                             "cannot be trained; fix the model, or freeze it with the 'trainable' pass")
    for value in graph.input:
        if value.name not in initializers and _has_zero_dim(value, skip_batch=True):
            raise ModelError(f"{label}input '{value.name}' has shape {_shape_text(value)}: zero-width inputs carry "
                             "no data to train on; fix the model's input shape")


def _has_zero_dim(value: onnx.ValueInfoProto, skip_batch: bool = False) -> bool:
    dims = value.type.tensor_type.shape.dim
    return any(d.HasField("dim_value") and d.dim_value == 0 for d in list(dims)[1 if skip_batch else 0:])


def _shape_text(value: onnx.ValueInfoProto) -> str:
    dims = value.type.tensor_type.shape.dim
    return "[" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims) + "]"


def _write_stages(state: ForwardState, passes: list[tuple[PassInfo, Pass]], context: PassContext,
                  timings: dict[str, float], recipe: Recipe, source: str, original: onnx.ModelProto, output_name: str,
                  out: Path, *, timeout: float | None, budget: int | None, ort_format: bool,
                  nominal_checkpoint: bool) -> dict[str, Any]:
    """One regular artifact set per stage under stages/<i>/, the inference model and report.json on top."""
    passed: set[str] = set()
    stage_reports: list[dict[str, Any]] = []
    devices: list[dict[str, Any]] = []
    for number, stage in enumerate(state.stages):
        folder = out / stage_dir(number)
        folder.mkdir(parents=True)
        forward = _prune_to_output(stage.model, stage.output, stage.passes_on)
        trainable = sorted(stage.trainable)
        devices.append(_write_training_models(forward, trainable, stage.output, folder, passes, context, timings, recipe,
                                              timeout=timeout, budget=budget, ort_format=ort_format,
                                              nominal_checkpoint=nominal_checkpoint, passes_on=stage.passes_on,
                                              label=f"stage {stage.name!r}: ", relative_dir=stage_dir(number)))
        stage_report = _report(source, original, forward, recipe, stage.output, trainable, [], folder, data_inputs=passed)
        stage_report["training"]["carried_state"] = devices[-1]["carried_state"]
        _check_report(stage_report)
        (folder / RECIPE_FILE).write_text(json.dumps(recipe.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        (folder / REPORT_FILE).write_text(json.dumps(stage_report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        stage_reports.append(stage_report)
        passed |= set(stage.passes_on)

    inference = _prune_to_output(state.model, output_name)
    save_model(inference, out / FORWARD_MODEL)
    entries = [_report_entry(info, instance, timings[info.name], timeout) for info, instance in passes]
    trainable_all = sorted({name for stage in state.stages for name in stage.trainable})
    exported = {tensor.name for tensor in inference.graph.initializer}
    report = _report(source, original, inference, recipe, output_name, [n for n in trainable_all if n in exported], entries, out)
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
        report["artifacts"].update(_artifact_sizes(out / stage_dir(number), prefix=f"{stage_dir(number)}/"))
    report["training"]["carried_state"] = []
    report["device_runtime"] = device_runtime(report, recipe.to_dict(), devices)
    _check_report(report)
    (out / RECIPE_FILE).write_text(json.dumps(recipe.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    check_artifacts_budget(out, 1, budget, baseline=RUNTIME_FOOTPRINT,
                           when="split the model into fewer stages, train fewer parameters or use sgd")
    return report


def _extra_inputs(forward: onnx.ModelProto, stage: Path, source_inputs: set[str], parameters: set[str]) -> list[dict[str, Any]]:
    """Inputs that passes added and their runtime hooks feed: those of the forward model, then those
    that only the final training model takes (e.g. activation-shortcut's factors); not the data,
    labels, parameters, gradient buffers or onnxruntime's `lazy_reset_grad`. The profiler feeds them."""
    extra = [_describe(value) for value in forward.graph.input if value.name not in source_inputs]
    training_path = stage / TRAINING_MODEL
    if not training_path.is_file():  # the top-level report of a staged folder: the stages list theirs
        return extra
    known = source_inputs | parameters | {value["name"] for value in extra} | {LABELS_INPUT, "lazy_reset_grad"}
    training = onnx.load(str(training_path), load_external_data=False)
    extra += [_describe(value) for value in training.graph.input
              if value.name not in known and not value.name.endswith("_grad.accumulation.buffer")]
    return extra


def _describe(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    return {
        "name": value.name,
        "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "unknown",
        "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim],
    }
