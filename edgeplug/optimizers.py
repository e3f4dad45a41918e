"""The optimizer names a recipe may use, what onnxruntime-training builds for each, and its state size."""

from __future__ import annotations

import math
from collections.abc import Mapping

from edgeplug.errors import EdgeplugError

OPTIMIZER_TYPES: Mapping[str, str] = {"adamw": "AdamW", "sgd": "SGD"}
"""Recipe optimizer name -> member of `onnxruntime.training.artifacts.OptimType`."""
OPTIMIZER_STATES: Mapping[str, int] = {"adamw": 2, "sgd": 0}
"""Values of optimizer state per trainable value: AdamW's two moments; onnxruntime-training's SGD keeps none."""
DEFAULT_LR = 1e-3
MAX_LR = 10.0
"""Largest learning rate accepted (recipe schema and --lr): a larger step diverges with AdamW or SGD."""


def check_learning_rate(lr: float, what: str = "learning rate (--lr)") -> float:
    """`lr` as a float above 0 and at most MAX_LR, else EdgeplugError (NaN and infinities included)."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or not 0 < lr <= MAX_LR:
        raise EdgeplugError(f"{what} must be a number above 0 and at most {MAX_LR:g}, not {lr!r}")
    return float(lr)
