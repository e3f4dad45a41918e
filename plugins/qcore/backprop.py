"""Backprop calibration of a quantized model (offline): the reference the flip network imitates.

The dequantized model (current weights and norm statistics, batch norm folded by the
`freeze-bn` pass) is fine-tuned with onnxruntime-training through edgeplug itself,
only the quantized weights training, and the result is put back on the fixed integer
grids. This builds and runs a training graph, so it never runs in QCore's device loop; the bench uses it as the
backprop baseline, its artifacts built beforehand (`backprop_artifacts`, the offline part) and only
`backprop_train` counted as the device's work.

Two ways to put the result back on the grids. Plain (no `latent`): train from the dequantized codes and round.
Updates smaller than half a grid step round back to the same codes, so a short calibration of a 4- or 8-bit
model often changes nothing at all. Straight-through (`latent` given: float weights the caller keeps, e.g.
the float model's): quantization-aware training as it is usually done. Every step's forward and backward see
the quantized weights Q(latent), the optimizer's step is added to the latent float weights, and the codes are
Q(latent). Small updates add up across steps and across calibrations instead of being rounded away.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Collection
from pathlib import Path

import numpy as np
import onnx

from edgeplug.plugin_api import captured_native_stderr, inference_runtime, open_artifacts

from .examples import Examples
from .layers import find_layers
from .qmodel import QuantState, dequantized_float_model
from .quantize import dequantize_weights, quantize_weights


def backprop_artifacts(model: onnx.ModelProto, state: QuantState, folder: Path, *, lr: float,
                       layers: Collection[str] | None = None) -> Path:
    """Training artifacts of the dequantized model in `folder` (only the quantized weights train, or those of the
    layer nodes named in `layers`; batch norm on the current statistics). The offline part of a backprop
    calibration: a device would ship these."""
    from edgeplug import rewrite

    found = [layer for layer in find_layers(model) if layers is None or layer.node in layers]
    if not found:
        raise ValueError(f"backprop calibration: none of {sorted(layers or [])} is a quantized layer")
    pattern = "^(" + "|".join(re.escape(layer.weight) for layer in found) + ")$"
    recipe = {
        "version": 1, "loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": lr},
        "passes": [{"name": "trainable", "options": {"layers": "none", "include": [pattern], "syntax": "regex"}},
                   {"name": "freeze-bn", "options": {"layers": "all"}}],
    }
    folder.mkdir(parents=True, exist_ok=True)
    # JSON, named .json: PyYAML (YAML 1.1) reads json.dumps(1e-05) = "1e-05" as a string, not a number
    (folder / "recipe.json").write_text(json.dumps(recipe), encoding="utf-8")
    rewrite(dequantized_float_model(model, state), folder / "recipe.json", folder / "out")
    return folder / "out"


def latent_weights(model: onnx.ModelProto, layers: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """The float weights [out, fan_in] of the quantized layers of `model` (the trained float model; only the layer
    nodes in `layers` when given): the latent weights a straight-through calibration starts from."""
    from onnx import numpy_helper

    values = {tensor.name: tensor for tensor in model.graph.initializer}
    return {layer.node: layer.to_matrix(numpy_helper.to_array(values[layer.weight])).astype(np.float32)
            for layer in find_layers(model) if layers is None or layer.node in layers}


def backprop_train(artifacts: Path, model: onnx.ModelProto, state: QuantState, x: np.ndarray | Examples, y: np.ndarray, *, epochs: int,
                   lr: float, batch_size: int = 32, seed: int = 0, threads: int | None = None,
                   latent: dict[str, np.ndarray] | None = None) -> QuantState:
    """The on-device part, as lean as a device runtime does it: open the artifacts, `epochs` of AdamW steps
    on (x, y) in a seeded order (no checkpoint written, no evaluation), read the trained weights from the
    checkpoint state and requantize them onto `state`'s grids.

    With `latent` (float weights [out, fan_in] per layer node, updated in place), straight-through: the trained
    layers' parameters are set to Q(latent) before every step, the step's change is added to the latent weights,
    and the codes returned are Q(latent)."""
    ort = inference_runtime()
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False  # as the quantized runner: no arena keeping the peak
    options.enable_mem_pattern = False
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    with captured_native_stderr():
        checkpoint, module, optimizer = open_artifacts(artifacts, session_options=options)
    names = list(module.input_names())
    data_name = next(name for name in names if name != "labels")
    missing = [name for name in names if name != "labels" and isinstance(x, Examples) and name not in x.names]
    if missing:
        raise ValueError(f"backprop calibration: the training model reads {missing}, which the examples lack")
    # the layers whose weights train (frozen ones are in the checkpoint too, as dequantized grid points)
    trained_layers = [layer for layer in find_layers(model)
                      if layer.weight in checkpoint.parameters and checkpoint.parameters[layer.weight].requires_grad]
    shadow: dict[str, np.ndarray] = {} if latent is None else latent
    straight = [layer for layer in trained_layers if layer.node in shadow]
    if latent is not None and len(straight) != len(trained_layers):
        missing = sorted(layer.node for layer in trained_layers if layer.node not in latent)
        raise ValueError(f"backprop calibration: no latent weights for the trained layers {missing[:3]}")

    def project() -> dict[str, np.ndarray]:
        """Q(latent) of the straight-through layers, written into the parameters the next step reads."""
        snapped = {}
        for layer in straight:
            grid = state.weight_grids[layer.node]
            snapped[layer.node] = dequantize_weights(quantize_weights(shadow[layer.node], grid), grid)
            checkpoint.parameters[layer.weight] = layer.from_matrix(snapped[layer.node]).astype(np.float32)
        return snapped

    module.train()
    optimizer.set_learning_rate(lr)
    batch = min(batch_size, len(y))
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(y))
        for start in range(0, len(y), batch):
            snapped = project()
            rows = order[start:start + batch]
            rows_in = x[rows]
            feeds = {**(rows_in.arrays if isinstance(rows_in, Examples) else {data_name: rows_in}), "labels": y[rows]}
            module(*[feeds[name] for name in names])
            optimizer.step()
            module.lazy_reset_grad()
            for layer in straight:  # the step's change goes to the latent weights (the straight-through estimator)
                stepped = layer.to_matrix(np.asarray(checkpoint.parameters[layer.weight].data))
                shadow[layer.node] += stepped - snapped[layer.node]
    result = state.copy()
    for layer in trained_layers:  # frozen layers keep their codes
        trained = shadow[layer.node] if latent is not None else layer.to_matrix(np.asarray(checkpoint.parameters[layer.weight].data))
        result.codes[layer.node] = quantize_weights(trained, state.weight_grids[layer.node])
    return result


def backprop_calibrate(model: onnx.ModelProto, state: QuantState, x: np.ndarray | Examples, y: np.ndarray, *,
                       epochs: int, lr: float, batch_size: int = 32, seed: int = 0, threads: int | None = None,
                       layers: Collection[str] | None = None, latent: dict[str, np.ndarray] | None = None) -> QuantState:
    """A copy of `state` whose integer weights are those of a fine-tune on (x, y), requantized (`layers`: only
    those layer nodes train; default every quantized layer; `latent`: straight-through, see `backprop_train`)."""
    with tempfile.TemporaryDirectory(prefix="qcore-backprop-") as scratch:
        artifacts = backprop_artifacts(model, state, Path(scratch), lr=lr, layers=layers)
        return backprop_train(artifacts, model, state, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, threads=threads,
                              latent=latent)
