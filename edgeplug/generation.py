"""onnxruntime-training's part of a rewrite: generate_artifacts, ORT-format conversion, the smoke load.

Native failures become one-line errors: a missing gradient builder a NoGradientError
naming the op and the parameters that drag it in, anything else a ModelError.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import onnx

from edgeplug import _ort
from edgeplug.errors import DiskFullError, ModelError, NoGradientError, disk_full_detail, is_disk_full
from edgeplug.gradients import MissingGradient
from edgeplug.graph import GraphIndex
from edgeplug.layout import LABELS_INPUT, ORT_MODELS
from edgeplug.losses import LOSS_TYPES
from edgeplug.modelio import clamp_ir_version
from edgeplug.optimizers import OPTIMIZER_TYPES
from edgeplug.recipe import Recipe

_NO_GRADIENT = re.compile(r"gradient builder has not been registered:\s*(\w+)(?: for node (\S*))?")


def generate(forward: onnx.ModelProto, trainable: list[str], recipe: Recipe, output_name: str, stage: Path,
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
    raise ModelError(f"onnxruntime-training could not build the training graph: {runtime_message(error)}") from None


_ORT_TARGET_INPUT = "target"
"""onnxruntime-training names the target of its MSE, BCE and L1 losses 'target' (cross entropy: 'labels')."""


def name_targets_labels(model: onnx.ModelProto) -> None:
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


def runtime_message(error: BaseException) -> str:
    """onnxruntime's message on one line, from its '[ONNXRuntimeError] ... FAIL :' part on."""
    text = " ".join(str(error).split())
    for marker in (" FAIL : ", " INVALID_ARGUMENT : ", " INVALID_GRAPH : ", " NOT_IMPLEMENTED : "):
        if marker in text:
            text = text.split(marker, 1)[1]
            break
    return text[:800]


def smoke_load(stage: Path, *, ort_format: bool = False) -> None:
    """Load the artifacts once, so a folder that cannot train is never published."""
    with _ort.captured_native_stderr():
        try:
            _ort.open_artifacts(stage, ort_format=ort_format)
        except Exception as error:
            which = "ORT-format artifacts" if ort_format else "artifacts"
            raise ModelError(f"the generated {which} do not load in onnxruntime-training: {runtime_message(error)}") from None


def convert_to_ort(stage: Path) -> None:
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
        detail = runtime_message(error) if error is not None else log[-800:]
        raise ModelError(f"could not convert the training models to ORT format: {detail}; "
                         "rewrite without --ort-format and report it") from None
