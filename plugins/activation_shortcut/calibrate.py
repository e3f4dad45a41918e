"""Run the generated (not yet rewritten) training graph once on a calibration batch.

Rank selection needs each compressed layer's real input X and output gradient dY;
onnxruntime-training's CPU build runs its training graph (gradient ops included)
in a plain InferenceSession when the parameters and zeroed accumulators are fed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from edgeplug.plugin_api import DataError, TensorSpec, captured_native_stderr, inference_runtime, load_dataset

from .layers import ACCUMULATOR_SUFFIX


def calibration_batch(calibration: Mapping[str, np.ndarray], model: onnx.ModelProto, parameters: set[str], loss: str,
                      batch_size: int) -> dict[str, np.ndarray]:
    """The first `batch_size` samples of the calibration data, named after the model's inputs."""
    specs = [TensorSpec(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                        [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim])
             for v in model.graph.input if v.name not in parameters and v.name != "labels"]
    data = load_dataset(calibration, specs, loss=loss)
    if len(data) < batch_size:
        raise DataError(f"the calibration data has {len(data)} samples; rank selection needs one "
                        f"training batch (batch_size {batch_size})")
    return data.batch(np.arange(batch_size))


def capture(training: onnx.ModelProto, parameters: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
            names: Sequence[str]) -> dict[str, np.ndarray]:
    """Values of tensors `names` in one run of the training graph on `batch`."""
    model = onnx.ModelProto()
    model.CopyFrom(training)
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
    with captured_native_stderr():
        session = inference_runtime().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds: dict[str, np.ndarray] = {}
    for value in session.get_inputs():
        name = value.name
        if name in batch:
            feeds[name] = np.asarray(batch[name])
        elif name in parameters:
            feeds[name] = parameters[name]
        elif name.endswith(ACCUMULATOR_SUFFIX):
            feeds[name] = np.zeros_like(parameters[name[: -len(ACCUMULATOR_SUFFIX)]])
        elif name == "lazy_reset_grad":
            feeds[name] = np.array([True])
        else:
            raise DataError(f"cannot feed training-graph input '{name}' for calibration")
    wanted = list(names)
    values = session.run(wanted, feeds)
    return dict(zip(wanted, (np.asarray(v) for v in values), strict=True))
