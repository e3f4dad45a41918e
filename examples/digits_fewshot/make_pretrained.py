"""Build the example's pretrained CNN reproducibly from shipped data, with edgeplug itself.

A small CNN (Conv-BN-ReLU x3, global pooling, linear head of 10 classes) is built
with onnx.helper and trained from scratch on scikit-learn digits of classes 0-4
only, drawn from the first half of the data. Rows 5-9 of its head never see a
label: the few-shot task in run.sh has to teach them. Writes pretrained_cnn.onnx.

    python examples/digits_fewshot/make_pretrained.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from common import PRETRAIN_CLASSES, digits_split
from onnx import TensorProto, helper, numpy_helper

import edgeplug

HERE = Path(__file__).parent
CHANNELS = (16, 32, 32)


def build_cnn(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def param(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    previous, width = "image", 1
    for i, size in enumerate(CHANNELS):
        stride = 2 if i > 0 else 1
        weight = param(f"features.{i}.conv.weight", rng.standard_normal((size, width, 3, 3)) * np.sqrt(2.0 / (9 * width)))
        nodes.append(helper.make_node("Conv", [previous, weight], [f"conv{i}"], name=f"features.{i}.conv", pads=[1, 1, 1, 1], strides=[stride, stride]))
        bn = [param(f"features.{i}.bn.{p}", v) for p, v in (("weight", np.ones(size)), ("bias", np.zeros(size)), ("running_mean", np.zeros(size)), ("running_var", np.ones(size)))]
        nodes.append(helper.make_node("BatchNormalization", [f"conv{i}", *bn], [f"bn{i}"], name=f"features.{i}.bn"))
        nodes.append(helper.make_node("Relu", [f"bn{i}"], [f"relu{i}"], name=f"features.{i}.relu"))
        previous, width = f"relu{i}", size
    nodes += [
        helper.make_node("GlobalAveragePool", [previous], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", param("classifier.weight", rng.standard_normal((10, width)) * 0.01), param("classifier.bias", np.zeros(10))], ["logits"], name="classifier", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeplug-example")
    model.ir_version = 8
    return model


def main() -> int:
    x, y, _, _ = digits_split()
    keep = np.isin(y, PRETRAIN_CLASSES)
    x, y = x[keep], y[keep]
    cut = int(len(y) * 0.85)
    with tempfile.TemporaryDirectory() as scratch:
        artifacts = Path(scratch) / "artifacts"
        recipe = edgeplug.load_recipe(HERE / "pretrain_recipe.yaml")
        edgeplug.rewrite(build_cnn(), recipe, artifacts)
        trainer = edgeplug.Trainer(artifacts, seed=0, progress=False, echo=print)
        trainer.fit({"image": x[:cut], "y": y[:cut]}, {"image": x[cut:], "y": y[cut:]}, epochs=30, batch_size=32)
        edgeplug.export(artifacts, HERE / "pretrained_cnn.onnx")
    print(f"wrote {HERE / 'pretrained_cnn.onnx'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
