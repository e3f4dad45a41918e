"""Mobile output: ORT-format models, a nominal checkpoint and the size report (issue 9)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from builders import classification_data, mlp

from edgeplug import _ort
from edgeplug.cli import main
from edgeplug.layout import (
    CHECKPOINT,
    EVAL_MODEL,
    FORWARD_MODEL,
    GRADIENTS_MODEL,
    NOMINAL_CHECKPOINT,
    OPERATOR_CONFIGS,
    OPTIMIZER_MODEL,
    OPTIMIZER_STEP_MODEL,
    ORT_MODELS,
    TRAINING_MODEL,
)
from edgeplug.passes import Pass, PassReport, TrainingModels
from edgeplug.pipeline import rewrite
from edgeplug.plugins import PluginHost, hookimpl
from edgeplug.recipe import recipe_from_dict

ORT_TRAINING, ORT_EVAL, ORT_OPTIMIZER = (ORT_MODELS[name] for name in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL))
# the first layer frozen: the checkpoints then hold frozen parameters too
RECIPE = {"optimizer": {"name": "adamw", "lr": 0.05}, "passes": [{"name": "trainable", "options": {"layers": 1}}]}


class StampEval(Pass):
    """A rewrite_training pass whose change must reach the .ort files."""

    name = "stamp-eval"
    summary = "marks the eval model"

    def rewrite_training(self, models: TrainingModels, context: object) -> TrainingModels:
        onnx.helper.set_model_props(models.eval, {"stamped-by": "rewrite_training"})
        return models

    def report(self) -> PassReport:
        return PassReport(changed=True, summary="stamped")


def host_with_stamp() -> PluginHost:
    class Plugin:
        @hookimpl
        def edgeplug_register_passes(self, register: object) -> None:
            register(StampEval)  # type: ignore[operator]

    host = PluginHost(only={"normalize", "trainable"})
    host.register(Plugin(), name="mobile-test", version="1.0")
    return host


@pytest.fixture(scope="module")
def mobile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mobile") / "out"
    host = host_with_stamp()
    recipe = recipe_from_dict({**RECIPE, "passes": [*RECIPE["passes"], {"name": "stamp-eval"}]}, host=host)
    rewrite(mlp(hidden=(16, 8)), recipe, out, host=host, ort_format=True, nominal_checkpoint=True)
    return out


def batch(n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    data = classification_data((8,), 3, n=n)
    return data["x"], data["y"]


def test_flags_write_ort_models_nominal_checkpoint_and_sizes(mobile: Path) -> None:
    import json

    report = json.loads((mobile / "report.json").read_text())
    expected = {TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, FORWARD_MODEL, CHECKPOINT, NOMINAL_CHECKPOINT,
                *ORT_MODELS.values(), *OPERATOR_CONFIGS.values(), GRADIENTS_MODEL, OPTIMIZER_STEP_MODEL}
    assert set(report["artifacts"]) == expected
    for name, size in report["artifacts"].items():
        assert (mobile / name).stat().st_size == size > 0
    # the ONNX files stay (train, profile and export read them); the nominal checkpoint holds no values
    assert report["artifacts"][NOMINAL_CHECKPOINT] < report["artifacts"][CHECKPOINT]


def test_ort_models_are_converted_after_the_passes(mobile: Path) -> None:
    session = onnxruntime.InferenceSession(str(mobile / ORT_EVAL), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map.get("stamped-by") == "rewrite_training"


def test_ort_training_model_trains_with_the_full_checkpoint(mobile: Path) -> None:
    _, module, optimizer = _ort.open_artifacts(mobile, ort_format=True)
    x, y = batch()
    module.train()
    losses = []
    for _ in range(10):
        loss, _ = module(x, y)
        optimizer.step()
        module.lazy_reset_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_nominal_checkpoint_is_filled_from_the_full_one(mobile: Path) -> None:
    """What an app that bundles the training model does: load the nominal checkpoint, then copy the weights in."""
    api = _ort.training_api()
    nominal = api.CheckpointState.load_checkpoint(str(mobile / NOMINAL_CHECKPOINT))
    full = api.CheckpointState.load_checkpoint(str(mobile / CHECKPOINT))
    names = sorted(name for name, _ in full.parameters)
    assert len(nominal.parameters) == len(names)
    with pytest.raises(RuntimeError, match="nominal state"):  # names and shapes only: no values to read
        next(iter(nominal.parameters))

    reference = api.Module(str(mobile / ORT_TRAINING), full, str(mobile / ORT_EVAL))
    module = api.Module(str(mobile / ORT_TRAINING), nominal, str(mobile / ORT_EVAL))
    assert module.get_parameters_size(trainable_only=False) == reference.get_parameters_size(trainable_only=False)
    # the weights (trainable and frozen) as one flat buffer, e.g. downloaded by the app
    weights = reference.get_contiguous_parameters(trainable_only=False)
    module.copy_buffer_to_parameters(weights, trainable_only=False)
    assert np.array_equal(module.get_contiguous_parameters(trainable_only=False).numpy(), weights.numpy())
    assert sorted(name for name, _ in nominal.parameters) == names  # readable now

    x, y = batch()
    module.train(False)
    reference.train(False)
    np.testing.assert_array_equal(module(x, y)[1], reference(x, y)[1])
    optimizer = api.Optimizer(str(mobile / ORT_OPTIMIZER), module)
    module.train()
    module(x, y)
    optimizer.step()
    assert not np.array_equal(module.get_contiguous_parameters(trainable_only=True).numpy(),
                              reference.get_contiguous_parameters(trainable_only=True).numpy())


def test_default_rewrite_writes_no_mobile_files(tmp_path: Path) -> None:
    result = rewrite(mlp(), recipe_from_dict(RECIPE), tmp_path / "out")
    assert set(result.report["artifacts"]) == {TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, FORWARD_MODEL, CHECKPOINT,
                                               GRADIENTS_MODEL, OPTIMIZER_STEP_MODEL}
    assert not list((tmp_path / "out").glob("*.ort")) and not (tmp_path / "out" / NOMINAL_CHECKPOINT).exists()


def test_cli_prints_sizes_and_the_folder_still_trains_and_exports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, data, out = tmp_path / "model.onnx", tmp_path / "train.npz", tmp_path / "out"
    onnx.save(mlp(), model)
    np.savez(data, **classification_data((8,), 3, n=32))

    assert main(["rewrite", str(model), "-o", str(out), "--ort-format", "--nominal-checkpoint"]) == 0
    sizes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sizes: ")]
    assert len(sizes) == 1
    assert ".onnx " in sizes[0] and ".ort " in sizes[0] and "checkpoint" in sizes[0] and "nominal checkpoint" in sizes[0]

    assert main(["train", str(out), "--data", str(data), "--batch-size", "16", "--no-progress"]) == 0
    assert main(["export", str(out), "-o", str(tmp_path / "trained.onnx")]) == 0
    assert (tmp_path / "trained.onnx").is_file()

    assert main(["rewrite", str(model), "-o", str(tmp_path / "plain")]) == 0
    plain = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sizes: ")]
    assert len(plain) == 1 and ".ort" not in plain[0] and "nominal" not in plain[0]


def test_a_failed_conversion_publishes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from edgeplug.errors import ModelError

    def convert(*args: object, **kwargs: object) -> None:
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : no kernel for op Foo")

    monkeypatch.setattr(_ort, "ort_converter", lambda: SimpleNamespace(
        convert_onnx_models_to_ort=convert, OptimizationStyle=SimpleNamespace(Fixed="Fixed")))
    with pytest.raises(ModelError, match="could not convert the training models to ORT format: no kernel for op Foo"):
        rewrite(mlp(), None, tmp_path / "out", ort_format=True)
    assert not (tmp_path / "out").exists()
