"""Fleet training: edgeplug artifact folders as Flower clients, aggregated by Flower strategies.

Only the trainable parameters (and batch-norm statistics that training updates) travel: a
device trains the shared folder in memory from the global values with `edgeplug.Trainer`
and sends back those tensors (a sparse-update recipe sends a small fraction of the model).
`flwr` is needed only by `apps`, `simulation`, `flower_app` (the `flwr run` App) and
`deployment` (`pip install "edgeplug[fleet]"`); the device side (`params`, `device`) needs no Flower.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower's usage events never leave the machine

from typing import Any

__all__ = ["FleetDevice", "LocalResult", "read_trainable", "save_global_model"]
_HOMES = {"FleetDevice": "device", "LocalResult": "device", "read_trainable": "params", "save_global_model": "params"}


def __getattr__(name: str) -> Any:
    """Import lazily: `edgeplug --help` registers the fleet commands without loading onnxruntime."""
    if name not in _HOMES:
        raise AttributeError(f"module 'edgeplug.fleet' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(f"edgeplug.fleet.{_HOMES[name]}"), name)
