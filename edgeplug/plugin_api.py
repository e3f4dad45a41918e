"""The public API for plugin authors: everything a pass may use from edgeplug's core.

Built-in plugins import from here (and from `edgeplug`) only, like third-party
ones; the other modules of `edgeplug` are internal and may change. Groups:

- the pass contract: `Pass`, `ForwardState`, `Stage`, `TrainingModels`, `CarriedState`,
  `PassContext`, `PassReport`, `RuntimeContext`, `ExportContext`, `hookimpl`, `fill_defaults`;
- errors the user can fix: `EdgeplugError` and its subclasses;
- reading graphs: `GraphIndex` (producers, consumers, parameters, layers,
  `value(name)` of an initializer), `Layer`, `WEIGHT_OPS`, `LAYER_OPS`, `FLOAT_TYPES`,
  `tensor_values`, `tensor_bytes`, `tensor_ranks`;
- editing graphs: `GraphEditor` (unique names, Constant nodes), `replace_nodes`,
  `ensure_node_names`; through onnx-ir: `extract` (the part of a
  model between tensors), `remove_unused` (dead nodes, initializers, functions),
  `to_ir`/`to_proto`/`on_ir` for passes that want to edit an `onnx_ir.Model`;
- models on disk: `load_model`, `save_model` (atomic, IR clamped), `check_model`,
  `clamp_ir_version`, `default_opset`, `MAX_IR_VERSION`, `MAX_OPSET`;
- shapes and costs: `forward_shapes` (every tensor's shape at a batch size),
  `forward_macs`, `data_axis_lengths` (the length of a sequence axis, from an
  option or the calibration arrays);
- onnxruntime without torch: `inference_session`, `inference_runtime`,
  `training_api`, `training_artifacts`, `open_artifacts`, `captured_native_stderr`;
  `trim_heap` (free memory back to the system once a session or a big protobuf is gone);
- training vocabulary: `LOSS_TYPES`, `OPTIMIZER_TYPES`, `OPTIMIZER_STATES`, the
  artifact folder's file names (`TRAINING_MODEL`, `CHECKPOINT`, ...);
- data and files: `load_dataset`, `load_npz`, `Dataset`, `TensorSpec`,
  `atomic_file`, `atomic_directory`, `write_text`, `load_schema`, `first_error`;
- commands (`edgeplug_register_commands`): `CommandRegistry` (what the hook receives),
  `print_result` (text, or one JSON document under `--json`), `Progress` (bars on a
  terminal only); log with `logging.getLogger("edgeplug.plugins.<name>")`.
"""

from __future__ import annotations

from edgeplug._ort import (
    captured_native_stderr,
    inference_runtime,
    inference_session,
    open_artifacts,
    training_api,
    training_artifacts,
)
from edgeplug.atomic import atomic_directory, atomic_file, write_text
from edgeplug.commands import CommandRegistry
from edgeplug.console import print_result
from edgeplug.data import Dataset, TensorSpec, load_dataset, load_npz
from edgeplug.errors import (
    DataError,
    EdgeplugError,
    ModelError,
    NoGradientError,
    OutputError,
    PassError,
    PluginError,
    RecipeError,
    ResourceError,
    SetupError,
)
from edgeplug.graph import (
    FLOAT_TYPES,
    LAYER_OPS,
    WEIGHT_OPS,
    GraphIndex,
    Layer,
    ensure_node_names,
    tensor_bytes,
    tensor_ranks,
    tensor_values,
)
from edgeplug.guard import trim_heap
from edgeplug.layout import (
    CHECKPOINT,
    EVAL_MODEL,
    FORWARD_MODEL,
    LABELS_INPUT,
    OPTIMIZER_MODEL,
    TRAINING_MODEL,
)
from edgeplug.losses import LOSS_TYPES
from edgeplug.modelio import (
    MAX_IR_VERSION,
    MAX_OPSET,
    check_model,
    clamp_ir_version,
    default_opset,
    load_model,
    save_model,
)
from edgeplug.onnx_edit import GraphEditor, replace_nodes
from edgeplug.optimizers import OPTIMIZER_STATES, OPTIMIZER_TYPES
from edgeplug.passes import (
    CarriedState,
    ExportContext,
    ForwardState,
    Pass,
    PassContext,
    PassReport,
    Plan,
    RuntimeContext,
    Stage,
    TrainingModels,
    fill_defaults,
)
from edgeplug.plugins import hookimpl
from edgeplug.profiling.macs import forward_macs
from edgeplug.profiling.static import forward_shapes
from edgeplug.progress import Progress
from edgeplug.sequences import data_axis_lengths
from edgeplug.surgery import extract, on_ir, remove_unused, to_ir, to_proto
from edgeplug.validation import first_error, load_schema

__all__ = [
    "CHECKPOINT",
    "CarriedState",
    "CommandRegistry",
    "ExportContext",
    "EVAL_MODEL",
    "FLOAT_TYPES",
    "FORWARD_MODEL",
    "LABELS_INPUT",
    "LAYER_OPS",
    "LOSS_TYPES",
    "MAX_IR_VERSION",
    "MAX_OPSET",
    "OPTIMIZER_MODEL",
    "OPTIMIZER_STATES",
    "OPTIMIZER_TYPES",
    "TRAINING_MODEL",
    "WEIGHT_OPS",
    "DataError",
    "Dataset",
    "EdgeplugError",
    "ForwardState",
    "GraphEditor",
    "GraphIndex",
    "Layer",
    "ModelError",
    "NoGradientError",
    "OutputError",
    "Pass",
    "PassContext",
    "PassError",
    "PassReport",
    "Plan",
    "PluginError",
    "Progress",
    "RecipeError",
    "ResourceError",
    "RuntimeContext",
    "SetupError",
    "Stage",
    "TensorSpec",
    "TrainingModels",
    "atomic_directory",
    "atomic_file",
    "captured_native_stderr",
    "check_model",
    "clamp_ir_version",
    "data_axis_lengths",
    "default_opset",
    "ensure_node_names",
    "extract",
    "fill_defaults",
    "first_error",
    "forward_macs",
    "forward_shapes",
    "hookimpl",
    "inference_runtime",
    "inference_session",
    "load_dataset",
    "load_model",
    "load_npz",
    "load_schema",
    "on_ir",
    "open_artifacts",
    "print_result",
    "remove_unused",
    "replace_nodes",
    "save_model",
    "tensor_bytes",
    "tensor_ranks",
    "tensor_values",
    "to_ir",
    "to_proto",
    "training_api",
    "training_artifacts",
    "trim_heap",
    "write_text",
]
