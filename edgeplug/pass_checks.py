"""What the framework checks around each phase of a pass, so that a broken pass is named.

Each phase runs under a time limit; whatever it raises or returns wrong becomes a
PassError naming the pass, the phase and its plugin. Checked after
`rewrite_forward`: a ForwardState comes back whose model (and every stage model)
passes the full ONNX checker, types included, and whose trainable names are
parameters; staged models form a chain. After `rewrite_training`: TrainingModels
whose models pass the checker, and a valid carried-state declaration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import onnx

from edgeplug.device_contract import check_carried
from edgeplug.errors import DiskFullError, EdgeplugError, ModelError, PassError, disk_full_detail, is_disk_full
from edgeplug.graph import GraphIndex
from edgeplug.guard import PassTimeout, time_limit
from edgeplug.modelio import check_model
from edgeplug.passes import ForwardState, PassInfo, Stage, TrainingModels

T = TypeVar("T")


def run_phase(info: PassInfo, phase: str, call: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
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
            message = str(error)
            for own in (f"{info.name}: ", f"pass '{info.name}': "):  # a pass that names itself is named once
                message = message.removeprefix(own)
            error.args = (f"pass '{info.name}': {message}",)
        raise
    except OSError as error:
        if is_disk_full(error):  # not the plugin's fault
            raise DiskFullError(disk_full_detail(error)) from None
        raise PassError(info.name, phase, f"raised {type(error).__name__}: {error} (plugin '{info.plugin}' {info.version})") from error
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: BLE001 - a plugin bug (SystemExit, GeneratorExit too): name the pass and phase
        raise PassError(info.name, phase, f"raised {type(error).__name__}: {error} (plugin '{info.plugin}' {info.version})") from error


def check_forward(info: PassInfo, state: object) -> None:
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


def check_training(info: PassInfo, models: object) -> None:
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


def check_stages(info: PassInfo, state: ForwardState, output_name: str) -> None:
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
