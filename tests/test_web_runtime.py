"""The JavaScript runtime (runtimes/web) against the Python trainer, through `edgeplug train --runtime node`.

Same folder, same data, same options: the losses must agree step by step (relative
difference at most 1e-5, one WebAssembly thread), the final parameters must agree, and
the exported models must score the same. Covers a plain folder (the digits example), a
staged one (lls), step-carried state, and the refusal of a folder that needs Python.
Skipped, with the reason, where Node or runtimes/web's npm packages are missing
(.ci/run installs them).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from builders import classification_data, cnn, mlp
from test_device_contract import carry_host
from test_runtime_hooks import make_host as hook_host

import edgeplug
from edgeplug import _ort, tensorfile
from edgeplug.checkpoints import DEVICE_STATE, latest_checkpoint, state_file
from edgeplug.cli import main
from edgeplug.node_runtime import RUNTIME_ENV
from edgeplug.recipe import recipe_from_dict

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "digits_fewshot"
WEB = ROOT / "runtimes" / "web"
TOLERANCE = 1e-5

if shutil.which("node") is None:
    pytest.skip("node is not installed (the JavaScript runtime needs Node.js 20)", allow_module_level=True)
if not (WEB / "node_modules" / "onnxruntime-web").is_dir():
    pytest.skip(f"runtimes/web's npm packages are not installed: run 'npm ci' in {WEB}", allow_module_level=True)


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("web")
    subprocess.run([sys.executable, str(EXAMPLE / "prepare_data.py"), str(work)], check=True, stdout=subprocess.DEVNULL)
    edgeplug.rewrite(EXAMPLE / "pretrained_cnn.onnx", EXAMPLE / "recipe.yaml", work / "built",
                     calibration=dict(np.load(work / "support.npz")))  # new-head reads the support set
    return work


def assert_same_losses(python: dict, node: dict) -> float:
    a, b = np.array(python["step_losses"]), np.array(node["step_losses"])
    assert len(a) == len(b) > 0
    worst = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-12)))
    assert worst <= TOLERANCE, f"step losses differ by {worst:.2e} (relative)"
    return worst


def trained_parameters(folder: Path, artifact_set: int = 0) -> dict[str, np.ndarray]:
    checkpoint = latest_checkpoint(folder)
    assert checkpoint is not None
    if (checkpoint / DEVICE_STATE).is_file():
        tensors, _ = tensorfile.load(checkpoint / DEVICE_STATE)
        prefix = f"{artifact_set}:param:"
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    staged = (checkpoint / "state").is_dir()
    state = _ort.training_api().CheckpointState.load_checkpoint(str(state_file(checkpoint, artifact_set if staged else None)))
    return {name: np.array(p.data) for name, p in state.parameters if p.requires_grad}


def assert_same_parameters(python: Path, node: Path, artifact_set: int = 0) -> None:
    a, b = trained_parameters(python, artifact_set), trained_parameters(node, artifact_set)
    assert set(a) == set(b) and a
    for name in a:
        scale = max(float(np.abs(a[name]).max()), 1e-6)
        assert np.abs(a[name] - b[name]).max() <= 1e-4 * scale, f"{name} differs"


def train_on_both(built: Path, tmp_path: Path, train_args: list[str]) -> tuple[dict, dict]:
    """Copies of `built` trained by `edgeplug train` in Python and in Node (tmp_path/python, tmp_path/node):
    the two runs' --metrics documents."""
    for runtime in ("python", "node"):
        shutil.copytree(built, tmp_path / runtime)
        extra = ["--no-progress"] if runtime == "python" else ["--runtime", "node"]
        assert main(["train", str(tmp_path / runtime), *train_args, *extra, "--metrics", str(tmp_path / f"{runtime}.json")]) == 0
    python, node = (json.loads((tmp_path / f"{r}.json").read_text()) for r in ("python", "node"))
    return python, node


def accuracy(model: Path, data: dict[str, np.ndarray], input_name: str) -> float:
    session = onnxruntime.InferenceSession(str(model))
    return float((session.run(None, {input_name: data[input_name]})[0].argmax(1) == data["y"]).mean())


def test_the_digits_example_trains_the_same_on_node_and_python(example: Path, tmp_path: Path) -> None:
    data = ["--data", str(example / "support.npz"), "--eval", str(example / "query.npz"), "--epochs", "6", "--batch-size", "10"]
    python, node = train_on_both(example / "built", tmp_path, data)
    assert_same_losses(python, node)
    assert_same_parameters(tmp_path / "python", tmp_path / "node")
    assert node["epochs"][-1]["eval"]["accuracy"] == python["epochs"][-1]["eval"]["accuracy"]
    query = dict(np.load(example / "query.npz"))
    scores = []
    for runtime in ("python", "node"):
        assert main(["export", str(tmp_path / runtime), "-o", str(tmp_path / f"{runtime}.onnx")]) == 0
        scores.append(accuracy(tmp_path / f"{runtime}.onnx", query, "image"))
    assert scores[0] == scores[1] == node["epochs"][-1]["eval"]["accuracy"]


def test_a_staged_lls_folder_trains_the_same_on_node(tmp_path: Path) -> None:
    recipe = recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.01},
                               "passes": [{"name": "lls", "options": {"variant": "lls-m"}}]})
    edgeplug.rewrite(cnn((4, 8), 3, image=8, batch_norm=False), recipe, tmp_path / "built")
    np.savez(tmp_path / "train.npz", **classification_data([1, 8, 8], 3, n=40))
    report = json.loads((tmp_path / "built" / "report.json").read_text())
    assert len(report["device_runtime"]["artifact_sets"]) == len(report["stages"]) >= 2
    python, node = train_on_both(tmp_path / "built", tmp_path, ["--data", str(tmp_path / "train.npz"), "--epochs", "2", "--batch-size", "8"])
    assert_same_losses(python, node)
    for number in range(len(report["stages"])):
        assert_same_parameters(tmp_path / "python", tmp_path / "node", number)


def test_an_activation_shortcut_folder_trains_the_same_on_node(tmp_path: Path) -> None:
    """ASI's Tucker factors are step-carried state: the JavaScript runtime carries them (batch-mode factors
    included, through a partial last batch) and gets the Python trainer's losses and parameters."""
    data = classification_data([1, 8, 8], 3, n=44)
    recipe = recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "sgd", "lr": 0.05}, "passes": [
        {"name": "activation-shortcut", "options": {"energy": 0.7, "batch_size": 8, "compress_batch": True}}]})
    report = edgeplug.rewrite(cnn((4, 8), 3, image=8, batch_norm=False), recipe, tmp_path / "built", calibration=data).report
    assert not report["device_runtime"]["needs_python"] and report["training"]["carried_state"]
    np.savez(tmp_path / "train.npz", **data)
    python, node = train_on_both(tmp_path / "built", tmp_path, ["--data", str(tmp_path / "train.npz"), "--epochs", "2", "--batch-size", "8"])
    assert len(python["step_losses"]) == 12
    assert_same_losses(python, node)
    assert_same_parameters(tmp_path / "python", tmp_path / "node")


def test_carried_state_is_carried_by_the_node_runtime(tmp_path: Path) -> None:
    recipe = recipe_from_dict({"version": 1, "passes": [{"name": "carry-test"}]}, host=carry_host())
    edgeplug.rewrite(mlp(features=8, hidden=(16,), classes=3), recipe, tmp_path / "out", host=carry_host())
    np.savez(tmp_path / "train.npz", **classification_data([8], 3, n=10))
    assert main(["train", str(tmp_path / "out"), "--data", str(tmp_path / "train.npz"), "--epochs", "2",
                 "--batch-size", "4", "--runtime", "node"]) == 0
    state, _ = tensorfile.load(latest_checkpoint(tmp_path / "out") / "carried_state.safetensors")
    assert state["0:counter"].tolist() == [6.0]  # 6 steps
    assert np.array_equal(state["0:rows"], np.full((4, 2), 4.0, np.float32))  # 4 full batches; partial ones fed identity


def test_a_folder_that_needs_python_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = recipe_from_dict({"version": 1, "passes": [{"name": "class-offset"}]}, host=hook_host())
    edgeplug.rewrite(mlp(features=8, hidden=(16,), classes=3), recipe, tmp_path / "out", host=hook_host())
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["device_runtime"]["needs_python"] is True
    np.savez(tmp_path / "train.npz", **classification_data([8], 3, n=10))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "out"), "--data", str(tmp_path / "train.npz"), "--runtime", "node"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "needs Python at run time (pass 'class-offset' runs Python runtime hooks" in error
    # the JavaScript runtime refuses it by itself too
    run = subprocess.run(["node", str(WEB / "bin" / "train.mjs"), str(tmp_path / "out"), "--data", "x"], capture_output=True, text=True)
    assert run.returncode == 2 and "needs Python at run time" in run.stderr and run.stderr.count("\n") == 1


def test_missing_runtime_packages_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], example: Path) -> None:
    monkeypatch.setenv(RUNTIME_ENV, str(tmp_path / "nowhere"))
    assert main(["train", str(example / "built"), "--data", str(example / "support.npz"), "--runtime", "node"]) == 2
    assert "the JavaScript runtime is not at" in capsys.readouterr().err


def test_int8_frozen_weights_train_the_same_on_node(example: Path, tmp_path: Path) -> None:
    """quantize-frozen keeps frozen weights as int8 in the checkpoint; the runtime leaves them to onnxruntime."""
    recipe = recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.01},
                               "passes": [{"name": "trainable", "options": {"layers": 1}}, {"name": "quantize-frozen"}]})
    edgeplug.rewrite(EXAMPLE / "pretrained_cnn.onnx", recipe, tmp_path / "built")
    python, node = train_on_both(tmp_path / "built", tmp_path, ["--data", str(example / "support.npz"), "--epochs", "2", "--batch-size", "10"])
    assert_same_losses(python, node)
    assert_same_parameters(tmp_path / "python", tmp_path / "node")


def test_batch_norm_statistics_updated_by_training_reach_the_export(example: Path, tmp_path: Path) -> None:
    """Full fine-tuning keeps batch norm in training mode: onnxruntime updates the running statistics in
    place; the node runtime reads them through eval_model_state.onnx, saves them, restores them on resume,
    and export uses them: both exported models give the same predictions."""
    edgeplug.rewrite(EXAMPLE / "pretrained_cnn.onnx", None, tmp_path / "built")
    portable = json.loads((tmp_path / "built" / "report.json").read_text())["device_runtime"]["artifact_sets"][0]["portable"]
    assert portable["updated_parameters"] and portable["state_eval_model"] == "eval_model_state.onnx"
    data = ["--data", str(example / "support.npz"), "--eval", str(example / "query.npz"), "--batch-size", "10"]
    shutil.copytree(tmp_path / "built", tmp_path / "python")
    shutil.copytree(tmp_path / "built", tmp_path / "node")
    assert main(["train", str(tmp_path / "python"), *data, "--epochs", "3", "--no-progress", "--metrics", str(tmp_path / "p.json")]) == 0
    assert main(["train", str(tmp_path / "node"), *data, "--epochs", "2", "--runtime", "node"]) == 0
    assert main(["train", str(tmp_path / "node"), *data, "--epochs", "3", "--runtime", "node", "--metrics", str(tmp_path / "n.json")]) == 0
    python, node = (json.loads((tmp_path / f"{r}.json").read_text()) for r in ("p", "n"))
    assert python["step_losses"][10:] == pytest.approx(node["step_losses"], rel=TOLERANCE)
    assert node["epochs"][-1]["eval"] == pytest.approx(python["epochs"][-1]["eval"], rel=1e-5)
    query = dict(np.load(example / "query.npz"))
    outputs = []
    for runtime in ("python", "node"):
        assert main(["export", str(tmp_path / runtime), "-o", str(tmp_path / f"{runtime}.onnx")]) == 0
        outputs.append(onnxruntime.InferenceSession(str(tmp_path / f"{runtime}.onnx")).run(None, {"image": query["image"]})[0])
    assert np.abs(outputs[0] - outputs[1]).max() < 1e-4
    assert (outputs[0].argmax(1) == outputs[1].argmax(1)).all()
