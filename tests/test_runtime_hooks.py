"""Runtime hooks end to end: a pass adds a graph input that its hook feeds at every step.

The `class-offset` pass adds a float input ``class_offset[classes]`` to the logits
before the loss; its runtime hook feeds it through ``step.extra_inputs``, checks
the outputs after each step, and keeps a step counter across checkpoints.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import onnxruntime
import pytest
from builders import classification_data, mlp
from onnx import TensorProto, helper

import edgeplug
from edgeplug.checkpoints import HOOKS, latest_checkpoint
from edgeplug.data import Dataset
from edgeplug.exporter import export
from edgeplug.pipeline import rewrite
from edgeplug.plugins import PluginHost
from edgeplug.recipe import recipe_from_dict
from edgeplug.trainer import StepInfo, Trainer

OFFSET_INPUT = "class_offset"
CLASSES = 3
FAVOURED = 2  # the class the fed offset pushes every prediction to
STATE_FILE = "class-offset.json"


class Feeder:
    """Runtime hooks of the class-offset pass; every instance is recorded in `Feeder.created`."""

    created: ClassVar[list[Feeder]] = []

    def __init__(self, offset: float, context: edgeplug.RuntimeContext) -> None:
        self.offset = offset
        self.context = context
        self.before: list[tuple[int, int]] = []
        self.after: list[tuple[int, float, int]] = []
        self.loaded_from: list[Path] = []
        self.saved_to: list[Path] = []
        self.total_steps = 0
        Feeder.created.append(self)

    @edgeplug.hookimpl
    def edgeplug_before_step(self, step: StepInfo) -> None:
        vector = np.zeros(CLASSES, np.float32)
        vector[FAVOURED] = self.offset
        step.extra_inputs[OFFSET_INPUT] = vector
        self.before.append((step.epoch, step.step))

    @edgeplug.hookimpl
    def edgeplug_after_step(self, step: StepInfo, loss: float) -> None:
        logits = step.outputs["logits"]
        self.after.append((step.step, loss, int((logits.argmax(axis=1) == FAVOURED).sum()) - len(logits)))
        self.total_steps += 1

    @edgeplug.hookimpl
    def edgeplug_save_state(self, directory: Path) -> None:
        (directory / STATE_FILE).write_text(json.dumps({"total_steps": self.total_steps}), encoding="utf-8")
        self.saved_to.append(directory)

    @edgeplug.hookimpl
    def edgeplug_load_state(self, directory: Path) -> None:
        self.loaded_from.append(directory)
        self.total_steps = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))["total_steps"]


class ClassOffsetPass(edgeplug.Pass):
    name = "class-offset"
    summary = "Add a per-class offset, fed at run time, to the logits before the loss."
    options_schema: ClassVar[Mapping[str, Any]] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"offset": {"type": "number", "default": 50.0}},
    }

    def rewrite_forward(self, state: edgeplug.ForwardState, context: edgeplug.PassContext) -> edgeplug.ForwardState:
        model = onnx.ModelProto()
        model.CopyFrom(state.model)
        producer = next(node for node in model.graph.node if context.output_name in node.output)
        raw = f"{context.output_name}_before_offset"
        producer.output[list(producer.output).index(context.output_name)] = raw
        model.graph.node.append(helper.make_node("Add", [raw, OFFSET_INPUT], [context.output_name], name="add_class_offset"))
        model.graph.input.append(helper.make_tensor_value_info(OFFSET_INPUT, TensorProto.FLOAT, [CLASSES]))
        return edgeplug.ForwardState(model, state.trainable)

    def runtime_hooks(self, context: edgeplug.RuntimeContext) -> object:
        return Feeder(float(self.options["offset"]), context)

    def report(self) -> edgeplug.PassReport:
        return edgeplug.PassReport(changed=True, summary=f"added input '{OFFSET_INPUT}'", details={"input": OFFSET_INPUT})


class TestPlugin:
    @edgeplug.hookimpl
    def edgeplug_register_passes(self, register: Callable[[type[edgeplug.Pass]], None]) -> None:
        register(ClassOffsetPass)


def make_host() -> PluginHost:
    host = PluginHost(only={"normalize", "trainable"})
    host.register(TestPlugin(), name="runtime-test", version="0.0.1")
    return host


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact folder for the whole module (each test trains a copy)."""
    folder = tmp_path_factory.mktemp("runtime") / "out"
    recipe = recipe_from_dict({"version": 1, "passes": [{"name": "class-offset"}]}, host=make_host())
    rewrite(mlp(features=8, hidden=(16,), classes=CLASSES), recipe, folder, host=make_host())
    return folder


@pytest.fixture
def artifacts(built: Path, tmp_path: Path) -> Iterator[Path]:
    Feeder.created.clear()
    copy = tmp_path / "out"
    shutil.copytree(built, copy)
    yield copy
    Feeder.created.clear()


@pytest.fixture
def data() -> Dataset:
    """Passed as a Dataset: Trainer.dataset() would demand an array for the hook-fed input."""
    arrays = classification_data([8], CLASSES, n=64)
    return Dataset({"x": arrays["x"]}, arrays["y"])


def trainer(artifacts: Path, host: PluginHost) -> Trainer:
    return Trainer(artifacts, host=host, progress=False, keep_checkpoints=5)


def test_the_report_flags_the_pass_as_having_runtime_hooks(built: Path) -> None:
    report = json.loads((built / "report.json").read_text())
    entry = next(p for p in report["passes"] if p["name"] == "class-offset")
    assert entry["runtime_hooks"] is True and entry["plugin"] == "runtime-test"
    assert OFFSET_INPUT in [i["name"] for i in report["training"]["extra_inputs"]]
    assert OFFSET_INPUT not in [i["name"] for i in report["training"]["inputs"]]
    assert OFFSET_INPUT in [i.name for i in onnx.load(str(built / "training_model.onnx")).graph.input]


@pytest.mark.covers_hook("edgeplug_register_passes")
@pytest.mark.covers_hook("edgeplug_before_step")
@pytest.mark.covers_hook("edgeplug_after_step")
def test_hook_feeds_the_extra_input_at_every_step(artifacts: Path, data: Dataset) -> None:
    host = make_host()
    result = trainer(artifacts, host).fit(data, epochs=2, batch_size=16)
    (feeder,) = Feeder.created
    assert result.steps_run == 8
    assert feeder.before == [(epoch, step) for step, epoch in zip(range(8), [0] * 4 + [1] * 4)]
    assert [step for step, _, _ in feeder.after] == list(range(8))
    assert all(np.isfinite(loss) for _, loss, _ in feeder.after)
    assert all(missed == 0 for _, _, missed in feeder.after), "the fed offset did not reach the logits"
    assert feeder.context == edgeplug.RuntimeContext(artifacts, artifacts / "passes" / "class-offset")
    assert not any(name.startswith("runtime:") for name in host.plugin_names()), "runtime hooks outlived fit()"


def test_without_the_hook_the_training_model_lacks_an_input(artifacts: Path, data: Dataset) -> None:
    host = make_host()
    report = json.loads((artifacts / "report.json").read_text())
    for entry in report["passes"]:
        entry["runtime_hooks"] = False
    (artifacts / "report.json").write_text(json.dumps(report))
    with pytest.raises(edgeplug.DataError, match=f"needs inputs \\['{OFFSET_INPUT}'\\] that neither the data nor any pass hook provides"):
        trainer(artifacts, host).fit(data, epochs=1)


@pytest.mark.covers_hook("edgeplug_save_state")
@pytest.mark.covers_hook("edgeplug_load_state")
def test_hook_state_round_trips_through_a_resumed_run(artifacts: Path, data: Dataset) -> None:
    trainer(artifacts, make_host()).fit(data, epochs=1)  # 2 steps, checkpoint step-2
    first = Feeder.created[-1]
    first_checkpoint = latest_checkpoint(artifacts)
    assert first.loaded_from == [] and first.total_steps == 2
    assert json.loads((first_checkpoint / HOOKS / STATE_FILE).read_text()) == {"total_steps": 2}

    result = trainer(artifacts, make_host()).fit(data, epochs=2)
    second = Feeder.created[-1]
    assert second is not first and result.resumed_from_step == 2 and result.steps_run == 2
    assert second.loaded_from == [first_checkpoint / HOOKS]
    assert [step for _, step in second.before] == [2, 3]
    assert second.total_steps == 4  # continued from the saved 2, not from 0
    assert json.loads((latest_checkpoint(artifacts) / HOOKS / STATE_FILE).read_text()) == {"total_steps": 4}


def test_resuming_for_more_epochs_than_checkpoints_kept(artifacts: Path, data: Dataset) -> None:
    Trainer(artifacts, host=make_host(), progress=False).fit(data, epochs=1)
    result = Trainer(artifacts, host=make_host(), progress=False, keep_checkpoints=2).fit(data, epochs=3)
    assert result.resumed_from_step == 2 and Feeder.created[-1].total_steps == 6


def test_restart_does_not_load_hook_state(artifacts: Path, data: Dataset) -> None:
    trainer(artifacts, make_host()).fit(data, epochs=1)
    trainer(artifacts, make_host()).fit(data, epochs=1, resume=False)
    assert Feeder.created[-1].loaded_from == [] and Feeder.created[-1].total_steps == 2


def test_mid_epoch_checkpoints_save_hook_state(artifacts: Path, data: Dataset) -> None:
    Trainer(artifacts, host=make_host(), progress=False, checkpoint_every=1, keep_checkpoints=10).fit(data, epochs=1, batch_size=16)
    saved = sorted(p.parent.parent.name for p in (artifacts / "checkpoints").glob(f"step-*/{HOOKS}/{STATE_FILE}"))
    assert saved == [f"step-{n:08d}" for n in (1, 2, 3, 4)]
    assert len(Feeder.created[-1].saved_to) == 4


def test_exported_model_keeps_the_hook_fed_input(artifacts: Path, data: Dataset, tmp_path: Path) -> None:
    """Known limitation: export keeps every graph input, so inference must feed the offset too."""
    trainer(artifacts, make_host()).fit(data, epochs=1)
    exported = export(artifacts, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in session.get_inputs()) == [OFFSET_INPUT, "x"]
    offset = np.zeros(CLASSES, np.float32)
    offset[FAVOURED] = 50.0
    (logits,) = session.run(None, {"x": data.inputs["x"][:4], OFFSET_INPUT: offset})
    assert (logits.argmax(axis=1) == FAVOURED).all()


def test_trainer_dataset_accepts_data_without_hook_fed_inputs(artifacts: Path) -> None:
    trainer(artifacts, make_host()).fit(classification_data([8], CLASSES, n=64), epochs=1)


def test_evaluation_feeds_hook_inputs(artifacts: Path, data: Dataset) -> None:
    result = trainer(artifacts, make_host()).fit(data, eval=data, epochs=1)
    assert result.initial_eval is not None and result.epochs[-1].eval is not None


def test_a_runtime_hook_that_raises_stops_training(artifacts: Path, data: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Feeder, step: StepInfo, loss: float) -> Any:
        raise ValueError("hook bug")

    monkeypatch.setattr(Feeder, "edgeplug_after_step", edgeplug.hookimpl(broken))
    host = make_host()
    with pytest.raises(Exception, match="hook bug"):
        trainer(artifacts, host).fit(data, epochs=1)
    assert not any(name.startswith("runtime:") for name in host.plugin_names())
