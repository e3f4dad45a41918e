"""Backprop calibration of a quantized model (offline): the reference the flip network imitates.

The dequantized model (current weights and norm statistics, batch norm folded by the
`freeze-bn` pass) is fine-tuned with onnxruntime-training through edgeplug itself,
only the quantized weights training, and the result is put back on the fixed integer
grids. This builds and runs a training graph, so it never runs in the device loop.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .layers import find_layers
from .qmodel import QuantState, dequantized_float_model
from .quantize import quantize_weights


def backprop_calibrate(model: onnx.ModelProto, state: QuantState, x: np.ndarray, y: np.ndarray, *,
                       epochs: int, lr: float, batch_size: int = 32, seed: int = 0) -> QuantState:
    """A copy of `state` whose integer weights are those of a fine-tune on (x, y), requantized."""
    from edgeplug import Trainer, export, rewrite

    layers = find_layers(model)
    pattern = "^(" + "|".join(re.escape(layer.weight) for layer in layers) + ")$"
    recipe = {
        "version": 1, "loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": lr},
        "passes": [{"name": "trainable", "options": {"layers": "none", "include": [pattern], "syntax": "regex"}},
                   {"name": "freeze-bn", "options": {"layers": "all"}}],
    }
    with tempfile.TemporaryDirectory(prefix="qcore-backprop-") as scratch:
        root = Path(scratch)
        (root / "recipe.yaml").write_text(json.dumps(recipe), encoding="utf-8")
        rewrite(dequantized_float_model(model, state), root / "recipe.yaml", root / "out")
        trainer = Trainer(root / "out", seed=seed, progress=False)
        data_name = trainer.input_specs[0].name
        trainer.fit({data_name: x, "y": y}, epochs=epochs, batch_size=min(batch_size, len(y)), resume=False)
        trained = export(root / "out", root / "trained.onnx")
        weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(trained)).graph.initializer}
    result = state.copy()
    for layer in layers:
        result.codes[layer.node] = quantize_weights(layer.to_matrix(weights[layer.weight]), state.weight_grids[layer.node])
    return result
