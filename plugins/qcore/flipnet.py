"""Bit-flip networks: per quantized layer, a small MLP from statistics to integer steps in {-1, 0, +1}.

Every weight of a layer is one row of features, computed forward only:

0. its position on the grid, (q - zero_point) / 2**(bits-1);
1. the shift of the mean of its input channel on the new data, in reference standard deviations;
2. the log ratio of that channel's standard deviation to the reference one;
3. a forward-only descent direction for that weight, divided by its channel's weight scale: for the
   last layer the error correlation mean((onehot - softmax) * input), the exact negative gradient
   of the cross-entropy; for hidden layers the class-mean alignment signal (`signals`), the
   descent direction of a local loss that moves each class's features back to their reference
   means. Both need forward passes only, never a backward pass through other layers.

The network scores the three steps {-1, 0, +1}; the best one is added to the integer
weight, which is then clamped to the grid. It is trained offline (onnxruntime-training
through edgeplug) on the integer changes backprop calibration makes, as a three-way
classification (cross-entropy) rather than the reference's regression: the outputs
are exactly the three steps, and edgeplug 0.1's 'mse' loss cannot be fed its targets
(the generated model names its target input 'target', the trainer feeds 'labels').
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeplug.plugin_api import inference_runtime, save_model

from .layers import QuantLayer
from .qmodel import QuantState
from .quantize import weight_limits

FEATURES = 4
SIGNAL = 3  # column of the descent-direction signal (divided by the channel scale) in a feature row
EPS = 1e-6


def layer_features(layer: QuantLayer, state: QuantState, reference: tuple[np.ndarray, np.ndarray],
                   current: tuple[np.ndarray, np.ndarray], error: np.ndarray | None) -> np.ndarray:
    """Feature rows [out * fan_in, FEATURES] of one layer, in the [out, fan_in] weight order."""
    grid = state.weight_grids[layer.node]
    codes = state.codes[layer.node].astype(np.float32)
    channel = layer.input_channel()
    ref_mean, ref_std = reference
    cur_mean, cur_std = current
    position = (codes - grid.zero_point[:, None]) / 2 ** (state.bits - 1)
    shift = ((cur_mean - ref_mean) / (ref_std + EPS))[channel]
    spread = np.log((cur_std + EPS) / (ref_std + EPS))[channel]
    signal = np.zeros_like(position) if error is None else error / grid.scale[:, None]
    return np.stack([position, shift, spread, signal], axis=-1).reshape(-1, FEATURES).astype(np.float32)


def error_correlation(logits: np.ndarray, labels: np.ndarray, layer_input: np.ndarray) -> np.ndarray:
    """mean_n (onehot - softmax)[n, i] * input[n, j]: forward-only descent direction of a Gemm/MatMul weight."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    residual = -probabilities
    residual[np.arange(len(labels)), labels] += 1.0
    flat = layer_input.reshape(len(labels), -1)
    return (residual.T @ flat / len(labels)).astype(np.float32)


def apply_flips(layer: QuantLayer, state: QuantState, flips: np.ndarray) -> np.ndarray:
    """Integer codes after adding `flips` (in {-1, 0, 1}), clamped to the layer's grid."""
    low, high = weight_limits(state.bits)
    return np.clip(state.codes[layer.node].astype(np.int16) + flips.astype(np.int16), low, high).astype(np.int8)


def mlp_graph(hidden: int, seed: int) -> onnx.ModelProto:
    """features[N, FEATURES] -> Gemm -> Tanh -> Gemm -> step scores[N, 3] for -1, 0, +1."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((FEATURES, hidden)) / np.sqrt(FEATURES)).astype(np.float32), "fc0.weight"),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "fc0.bias"),
        numpy_helper.from_array((rng.standard_normal((hidden, 3)) / np.sqrt(hidden)).astype(np.float32), "fc1.weight"),
        numpy_helper.from_array(np.zeros(3, np.float32), "fc1.bias"),
    ]
    nodes = [
        helper.make_node("Gemm", ["features", "fc0.weight", "fc0.bias"], ["h"], name="fc0"),
        helper.make_node("Tanh", ["h"], ["a"], name="act0"),
        helper.make_node("Gemm", ["a", "fc1.weight", "fc1.bias"], ["step"], name="fc1"),
    ]
    graph = helper.make_graph(nodes, "qcore_flipnet",
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", FEATURES])],
                              [helper.make_tensor_value_info("step", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeplug-qcore")
    model.ir_version = 8
    return model


def train_flipnet(features: np.ndarray, targets: np.ndarray, destination: Path, *, hidden: int, epochs: int,
                  lr: float, seed: int) -> dict[str, Any]:
    """Fit one layer's network with onnxruntime-training (edgeplug rewrite + Trainer); write its inference model.

    Non-zero targets are rare; they are repeated until they make up about a third of
    the rows so that the regression does not collapse to 'never flip'.
    """
    from edgeplug import Trainer, export, rewrite

    rng = np.random.default_rng(seed)
    mean, std = features.mean(axis=0), features.std(axis=0) + EPS
    scaled = (features - mean) / std
    moving = np.flatnonzero(targets != 0)
    rows = np.arange(len(targets))
    if 0 < len(moving) < len(targets) // 3:
        repeats = rng.choice(moving, size=len(targets) // 2 - len(moving))
        rows = np.concatenate([rows, repeats])
    if len(rows) < 4096:  # small layers: repeat the rows so that training takes enough steps
        rows = np.tile(rows, -(-4096 // len(rows)))
    rows = rng.permutation(rows)[:50_000]
    recipe = {"version": 1, "loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": lr}}
    with tempfile.TemporaryDirectory(prefix="qcore-flipnet-") as scratch:
        root = Path(scratch)
        (root / "recipe.json").write_text(json.dumps(recipe), encoding="utf-8")
        rewrite(mlp_graph(hidden, seed), root / "recipe.json", root / "out")
        trainer = Trainer(root / "out", seed=seed, progress=False)
        data = {"features": scaled[rows].astype(np.float32), "y": (targets[rows] + 1).astype(np.int64)}
        result = trainer.fit(data, epochs=epochs, batch_size=256)
        export(root / "out", root / "flipnet.onnx")
        model = onnx.load(str(root / "flipnet.onnx"))
    save_model(model, destination)
    agreement = float(np.mean(predict_steps(destination, scaled, None, None) == targets))
    return {"mean": mean.tolist(), "std": std.tolist(), "rows": int(len(rows)), "nonzero_targets": int(len(moving)),
            "final_loss": result.epochs[-1].train.loss, "agreement": agreement}


class FlipNet:
    """One layer's flip network as a plain onnxruntime session (forward only), with its feature scaling."""

    def __init__(self, path: Path, mean: np.ndarray | None = None, std: np.ndarray | None = None, *,
                 threads: int | None = None) -> None:
        ort = inference_runtime()
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = False  # see QuantizedRunner
        options.enable_mem_pattern = False
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.mean, self.std = mean, std

    def steps(self, features: np.ndarray) -> np.ndarray:
        """Flips in {-1, 0, +1}: the best-scored of the three steps for every row."""
        return self.scored_steps(features)[0]

    def scored_steps(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flips in {-1, 0, +1} and, per row, how far the chosen step's score is above the score of not flipping
        (0 where the row does not flip): the network's confidence, which orders flips for `flip_search`."""
        scaled = features if self.mean is None or self.std is None else (features - self.mean) / self.std
        (scores,) = self.session.run(["step"], {"features": scaled.astype(np.float32)})
        best = scores.argmax(axis=1)
        margin = scores[np.arange(len(best)), best] - scores[:, 1]
        return (best - 1).astype(np.int8), margin.astype(np.float32)


def predict_steps(path: Path, features: np.ndarray, mean: np.ndarray | None, std: np.ndarray | None) -> np.ndarray:
    """Flips of the flip network stored at `path` (a one-off session)."""
    return FlipNet(path, mean, std).steps(features)


def load_normalisation(info: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(info["mean"], np.float32), np.asarray(info["std"], np.float32)
