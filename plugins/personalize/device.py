"""The device half: run the slot model forward with plain onnxruntime inference.

Nothing here imports onnxruntime's training API or builds a gradient graph: slot
values are fed as inputs of one inference session, so swapping them costs nothing
but a new dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgeplug.plugin_api import DataError, inference_runtime

from .manifest import Manifest, load_manifest

BATCH = 256


class DeviceModel:
    """An artifact folder's device model: forward passes with optional slot values."""

    def __init__(self, artifacts: str | Path) -> None:
        self.manifest, self.path = load_manifest(artifacts)
        runtime = inference_runtime()
        options = runtime.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = runtime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self._defaults: dict[str, np.ndarray] | None = None

    def defaults(self) -> dict[str, np.ndarray]:
        """The model's own slot values (what 'no adaptation' uses)."""
        if self._defaults is None:
            names = {slot.name for slot in self.manifest.slots}
            model = onnx.load(str(self.path))
            self._defaults = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in names}
        return dict(self._defaults)

    def inputs(self, data: Mapping[str, np.ndarray], label: str) -> np.ndarray:
        """The model input from an .npz's arrays (named as the input, or 'x'), as the model's dtype."""
        key = self.manifest.input if self.manifest.input in data else "x"
        if key not in data:
            raise DataError(f"{label}: no array for model input '{self.manifest.input}' "
                            f"(arrays: {', '.join(sorted(data)) or 'none'}); name it '{self.manifest.input}' or 'x'")
        array = np.asarray(data[key])
        expected = self.manifest.input_shape
        if array.ndim != len(expected) or any(isinstance(d, int) and d != a for d, a in zip(expected[1:], array.shape[1:])):
            raise DataError(f"{label}: array '{key}' has shape {tuple(array.shape)} but the model expects {list(expected)}")
        if len(array) == 0:
            raise DataError(f"{label}: array '{key}' holds no samples")
        return array.astype(self.manifest.input_dtype, copy=False)

    def run(self, x: np.ndarray, outputs: Sequence[str], slots: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """Outputs for all samples, in batches; `slots` replaces those slot values (others keep theirs)."""
        feeds: dict[str, Any] = dict(slots or {})
        parts: list[list[np.ndarray]] = [[] for _ in outputs]
        for start in range(0, len(x), BATCH):
            feeds[self.manifest.input] = x[start:start + BATCH]
            for part, value in zip(parts, self.session.run(list(outputs), feeds)):
                part.append(value)
        return [np.concatenate(part) for part in parts]

    def logits(self, x: np.ndarray, slots: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        return self.run(x, [self.manifest.output], slots)[0]

    def features(self, x: np.ndarray, slots: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """[N, feature_width]: per tap, per-channel spatial mean and std (rank > 2) or the values (rank 2)."""
        taps = self.run(x, [f.tensor for f in self.manifest.features], slots)
        return describe(taps)


def describe(taps: Sequence[np.ndarray]) -> np.ndarray:
    """Per-sample feature vector from tap activations."""
    columns = []
    for tap in taps:
        if tap.ndim > 2:
            flat = tap.reshape(tap.shape[0], tap.shape[1], -1).astype(np.float64)
            columns += [flat.mean(axis=2), flat.std(axis=2)]
        else:
            columns.append(tap.reshape(tap.shape[0], -1).astype(np.float64))
    return np.concatenate(columns, axis=1).astype(np.float32)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def manifest_of(artifacts: str | Path) -> Manifest:
    return load_manifest(artifacts)[0]


def personalised_model(device: DeviceModel, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The plain inference model with the slot values baked in: slots are no longer inputs, taps no longer outputs."""
    model = onnx.load(str(device.path))
    slots = {slot.name for slot in device.manifest.slots}
    for tensor in model.graph.initializer:
        if tensor.name in values:
            tensor.CopyFrom(numpy_helper.from_array(values[tensor.name], tensor.name))
    inputs = [i for i in model.graph.input if i.name not in slots]
    outputs = [o for o in model.graph.output if o.name == device.manifest.output]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    return model
