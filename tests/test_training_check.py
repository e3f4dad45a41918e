"""The framework checks every training model a pass returns, MaxPoolGrad (onnxruntime's, in the ONNX domain) included."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from builders import cnn
from onnx import helper

import edgeplug
from edgeplug.errors import PassError
from edgeplug.pass_checks import check_training as _check_training
from edgeplug.passes import PassInfo, TrainingModels


def _models_with_maxpool(tmp_path: Path) -> TrainingModels:
    model = cnn()
    relu_index = next(i for i, node in enumerate(model.graph.node) if node.op_type == "Relu")
    relu = model.graph.node[relu_index]
    pooled = relu.output[0]
    relu.output[0] = pooled + "_pre"
    model.graph.node.insert(relu_index + 1, helper.make_node("MaxPool", [pooled + "_pre"], [pooled], name="pool", kernel_shape=[1, 1]))
    onnx.save(model, tmp_path / "m.onnx")
    edgeplug.rewrite(tmp_path / "m.onnx", None, tmp_path / "out")
    return TrainingModels(*(onnx.load(tmp_path / "out" / name) for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx")))


def test_a_training_model_with_maxpoolgrad_is_checked_beyond_it(tmp_path: Path) -> None:
    models = _models_with_maxpool(tmp_path)
    assert any(node.op_type == "MaxPoolGrad" for node in models.training.graph.node)
    info = PassInfo("probe", "probe", "probe", "0", edgeplug.Pass)
    _check_training(info, models)  # a valid model passes
    models.training.graph.node[-1].input[0] = "nowhere"  # break a node after MaxPoolGrad
    with pytest.raises(PassError, match="invalid training model"):
        _check_training(info, models)
