"""Local loss heads: block output -> class logits, as ONNX nodes appended to a stage model.

Fixed heads (LLS): adaptive average pooling to p x p, flatten, L2 normalisation,
projection onto a fixed basis, division by the temperature. LLS-M multiplies the
logits by a learnable per-class scale, LLS-MxM by a learnable class-mixing matrix.
The local-classifier baseline ("local losses") replaces normalisation, basis and
temperature by a learnable linear layer. Pooling is a constant matrix product, so
it is exact for any input size and has a gradient in onnxruntime-training.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeplug.plugin_api import GraphEditor

from .basis import basis

VARIANTS = ("lls", "lls-m", "lls-mxm", "local-classifier")


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    variant: str
    basis: str
    pool: int
    temperature: float
    classes: int
    seed: int


@dataclasses.dataclass(frozen=True)
class Head:
    """What was appended: the logits tensor, the learnable head parameters, and sizes."""

    logits: str
    parameters: tuple[str, ...]
    features: int
    parameter_values: int


def pooling_matrix(size: int, pooled: int) -> np.ndarray:
    """[size, pooled]: column j averages the cells of adaptive-average-pool window j (torch's rule)."""
    matrix = np.zeros((size, pooled), dtype=np.float64)
    for j in range(pooled):
        start, end = (j * size) // pooled, -(-((j + 1) * size) // pooled)
        matrix[start:end, j] = 1.0 / (end - start)
    return matrix


def append_head(model: onnx.ModelProto, tensor: str, shape: tuple[int, ...], spec: HeadSpec, prefix: str) -> Head:
    """Append the head on `tensor` (shape without the batch axis) to `model`; return its logits name."""
    editor = GraphEditor(model)
    channels, spatial = shape[0], shape[1:]
    x = tensor
    if spatial:
        pooled = [spec.pool] * len(spatial)
        matrix = np.ones((1, 1))
        for size, p in zip(spatial, pooled, strict=True):
            matrix = np.kron(matrix, pooling_matrix(size, p))
        flat = editor.node("Reshape", [x, editor.constant(f"{prefix}/cells_shape", np.array([0, channels, math.prod(spatial)], np.int64))],
                           f"{prefix}/cells")
        x = editor.node("MatMul", [flat, editor.constant(f"{prefix}/pool_matrix", matrix.astype(np.float32))], f"{prefix}/pooled")
        features = channels * math.prod(pooled)
    else:
        features = channels
    x = editor.node("Reshape", [x, editor.constant(f"{prefix}/flat_shape", np.array([0, features], np.int64))], f"{prefix}/flat")
    rng = np.random.default_rng(spec.seed)
    parameters: list[onnx.TensorProto] = []

    def parameter(base: str, value: np.ndarray) -> str:
        name = editor.fresh(f"{prefix}/{base}")
        parameters.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    if spec.variant == "local-classifier":
        weight = parameter("weight", rng.standard_normal((features, spec.classes)) / np.sqrt(features))
        bias = parameter("bias", np.zeros(spec.classes))
        logits = editor.node("Gemm", [x, weight, bias], f"{prefix}/logits")
    else:
        squares = editor.node("Mul", [x, x], f"{prefix}/squares")
        total = editor.node("ReduceSum", [squares, editor.constant(f"{prefix}/axis", np.array([1], np.int64))], f"{prefix}/sum_squares", keepdims=1)
        norm = editor.node("Sqrt", [editor.node("Add", [total, editor.constant(f"{prefix}/eps", np.array(1e-12, np.float32))], f"{prefix}/sum_eps")], f"{prefix}/norm")
        unit = editor.node("Div", [x, norm], f"{prefix}/unit")
        projection = basis(spec.basis, spec.classes, features, spec.seed).T.copy()
        logits = editor.node("MatMul", [unit, editor.constant(f"{prefix}/basis", projection)], f"{prefix}/projected")
        logits = editor.node("Mul", [logits, editor.constant(f"{prefix}/inv_temperature", np.array(1.0 / spec.temperature, np.float32))],
                             f"{prefix}/scaled" if spec.variant != "lls" else f"{prefix}/logits")
        if spec.variant == "lls-m":
            scale = parameter("class_scale", 0.01 * rng.standard_normal(spec.classes))
            logits = editor.node("Mul", [logits, scale], f"{prefix}/logits")
        elif spec.variant == "lls-mxm":
            mixing = parameter("class_mixing", 0.01 * rng.standard_normal((spec.classes, spec.classes)))  # as the reference code
            logits = editor.node("MatMul", [logits, mixing], f"{prefix}/logits")
    model.graph.node.extend(editor.take_nodes())
    model.graph.initializer.extend(parameters)
    model.graph.output.append(helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, ["batch", spec.classes]))
    return Head(logits, tuple(p.name for p in parameters), features, sum(int(np.prod(p.dims)) for p in parameters))
