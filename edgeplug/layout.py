"""File names inside an artifact folder written by `edgeplug rewrite`."""

from __future__ import annotations

TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
FORWARD_MODEL = "forward_model.onnx"
CHECKPOINT = "checkpoint"
NOMINAL_CHECKPOINT = "nominal_checkpoint"
"""Written on request (--nominal-checkpoint): parameter names, shapes and dtypes, no values."""
ORT_MODELS = {name: name.removesuffix(".onnx") + ".ort" for name in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL)}
"""Written on request (--ort-format): each training-side .onnx model -> its ORT-format copy."""
OPERATOR_CONFIGS = {name: name.removesuffix(".onnx") + ".required_operators.config" for name in ORT_MODELS}
"""Written beside the ORT models: the operators each needs, for a reduced-operator onnxruntime build."""
RECIPE_FILE = "recipe.json"
REPORT_FILE = "report.json"
LABELS_INPUT = "labels"
"""Name of the labels input that onnxruntime-training's loss blocks add to the training model."""
STAGES_DIR = "stages"
"""Staged folders (a pass returned ForwardState.stages): one regular artifact set per stage."""


def stage_dir(index: int) -> str:
    """Folder of stage `index`, relative to the artifact folder: the usual file names inside."""
    return f"{STAGES_DIR}/{index}"


GRADIENTS_MODEL = "training_model_gradients.onnx"
"""The training model with every trainable parameter's gradient as an output `gradient/<name>` (device runtimes)."""
OPTIMIZER_STEP_MODEL = "optimizer_step.onnx"
"""The optimizer model with one tensor input and output per parameter instead of sequences (device runtimes)."""
STATE_EVAL_MODEL = "eval_model_state.onnx"
"""The eval model that also outputs the frozen parameters training updates in place (batch-norm running
statistics), concatenated, as `updated_parameters`; only written when there are any (device runtimes)."""
CARRIED_STATE_FILE = "carried_state.safetensors"
"""Initial values of the step-carried state, by input name (only when a pass declared any)."""
