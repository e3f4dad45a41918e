"""edgeplug: make any ONNX model trainable on edge devices.

ONNX in, a chain of pluggy-registered passes, onnxruntime-training artifacts out.

Driving edgeplug (what `edgeplug rewrite|train|export|inspect` do):

    rewrite(model, recipe, output_dir)   run the recipe's passes, write training artifacts
    Trainer(artifact_dir).fit(data)       train them, resumably
    export(artifact_dir, output)          the inference model with the trained weights
    inspect_model(path)                   ops, parameters, shapes, ops without a gradient
    load_recipe(path), load_dataset(...)  read and check recipes and .npz data

Writing a plugin: subclass `Pass` (`rewrite_forward(ForwardState, PassContext)`,
`report() -> PassReport`), register it from an `edgeplug_register_passes` hook
(`hookimpl`), read graphs with `GraphIndex`; everything else a pass may use
(graph editing and extraction, onnxruntime sessions without torch, loss names,
shapes, model I/O) is in `edgeplug.plugin_api`. Errors the user can fix are
`EdgeplugError` subclasses. Other submodules are internal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgeplug.errors import (
    DataError,
    EdgeplugError,
    LockedError,
    ModelError,
    NoGradientError,
    OutputError,
    PassError,
    PluginError,
    RecipeError,
    ResourceError,
    SetupError,
)

if TYPE_CHECKING:  # imported on first use (onnx, numpy, onnxruntime, the rewrite stack): see __getattr__
    from edgeplug.collapse import TrainingWarning
    from edgeplug.data import load_dataset
    from edgeplug.exporter import export
    from edgeplug.graph import GraphIndex
    from edgeplug.inspection import inspect_model
    from edgeplug.passes import (
        CarriedState,
        ExportContext,
        ForwardState,
        Pass,
        PassContext,
        PassInfo,
        PassReport,
        Plan,
        RuntimeContext,
        Stage,
        TrainingModels,
    )
    from edgeplug.pipeline import RewriteResult, rewrite
    from edgeplug.plugins import PluginHost, hookimpl
    from edgeplug.recipe import Recipe, load_recipe
    from edgeplug.trainer import FitResult, Trainer

__version__ = "0.1.0"

__all__ = [
    "CarriedState",
    "ExportContext",
    "DataError",
    "EdgeplugError",
    "FitResult",
    "ForwardState",
    "GraphIndex",
    "LockedError",
    "ModelError",
    "NoGradientError",
    "OutputError",
    "Pass",
    "PassContext",
    "PassError",
    "PassInfo",
    "PassReport",
    "Plan",
    "PluginError",
    "PluginHost",
    "Recipe",
    "RecipeError",
    "ResourceError",
    "RewriteResult",
    "RuntimeContext",
    "SetupError",
    "Stage",
    "Trainer",
    "TrainingWarning",
    "TrainingModels",
    "export",
    "hookimpl",
    "inspect_model",
    "load_dataset",
    "load_recipe",
    "rewrite",
]

_LAZY = {
    "GraphIndex": "edgeplug.graph",
    **{name: "edgeplug.passes" for name in ("CarriedState", "ExportContext", "ForwardState", "Pass", "PassContext", "PassInfo", "PassReport", "Plan",
                                            "RuntimeContext", "Stage", "TrainingModels")},
    "PluginHost": "edgeplug.plugins",
    "hookimpl": "edgeplug.plugins",
    "rewrite": "edgeplug.pipeline",
    "RewriteResult": "edgeplug.pipeline",
    "Trainer": "edgeplug.trainer",
    "FitResult": "edgeplug.trainer",
    "export": "edgeplug.exporter",
    "inspect_model": "edgeplug.inspection",
    "load_recipe": "edgeplug.recipe",
    "Recipe": "edgeplug.recipe",
    "load_dataset": "edgeplug.data",
    "TrainingWarning": "edgeplug.collapse",
}


def __getattr__(name: str) -> Any:
    """Import the heavy parts of the API (onnx, onnxruntime, the rewrite stack) only when they are used, so that
    `edgeplug --version` and `import edgeplug.errors` stay fast."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgeplug' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public API, lazy names included (so `help(edgeplug)` documents them)."""
    return sorted({*globals(), *__all__})
