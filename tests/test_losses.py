"""Every recipe loss trains from the same `labels` array (onnxruntime names some targets 'target')."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import mlp

import edgeplug


@pytest.mark.parametrize("loss", ["mse", "l1", "bce-with-logits"])
def test_regression_losses_train_from_labels(tmp_path: Path, loss: str) -> None:
    model = mlp()
    onnx.save(model, tmp_path / "m.onnx")
    (tmp_path / "r.yaml").write_text(f"loss: {loss}\noptimizer: {{name: sgd, lr: 0.05}}\n", encoding="utf-8")
    result = edgeplug.rewrite(tmp_path / "m.onnx", tmp_path / "r.yaml", tmp_path / "out")
    for name in ("training_model.onnx", "eval_model.onnx"):
        inputs = [value.name for value in onnx.load(tmp_path / "out" / name).graph.input]
        assert "target" not in inputs and "labels" in inputs
    rng = np.random.default_rng(0)
    width = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    classes = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    data = {model.graph.input[0].name: rng.standard_normal((64, width)).astype(np.float32),
            "labels": (rng.random((64, classes)) > 0.5).astype(np.float32)}
    fit = edgeplug.Trainer(tmp_path / "out", checkpoints=False).fit(data, epochs=4, batch_size=16)
    assert fit.epochs[-1].train.loss < fit.epochs[0].train.loss
