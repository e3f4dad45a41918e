"""End to end through the CLI: a hand-built CNN on sklearn's 8x8 digits, and a torch export when torch is there."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import builders

from edgeplug import _ort
from edgeplug.checkpoints import LATEST, STATE, latest_checkpoint
from edgeplug.cli import main
from edgeplug.layout import EVAL_MODEL, TRAINING_MODEL
from edgeplug.plugins import default_host
from edgeplug.trainer import Trainer

RECIPE = """\
version: 1
optimizer: {name: adamw, lr: 0.05}
passes:
  - name: trainable
    options: {layers: classifier}
  - name: freeze-bn
"""


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def digits(folder: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:600], order[600:1000]
    train_path, eval_path = folder / "train.npz", folder / "eval.npz"
    np.savez(train_path, x=x[train], y=y[train])
    np.savez(eval_path, x=x[test], y=y[test])
    return train_path, eval_path, {"x": x[test], "y": y[test]}


def run_session(path: Path, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def eval_module_logits(artifacts: Path, x: np.ndarray, output: str = "logits") -> np.ndarray:
    api = _ort.training_api()
    checkpoint = latest_checkpoint(artifacts)
    assert checkpoint is not None
    state = api.CheckpointState.load_checkpoint(str(checkpoint / STATE))
    module = api.Module(str(artifacts / TRAINING_MODEL), state, str(artifacts / EVAL_MODEL))
    module.eval()
    outputs = dict(zip(module.output_names(), module(x, np.zeros(len(x), dtype=np.int64))))
    return np.asarray(outputs[output])


def test_passes_and_schema(capsys: pytest.CaptureFixture[str]) -> None:
    out = cli(capsys, "passes")
    for name in ("normalize", "trainable", "freeze-bn"):
        assert name in out
    listed = json.loads(cli(capsys, "passes", "--json"))
    assert {"normalize", "trainable", "freeze-bn"} <= {entry["name"] for entry in listed}
    assert all(entry["summary"] and entry["version"] for entry in listed)

    names = cli(capsys, "schema").split()
    assert {"recipe", "report", "normalize", "trainable", "freeze-bn"} <= set(names)
    passes = default_host().passes()
    for name in ("recipe", "report", *passes):
        document = json.loads(cli(capsys, "schema", name))
        assert document["type"] == "object"
        if name in passes:
            assert document == passes[name].factory.options_schema


def test_cnn_on_digits_end_to_end(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    train_path, eval_path, test = digits(tmp_path)
    model_path = tmp_path / "cnn.onnx"
    onnx.save(builders.cnn((8, 16), 10, image=8, seed=1), str(model_path))

    # inspect
    text = cli(capsys, "inspect", model_path)
    assert "BatchNormalization" in text and "every op between the parameters and the output has a gradient" in text
    info = json.loads(cli(capsys, "inspect", model_path, "--json"))
    assert info["parameters"]["count"] == 10  # conv0/1 weight+bias, bn0/1 scale+bias, fc weight+bias
    assert info["no_gradient"] == [] and info["unknown_ops"] == []
    assert [layer["node"] for layer in info["layers"]] == ["conv0", "bn0", "conv1", "bn1", "fc"]
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 1, 8, 8]}]

    # rewrite
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    artifacts = tmp_path / "artifacts"
    out = cli(capsys, "rewrite", model_path, "--recipe", recipe, "-o", artifacts)
    assert "freeze-bn" in out and f"wrote {artifacts}" in out
    report = json.loads((artifacts / "report.json").read_text())
    assert report["parameters"]["trainable"] == ["fc.bias", "fc.weight"]
    freeze = next(p for p in report["passes"] if p["name"] == "freeze-bn")
    assert freeze["details"]["folded"] == ["bn0", "bn1"]

    # train with --eval
    metrics_path = tmp_path / "metrics.json"
    out = cli(capsys, "train", artifacts, "--data", train_path, "--eval", eval_path, "--epochs", 2, "--batch-size", 50,
              "--no-progress", "--metrics", metrics_path)
    assert "before training" in out and "epoch 2/2" in out and "done: 24 steps" in out
    metrics = json.loads(metrics_path.read_text())
    initial, final = metrics["initial_eval"]["accuracy"], metrics["epochs"][-1]["eval"]["accuracy"]
    assert final > initial + 0.1, (initial, final)
    assert metrics["epochs"][-1]["eval"]["loss"] < metrics["initial_eval"]["loss"]
    checkpoints = artifacts / "checkpoints"
    assert (checkpoints / LATEST).read_text().strip() == "step-00000024"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000012", "step-00000024"]
    assert (checkpoints / "step-00000024" / STATE).exists()

    # rerun: nothing to do
    out = cli(capsys, "train", artifacts, "--data", train_path, "--epochs", 2, "--batch-size", 50, "--no-progress")
    assert "nothing to do" in out and "done: 0 steps" in out

    # more epochs continue from the checkpoint
    out = cli(capsys, "train", artifacts, "--data", train_path, "--eval", eval_path, "--epochs", 3, "--batch-size", 50, "--no-progress")
    assert "resuming from step-00000024" in out and "epoch 3/3" in out and "done: 12 steps" in out
    assert (checkpoints / LATEST).read_text().strip() == "step-00000036"

    # export: plain onnxruntime runs it and it gives the eval model's logits
    exported = tmp_path / "trained.onnx"
    out = cli(capsys, "export", artifacts, "-o", exported)
    assert f"wrote {exported}" in out
    onnx.checker.check_model(onnx.load(str(exported)), full_check=True)
    logits = run_session(exported, test["x"])
    assert logits.shape == (len(test["y"]), 10)
    np.testing.assert_allclose(logits, eval_module_logits(artifacts, test["x"]), rtol=1e-5, atol=1e-5)
    metrics_now = Trainer(artifacts, progress=False).evaluate(test)
    assert metrics_now.accuracy == pytest.approx(float((logits.argmax(axis=1) == test["y"]).mean()))
    assert metrics_now.accuracy > initial

    # exporting an older checkpoint gives other weights
    older = tmp_path / "older.onnx"
    cli(capsys, "export", artifacts, "-o", older, "--checkpoint", checkpoints / "step-00000024")
    assert not np.allclose(run_session(older, test["x"]), logits)


# -- torch interop -------------------------------------------------------------------------------


def _torch_model(mode: str, path: Path, *, pretrained_bn: bool = True) -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )
    if pretrained_bn:
        # Like a trained network: BN statistics and affine parameters differ. (Fresh BN has
        # running_var == weight == 1 and running_mean == bias == 0, and the exporter then
        # deduplicates them into Identity nodes: see test_torch_fresh_bn_export_with_freeze_bn.)
        with torch.no_grad():
            for layer in net:
                if isinstance(layer, nn.BatchNorm2d):
                    layer.running_mean.uniform_(-0.2, 0.2)
                    layer.running_var.uniform_(0.8, 1.2)
                    layer.weight.uniform_(0.9, 1.1)
                    layer.bias.uniform_(-0.1, 0.1)
    net.train(mode == "train")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (torch.randn(2, 1, 8, 8),), str(path), dynamo=False, input_names=["x"], output_names=["logits"],
            training=torch.onnx.TrainingMode.PRESERVE, opset_version=17,
        )


def _torch_round_trip(capsys: pytest.CaptureFixture[str], tmp_path: Path, mode: str, recipe_text: str | None) -> None:
    model_path = tmp_path / f"torch_{mode}.onnx"
    _torch_model(mode, model_path)
    train_path, _, test = digits(tmp_path)
    artifacts = tmp_path / "artifacts"
    args: list[object] = ["rewrite", model_path, "-o", artifacts]
    if recipe_text is not None:
        (tmp_path / "recipe.yaml").write_text(recipe_text)
        args += ["--recipe", tmp_path / "recipe.yaml"]
    cli(capsys, *args)
    cli(capsys, "train", artifacts, "--data", train_path, "--epochs", 1, "--batch-size", 50, "--no-progress")
    exported = tmp_path / "trained.onnx"
    cli(capsys, "export", artifacts, "-o", exported)
    logits = run_session(exported, test["x"][:7])  # exported at batch 2; normalize made the batch dynamic
    assert logits.shape == (7, 10)
    np.testing.assert_allclose(logits, eval_module_logits(artifacts, test["x"][:7]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe_text", [None, RECIPE], ids=["full", "classifier+freeze-bn"])
def test_torch_eval_export_round_trip(capsys: pytest.CaptureFixture[str], tmp_path: Path, recipe_text: str | None) -> None:
    _torch_round_trip(capsys, tmp_path, "eval", recipe_text)


@pytest.mark.parametrize("recipe_text", [None, RECIPE], ids=["full", "classifier+freeze-bn"])
def test_torch_train_export_round_trip(capsys: pytest.CaptureFixture[str], tmp_path: Path, recipe_text: str | None) -> None:
    """Train-mode exports carry 3-output BatchNormalization; normalize gives them one output."""
    _torch_round_trip(capsys, tmp_path, "train", recipe_text)


def test_torch_fresh_bn_export_with_freeze_bn(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model_path = tmp_path / "torch_eval.onnx"
    _torch_model("eval", model_path, pretrained_bn=False)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    cli(capsys, "rewrite", model_path, "--recipe", tmp_path / "recipe.yaml", "-o", tmp_path / "out")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)  # the export fixed the batch at 2
    np.testing.assert_allclose(run_session(tmp_path / "out" / "forward_model.onnx", x), run_session(model_path, x), atol=1e-5)
    forward = onnx.load(str(tmp_path / "out" / "forward_model.onnx"))
    assert "Identity" not in {node.op_type for node in forward.graph.node}
