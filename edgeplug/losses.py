"""The loss names a recipe may use and the onnxruntime-training loss each one builds."""

from __future__ import annotations

from collections.abc import Mapping

LOSS_TYPES: Mapping[str, str] = {
    "cross-entropy": "CrossEntropyLoss",
    "mse": "MSELoss",
    "bce-with-logits": "BCEWithLogitsLoss",
    "l1": "L1Loss",
}
"""Recipe loss name -> member of `onnxruntime.training.artifacts.LossType`."""
