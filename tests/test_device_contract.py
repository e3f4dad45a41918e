"""The device contract: report.json `device_runtime`, the portable files, step-carried state.

The portable path (training model with gradient outputs + optimizer step with tensor
inputs) is what runtimes without a learning-rate setter (onnxruntime-web) run; here
it runs in Python's onnxruntime and must give exactly what onnxruntime's own
optimizer gives. Carried state must be fed, updated, checkpointed and resumed by the
trainer with no plugin hook installed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import pytest
from builders import classification_data, mlp
from onnx import TensorProto, helper

import edgeplug
from edgeplug import _ort, tensorfile
from edgeplug.carried import CHECKPOINT_FILE
from edgeplug.checkpoints import latest_checkpoint
from edgeplug.data import Dataset
from edgeplug.errors import PassError
from edgeplug.layout import CARRIED_STATE_FILE
from edgeplug.pipeline import rewrite
from edgeplug.plugins import PluginHost
from edgeplug.recipe import recipe_from_dict
from edgeplug.trainer import Trainer

ROWS = 4  # the batch size the carried `rows` state is built for


class CarryPass(edgeplug.Pass):
    """Adds two carried states to the training graph: `counter` (+1 a step) and `rows` (batch-shaped, +1 a step)."""

    name = "carry-test"
    summary = "test pass with step-carried state"
    options_schema: ClassVar[Mapping[str, Any]] = {
        "type": "object", "additionalProperties": False,
        "properties": {"bad": {"type": "string", "default": ""}},
    }

    def rewrite_training(self, models: edgeplug.TrainingModels, context: edgeplug.PassContext) -> edgeplug.TrainingModels:
        training = onnx.ModelProto()
        training.CopyFrom(models.training)
        graph = training.graph
        graph.initializer.append(onnx.numpy_helper.from_array(np.ones(1, np.float32), "carry_one"))
        graph.input.append(helper.make_tensor_value_info("counter", TensorProto.FLOAT, [1]))
        graph.input.append(helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["batch", 2]))
        graph.node.append(helper.make_node("Add", ["counter", "carry_one"], ["counter.next"]))
        graph.node.append(helper.make_node("Add", ["rows", "carry_one"], ["rows.next"]))
        graph.output.append(helper.make_tensor_value_info("counter.next", TensorProto.FLOAT, [1]))
        graph.output.append(helper.make_tensor_value_info("rows.next", TensorProto.FLOAT, ["batch", 2]))
        carried = (
            edgeplug.CarriedState("counter", "counter.next", np.zeros(1, np.float32)),
            edgeplug.CarriedState("rows" if self.options["bad"] != "input" else "nope", "rows.next",
                                  np.zeros((ROWS, 2), np.float32), batch_axis=0, other_batch="identity"),
        )
        return dataclasses.replace(models, training=training, carried=(*models.carried, *carried))

    def report(self) -> edgeplug.PassReport:
        return edgeplug.PassReport(True, "carried state added")


class CarryPlugin:
    @edgeplug.hookimpl
    def edgeplug_register_passes(self, register: Callable[[type[edgeplug.Pass]], None]) -> None:
        register(CarryPass)


def carry_host() -> PluginHost:
    host = PluginHost(only={"normalize", "trainable"})
    host.register(CarryPlugin(), name="carry-test", version="0.0.1")
    return host


@pytest.fixture(scope="module")
def carried_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("carry") / "out"
    recipe = recipe_from_dict({"version": 1, "passes": [{"name": "carry-test"}]}, host=carry_host())
    rewrite(mlp(features=8, hidden=(16,), classes=3), recipe, folder, host=carry_host())
    return folder


@pytest.fixture
def data() -> Dataset:
    arrays = classification_data([8], 3, n=10)  # batches of 4, 4, 2: the last one is partial
    return Dataset({"x": arrays["x"]}, arrays["y"])


def _state(checkpoint: Path) -> dict[str, np.ndarray]:
    tensors, _ = tensorfile.load(checkpoint / CHECKPOINT_FILE)
    return tensors


def test_carried_state_is_declared_in_the_report_and_needs_no_python(carried_folder: Path) -> None:
    report = json.loads((carried_folder / "report.json").read_text())
    device = report["device_runtime"]
    assert device["needs_python"] is False and device["needs_python_because"] == []
    (entry,) = device["artifact_sets"]
    assert entry["carried_state"] == report["training"]["carried_state"] == [
        {"input": "counter", "output": "counter.next", "dtype": "float32", "shape": [1], "batch_axis": None,
         "other_batch": "identity", "eval": False},
        {"input": "rows", "output": "rows.next", "dtype": "float32", "shape": [ROWS, 2], "batch_axis": 0,
         "other_batch": "identity", "eval": False},
    ]
    initial, _ = tensorfile.load(carried_folder / entry["carried_state_file"])
    assert entry["carried_state_file"] == CARRIED_STATE_FILE and set(initial) == {"counter", "rows"}
    assert {"counter", "rows"} <= set(entry["train_inputs"])


def test_trainer_carries_the_state_and_skips_partial_batches(carried_folder: Path, data: Dataset, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    shutil.copytree(carried_folder, folder)
    Trainer(folder, progress=False, host=carry_host()).fit(data, epochs=2, batch_size=ROWS)  # 6 steps, 4 full
    state = _state(latest_checkpoint(folder))
    assert state["0:counter"].tolist() == [6.0]
    assert np.array_equal(state["0:rows"], np.full((ROWS, 2), 4.0, np.float32))


def test_carried_state_survives_a_resume(carried_folder: Path, data: Dataset, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    shutil.copytree(carried_folder, folder)
    Trainer(folder, progress=False, host=carry_host()).fit(data, epochs=1, batch_size=ROWS)
    assert _state(latest_checkpoint(folder))["0:counter"].tolist() == [3.0]
    result = Trainer(folder, progress=False, host=carry_host()).fit(data, epochs=2, batch_size=ROWS)
    assert result.resumed_from_step == 3 and result.steps_run == 3
    state = _state(latest_checkpoint(folder))
    assert state["0:counter"].tolist() == [6.0] and state["0:rows"].max() == 4.0


def test_a_bad_declaration_is_a_pass_error(tmp_path: Path) -> None:
    recipe = recipe_from_dict({"version": 1, "passes": [{"name": "carry-test", "options": {"bad": "input"}}]}, host=carry_host())
    with pytest.raises(PassError, match="carried state input 'nope' is not an input of the training model"):
        rewrite(mlp(features=8, hidden=(16,), classes=3), recipe, tmp_path / "out", host=carry_host())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_the_portable_step_equals_onnxruntimes_optimizer(optimizer: str, tmp_path: Path) -> None:
    """Gradient outputs + optimizer_step.onnx, driven by hand, give bit-identical losses and parameters."""
    recipe = recipe_from_dict({"version": 1, "optimizer": {"name": optimizer, "lr": 0.05}, "passes": []})
    rewrite(mlp(features=8, hidden=(16,), classes=3), recipe, tmp_path / "out")
    folder = tmp_path / "out"
    device = json.loads((folder / "report.json").read_text())["device_runtime"]
    (entry,) = device["artifact_sets"]
    portable = entry["portable"]
    arrays = classification_data([8], 3, n=12)
    x, y = arrays["x"], arrays["y"]
    rates = [0.05, 0.03, 0.01]

    state, module, opt = _ort.open_artifacts(folder, folder / "checkpoint")
    module.train()
    expected = []
    for rate in rates:
        opt.set_learning_rate(rate)
        expected.append(float(module(x, y)[0]))
        opt.step()
        module.lazy_reset_grad()
    expected_parameters = module.get_contiguous_parameters(True).numpy()

    api, runtime = _ort.training_api(), _ort.inference_runtime()
    portable_state = api.CheckpointState.load_checkpoint(str(folder / "checkpoint"))
    gradients_module = api.Module(str(folder / portable["training_model"]), portable_state, str(folder / "eval_model.onnx"))
    gradients_module.train()
    stepper = runtime.InferenceSession(str(folder / portable["optimizer_step_model"]))
    trainable = [p for p in entry["parameters"] if p["trainable"]]
    held = {name: [np.array(portable_state.parameters[p["name"]].data) if name == "params" else
                   np.zeros(p["shape"], np.float32) for p in trainable] for name in portable["state"]}
    steps, losses = 0, []
    for rate in rates:
        outputs = dict(zip(gradients_module.output_names(), gradients_module(x, y), strict=True))
        feeds: dict[str, np.ndarray] = {"learning_rate": np.array([rate], np.float32), "step": np.array([steps + 1], np.int64)}
        feeds = {name: value for name, value in feeds.items() if name in [s["name"] for s in portable["scalar_inputs"]]}
        for k in range(len(trainable)):
            feeds[f"gradients.{k}"] = outputs[portable["gradient_outputs"][k]]
            feeds.update({f"{name}.{k}": held[name][k] for name in portable["state"]})
        result = dict(zip([o.name for o in stepper.get_outputs()], stepper.run(None, feeds), strict=True))
        steps += int(bool(result[portable["flag_output"]]))
        held = {name: [result[f"{name}.{k}.new"] for k in range(len(trainable))] for name in portable["state"]}
        for k, parameter in enumerate(trainable):
            portable_state.parameters[parameter["name"]] = held["params"][k]
        gradients_module.lazy_reset_grad()
        losses.append(float(outputs[entry["loss_output"]]))
    assert losses == expected
    assert np.array_equal(np.concatenate([p.ravel() for p in held["params"]]), expected_parameters)
