"""The optimizer names a recipe may use, what onnxruntime-training builds for each, and its state size."""

from __future__ import annotations

from collections.abc import Mapping

OPTIMIZER_TYPES: Mapping[str, str] = {"adamw": "AdamW", "sgd": "SGD"}
"""Recipe optimizer name -> member of `onnxruntime.training.artifacts.OptimType`."""
OPTIMIZER_STATES: Mapping[str, int] = {"adamw": 2, "sgd": 0}
"""Values of optimizer state per trainable value: AdamW's two moments; onnxruntime-training's SGD keeps none."""
DEFAULT_LR = 1e-3
