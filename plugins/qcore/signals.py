"""Forward-only, label-aware update signals for every quantized layer.

The flip networks need to know which way each weight should move. For the last layer
(a Gemm/MatMul) the descent direction of the cross-entropy is exact from one forward pass:
mean((onehot - softmax) x input) (`flipnet.error_correlation`). A hidden layer has no such
local quantity without a backward pass through the layers after it, so it gets a local one:

**class-mean alignment.** At quantization time we store, for every hidden layer, the class
means of its (normalised) output channels on the training data, averaged over positions:
M[c, k] = mean over training examples of class c of mean_t out[k, t]. On the device, the
labelled chunk tells how far each example's channel means are from its class's reference
mean; the signal of weight W[k, j, tap] is the correlation

    S[k, j, tap] = mean_n (M[y_n, k] - mean_t out[n, k, t]) * g[k] * sum_t x[n, j, t * stride + tap - pad]

where g[k] = d out / d layer output (the batch norm's scale / std, 1 without a norm): the
descent direction of the local loss 1/2 sum_k (M[y, k] - mean_t out[k, t])^2, which moves each
user's features back to where the layers after it expect that class. It needs the layer's
input and output from a forward pass and a correlation with the input patches, never a
gradient through other layers (no training graph, no backward pass).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from .layers import QuantLayer


@dataclasses.dataclass(frozen=True)
class AlignedOutput:
    """The tensor whose class means a hidden layer is aligned on: its batch norm's output when a batch
    norm alone reads the layer's output, else the layer's own output."""

    layer: str
    tensor: str
    norm: str | None  # BatchNormalization node name, or None


def aligned_outputs(model: onnx.ModelProto, layers: Sequence[QuantLayer]) -> dict[str, AlignedOutput]:
    nodes = {n.name: n for n in model.graph.node}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found = {}
    for layer in layers:
        if layer.last:
            continue
        output = nodes[layer.node].output[0]
        after = readers.get(output, [])
        if len(after) == 1 and after[0].op_type == "BatchNormalization" and after[0].input[0] == output:
            found[layer.node] = AlignedOutput(layer.node, after[0].output[0], after[0].name)
        else:
            found[layer.node] = AlignedOutput(layer.node, output, None)
    return found


def channel_means(value: np.ndarray) -> np.ndarray:
    """[N, C, *positions] or [N, C] -> per-example channel means [N, C]."""
    return value.reshape(value.shape[0], value.shape[1], -1).mean(axis=2)


def class_means(value: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """[classes, C] class means of the per-example channel means; NaN rows for absent classes."""
    means = channel_means(value).astype(np.float64)
    out = np.full((classes, means.shape[1]), np.nan)
    for c in np.unique(labels):
        out[int(c)] = means[labels == c].mean(axis=0)
    return out.astype(np.float32)


def norm_gain(model_norm: onnx.NodeProto | None, scale: np.ndarray | None, var: np.ndarray | None) -> np.ndarray | float:
    """d(normalised output)/d(layer output) per channel: scale / sqrt(var + eps); 1 without a norm."""
    if model_norm is None or scale is None or var is None:
        return 1.0
    attrs = {a.name: helper.get_attribute_value(a) for a in model_norm.attribute}
    return scale / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))


def weight_correlation(layer: QuantLayer, node: onnx.NodeProto, layer_input: np.ndarray, delta: np.ndarray) -> np.ndarray | None:
    """sum over positions of delta (per output channel) x the input each weight multiplies, averaged over
    examples, in the layer's [out, fan_in] order. `delta` is [N, out] (the same for every output position)
    or [N, out, *positions]. None for a convolution layout this does not handle (auto_pad)."""
    n = len(layer_input)
    if layer.op_type != "Conv":
        flat = layer_input.reshape(n, -1)
        per_example = delta.reshape(n, -1)
        matrix = per_example.T @ flat / n  # [out, fan_in]
        return matrix.astype(np.float32)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    kernel = layer.shape[2:]
    dims = len(kernel)
    strides = list(attrs.get("strides", [1] * dims))
    dilations = list(attrs.get("dilations", [1] * dims))
    pads = list(attrs.get("pads", [0] * (2 * dims)))
    padded = np.pad(layer_input, [(0, 0), (0, 0)] + [(pads[i], pads[i + dims]) for i in range(dims)])
    spatial_in = padded.shape[2:]
    out_size = [(spatial_in[i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(dims)]
    out_channels, in_per_group = layer.shape[0], layer.shape[1]
    groups = layer.group
    out_per_group = out_channels // groups
    constant = delta.ndim == 2  # the same delta at every output position: sum the input patches first
    d = delta.astype(np.float64) if constant else np.ascontiguousarray(delta.reshape(n, out_channels, -1).transpose(1, 0, 2))
    result = np.zeros((out_channels, in_per_group, *kernel), np.float64)
    for tap in np.ndindex(*kernel):
        window = tuple(slice(tap[i] * dilations[i], tap[i] * dilations[i] + strides[i] * (out_size[i] - 1) + 1, strides[i])
                       for i in range(dims))
        patch = padded[(slice(None), slice(None), *window)].reshape(n, padded.shape[1], -1)
        if constant:
            summed = patch.sum(axis=2, dtype=np.float64)  # [n, in]
        else:
            flat = np.ascontiguousarray(patch.transpose(1, 0, 2)).reshape(padded.shape[1], -1)  # [in, n * positions]
        for g in range(groups):
            outs, ins = slice(g * out_per_group, (g + 1) * out_per_group), slice(g * in_per_group, (g + 1) * in_per_group)
            if constant:
                value = d[:, outs].T @ summed[:, ins]
            else:
                value = d[outs].reshape(out_per_group, -1) @ flat[ins].T
            result[(outs, slice(None), *tap)] = value / n
    return result.reshape(out_channels, -1).astype(np.float32)


def alignment_signal(layer: QuantLayer, node: onnx.NodeProto, layer_input: np.ndarray, output: np.ndarray,
                     labels: np.ndarray, means: np.ndarray, gain: np.ndarray | float) -> np.ndarray | None:
    """The class-mean alignment signal of one hidden layer, [out, fan_in] (see the module docstring)."""
    target = means[labels]  # [N, C]; NaN for classes the training data did not have
    residual = np.nan_to_num(target - channel_means(output), nan=0.0)
    delta = residual * gain
    if layer.op_type == "Conv":
        positions = math.prod(output.shape[2:]) if output.ndim > 2 else 1
        delta = delta / positions  # d mean_t out / d out[t]
    return weight_correlation(layer, node, layer_input, delta.astype(np.float32))
