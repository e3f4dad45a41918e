"""What the sparse-update tests check on a trained folder's export, shared by the conv and the linear-layer tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def reassembled(original: onnx.ModelProto, exported: onnx.ModelProto, details: dict) -> onnx.ModelProto:
    """The original architecture with the exported (trained) values put back in place; frozen slices checked bit-identical."""
    values = initializers(exported)
    result = onnx.ModelProto()
    result.CopyFrom(original)
    for tensor in result.graph.initializer:
        weight = numpy_helper.to_array(tensor).copy()
        layer = next((layer for layer in details["layers"] if layer["weight"] == tensor.name), None)
        if layer is not None and layer["channels"] is not None:
            chosen = np.array(layer["channels"])
            rest = np.setdiff1d(np.arange(layer["channels_total"]), chosen)
            index: list[slice | np.ndarray] = [slice(None)] * weight.ndim
            index[layer["weight_axis"]] = chosen
            weight[tuple(index)] = values[f"{tensor.name}.sparse_trainable"]
            index[layer["weight_axis"]] = rest
            assert np.array_equal(values[f"{tensor.name}.sparse_frozen"], weight[tuple(index)])
        elif tensor.name in values:
            weight = values[tensor.name]
        tensor.CopyFrom(numpy_helper.from_array(weight, tensor.name))
    return result
