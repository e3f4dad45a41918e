"""edgeplug: make any ONNX model trainable on edge devices.

ONNX in, a chain of pluggy-registered passes, onnxruntime-training artifacts out.
"""

from __future__ import annotations

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
from edgeplug.passes import (
    ForwardState,
    Pass,
    PassContext,
    PassInfo,
    PassReport,
    RuntimeContext,
    Stage,
    TrainingModels,
)
from edgeplug.plugins import PluginHost, hookimpl

__version__ = "0.1.0"

__all__ = [
    "DataError",
    "EdgeplugError",
    "ForwardState",
    "LockedError",
    "ModelError",
    "NoGradientError",
    "OutputError",
    "Pass",
    "PassContext",
    "PassError",
    "PassInfo",
    "PassReport",
    "PluginError",
    "PluginHost",
    "RecipeError",
    "ResourceError",
    "RuntimeContext",
    "Stage",
    "SetupError",
    "Trainer",
    "TrainingModels",
    "export",
    "hookimpl",
    "inspect_model",
    "load_dataset",
    "load_recipe",
    "rewrite",
]


def __getattr__(name: str) -> object:
    """Import the heavy parts (onnxruntime) only when they are used."""
    if name == "rewrite":
        from edgeplug.pipeline import rewrite

        return rewrite
    if name == "Trainer":
        from edgeplug.trainer import Trainer

        return Trainer
    if name == "export":
        from edgeplug.exporter import export

        return export
    if name == "inspect_model":
        from edgeplug.inspection import inspect_model

        return inspect_model
    if name == "load_recipe":
        from edgeplug.recipe import load_recipe

        return load_recipe
    if name == "load_dataset":
        from edgeplug.data import load_dataset

        return load_dataset
    raise AttributeError(f"module 'edgeplug' has no attribute {name!r}")
