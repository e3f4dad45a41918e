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
    edgeplug.rewrite(tmp_path / "m.onnx", tmp_path / "r.yaml", tmp_path / "out")
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


def test_a_model_tensor_named_target_is_not_taken_for_the_cross_entropy_labels(tmp_path: Path) -> None:
    """The 'target' -> 'labels' renaming once renamed a frozen model tensor called 'target' too (two 'labels' inputs)."""
    model = mlp()
    logits = model.graph.node[-1].output[0]
    model.graph.node[-1].output[0] = "raw"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1, 3], dtype=np.int64), "target"))
    model.graph.node.append(onnx.helper.make_node("Reshape", ["raw", "target"], [logits], name="reshape"))
    edgeplug.rewrite(model, None, tmp_path / "out")
    inputs = [value.name for value in onnx.load(tmp_path / "out" / "training_model.onnx").graph.input]
    assert inputs.count("labels") == 1 and "target" in inputs
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((16, 8)).astype(np.float32), "y": rng.integers(0, 3, 16)}
    assert np.isfinite(edgeplug.Trainer(tmp_path / "out", checkpoints=False).fit(data, batch_size=8).epochs[0].train.loss)
