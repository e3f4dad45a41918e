"""Staged artifact folders: the contract any pass can use to split training into stages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from builders import classification_data, mlp
from onnx import helper, numpy_helper

import edgeplug
from edgeplug import cli
from edgeplug.errors import PassError, RecipeError
from edgeplug.layout import (
    CHECKPOINT,
    EVAL_MODEL,
    FORWARD_MODEL,
    OPTIMIZER_MODEL,
    REPORT_FILE,
    TRAINING_MODEL,
)
from edgeplug.passes import ForwardState, Pass, PassContext, PassReport, Stage
from edgeplug.profiling import measure, static_profile
from edgeplug.recipe import recipe_from_dict
from edgeplug.testing import host_with
from edgeplug.validation import first_error, load_schema


def _sub_model(model: onnx.ModelProto, nodes: list[str], inputs: list[onnx.ValueInfoProto], extra: list[onnx.NodeProto],
               extra_inits: list[onnx.TensorProto], outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    chosen = [n for n in model.graph.node if n.name in nodes]
    read = {name for node in [*chosen, *extra] for name in node.input}
    inits = [t for t in model.graph.initializer if t.name in read] + extra_inits
    graph = helper.make_graph([*chosen, *extra], "stage", inputs, outputs, inits)
    stage = helper.make_model(graph, opset_imports=list(model.opset_import))
    stage.ir_version = model.ir_version
    return stage


class SplitPass(Pass):
    """Splits mlp(hidden=(16,)) after its hidden layer; stage 0 gets a learnable probe classifier."""

    name = "split"
    summary = "test: two stages"
    options_schema = {"type": "object", "properties": {"mode": {"type": "string"}}, "additionalProperties": False}

    def rewrite_forward(self, state: ForwardState, context: PassContext) -> ForwardState:
        model, mode = state.model, self.options.get("mode", "ok")
        x = model.graph.input[0]
        hidden = helper.make_tensor_value_info("a0", onnx.TensorProto.FLOAT, ["N", 16])
        probe = [helper.make_node("Gemm", ["a0", "probe.weight", "probe.bias"], ["probe_logits"], name="probe")]
        probe_inits = [numpy_helper.from_array(np.full((16, 3), 0.01, np.float32), "probe.weight"),
                       numpy_helper.from_array(np.zeros(3, np.float32), "probe.bias")]
        first = _sub_model(model, ["fc0", "act0"], [x], probe, probe_inits,
                           [helper.make_tensor_value_info("probe_logits", onnx.TensorProto.FLOAT, ["N", 3]), hidden])
        handed = hidden if mode != "unfed" else helper.make_tensor_value_info("elsewhere", onnx.TensorProto.FLOAT, ["N", 16])
        second = _sub_model(model, ["fc1"], [handed], [], [], list(model.graph.output))
        if mode == "unfed":
            second.graph.node[0].input[0] = "elsewhere"
        stages = (
            Stage("hidden", first, frozenset({"fc0.weight", "fc0.bias", "probe.weight", "probe.bias"}), "probe_logits", ("a0",)),
            Stage("classifier", second, frozenset({"fc1.weight", "fc1.bias"}), "logits"),
        )
        if mode == "wrong-last":  # the chain ends before the model's output
            stages = stages[:1]
        return ForwardState(model, state.trainable, stages)

    def report(self) -> PassReport:
        return PassReport(True, "split in two")


def _rewrite(out: Path, *passes: dict[str, Any]) -> dict[str, Any]:
    host = host_with(SplitPass)
    recipe = recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.02},
                               "passes": list(passes) or [{"name": "split"}]}, host=host)
    return dict(edgeplug.rewrite(mlp(8, (16,), 3), recipe, out, host=host).report)


def test_each_stage_is_a_regular_artifact_folder_and_the_report_describes_the_chain(tmp_path: Path) -> None:
    report = _rewrite(tmp_path / "out")
    assert first_error(report, load_schema("report")) is None
    assert [(s["name"], s["dir"], s["inputs"], s["output"], s["passes_on"]) for s in report["stages"]] == [
        ("hidden", "stages/0", ["x"], "probe_logits", ["a0"]),
        ("classifier", "stages/1", ["a0"], "logits", []),
    ]
    for number in range(2):
        folder = tmp_path / "out" / f"stages/{number}"
        for name in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, FORWARD_MODEL, CHECKPOINT, REPORT_FILE):
            assert (folder / name).is_file()
            if name != REPORT_FILE:
                assert report["artifacts"][f"stages/{number}/{name}"] == (folder / name).stat().st_size
        stage_report = json.loads((folder / REPORT_FILE).read_text())
        assert first_error(stage_report, load_schema("report")) is None
        assert [i["name"] for i in stage_report["training"]["inputs"]] == report["stages"][number]["inputs"]
    assert report["parameters"]["trainable_count"] == 6 and report["parameters"]["trainable_values"] == 8 * 16 + 16 + 16 * 3 + 3 + 16 * 3 + 3
    inference = onnx.load(str(tmp_path / "out" / FORWARD_MODEL))
    assert [n.name for n in inference.graph.node] == ["fc0", "act0", "fc1"]


def test_single_stage_folders_stay_as_they_were(tmp_path: Path) -> None:
    host = host_with()
    report = edgeplug.rewrite(mlp(8, (16,), 3), recipe_from_dict({"passes": []}, host=host), tmp_path / "out", host=host).report
    assert "stages" not in report and not (tmp_path / "out/stages").exists()
    edgeplug.Trainer(tmp_path / "out", host=host, progress=False).fit(classification_data((8,), 3, n=32), epochs=1, batch_size=16)
    assert (edgeplug.checkpoints.latest_checkpoint(tmp_path / "out") / "state").is_file()  # type: ignore[operator]


def test_stages_train_on_their_own_losses_and_export_the_plain_model(tmp_path: Path) -> None:
    _rewrite(tmp_path / "out")
    data = classification_data((8,), 3, n=96, seed=1)
    trainer = edgeplug.Trainer(tmp_path / "out", host=host_with(SplitPass), progress=False)
    result = trainer.fit(data, data, epochs=6, batch_size=16)
    assert result.epochs[-1].eval is not None and result.initial_eval is not None
    assert result.epochs[-1].eval.loss < result.initial_eval.loss and (result.epochs[-1].eval.accuracy or 0) > 0.8
    exported = onnx.load(str(edgeplug.export(tmp_path / "out", tmp_path / "model.onnx")))
    assert {t.name for t in exported.graph.initializer} == {"fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias"}
    runtime = edgeplug._ort.inference_runtime()
    logits = runtime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": data["x"]})[0]
    assert float((logits.argmax(1) == data["y"]).mean()) == pytest.approx(trainer.evaluate(data).accuracy)
    # an explicit checkpoint folder exports the same
    checkpoint = edgeplug.checkpoints.latest_checkpoint(tmp_path / "out")
    again = onnx.load(str(edgeplug.export(tmp_path / "out", tmp_path / "again.onnx", checkpoint=checkpoint)))
    assert again.graph.initializer == exported.graph.initializer


def test_a_pass_after_the_staging_pass_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="comes after 'split'.*list 'split' last"):
        _rewrite(tmp_path / "out", {"name": "split"}, {"name": "trainable", "options": {"layers": "classifier"}})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode,message", [("unfed", "reads elsewhere, which neither the data nor an earlier stage"),
                                          ("wrong-last", "the last stage trains 'probe_logits', not the model's output 'logits'")])
def test_broken_stage_chains_are_pass_errors(tmp_path: Path, mode: str, message: str) -> None:
    with pytest.raises(PassError, match=message):
        _rewrite(tmp_path / "out", {"name": "split", "options": {"mode": mode}})
    assert not (tmp_path / "out").exists()


def test_profile_of_a_staged_folder_sums_stages_but_peaks_activations(tmp_path: Path) -> None:
    _rewrite(tmp_path / "out")
    whole = static_profile(tmp_path / "out", 32)
    parts = [static_profile(tmp_path / "out" / f"stages/{i}", 32) for i in range(2)]
    assert whole.forward_macs == sum(p.forward_macs for p in parts) > 0
    assert whole.gradient_bytes == sum(p.gradient_bytes for p in parts)
    assert whole.retained_activation_bytes == max(p.retained_activation_bytes for p in parts)
    assert all(n.name.startswith("stages/") for n in whole.nodes)
    measured = measure(tmp_path / "out", batch_size=8, steps=2, warmup=1)
    assert measured.train_peak_rss_bytes > 0 and len(measured.step_seconds) == 2


def test_cli_trains_exports_and_profiles_a_staged_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _rewrite(tmp_path / "out")
    data = classification_data((8,), 3, n=48)
    np.savez(tmp_path / "train.npz", x=data["x"], y=data["y"])
    assert cli.main(["train", str(tmp_path / "out"), "--data", str(tmp_path / "train.npz"), "--epochs", "2",
                     "--batch-size", "16", "--no-progress"]) == 0
    assert cli.main(["export", str(tmp_path / "out"), "-o", str(tmp_path / "m.onnx")]) == 0
    assert cli.main(["profile", str(tmp_path / "out"), "--static-only", "--json", str(tmp_path / "p.json")]) == 0
    profile = json.loads((tmp_path / "p.json").read_text())
    assert first_error(profile, load_schema("profile")) is None
    assert "done: 6 steps" in capsys.readouterr().out


def test_cli_rewrite_of_a_staged_folder_prints_sizes_summed_over_stages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from builders import cnn

    onnx.save(cnn(), tmp_path / "cnn.onnx")
    (tmp_path / "r.yaml").write_text("loss: cross-entropy\npasses:\n  - name: lls\n", encoding="utf-8")
    assert cli.main(["rewrite", str(tmp_path / "cnn.onnx"), "--recipe", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    sizes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sizes: ")]
    total = sum(count for key, count in report["artifacts"].items() if key.endswith("/" + TRAINING_MODEL))
    assert len(report["stages"]) >= 2 and total > 0 and len(sizes) == 1


class SharedFrozenPass(Pass):
    """Three stages; the head reads fc0.bias, which stage 0 trains, as a frozen constant of its own."""

    name = "shared-frozen"
    summary = "test: a later stage holds a frozen copy of a trained weight"
    options_schema = {"type": "object"}

    def rewrite_forward(self, state: ForwardState, context: PassContext) -> ForwardState:
        m = state.model
        value = lambda name: helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["N", 16])  # noqa: E731

        def probe(source: str, tag: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
            return ([helper.make_node("Gemm", [source, f"{tag}.weight", f"{tag}.bias"], [f"{tag}_logits"], name=tag)],
                    [numpy_helper.from_array(np.full((16, 3), 0.01, np.float32), f"{tag}.weight"),
                     numpy_helper.from_array(np.zeros(3, np.float32), f"{tag}.bias")])

        logits = lambda tag: helper.make_tensor_value_info(f"{tag}_logits", onnx.TensorProto.FLOAT, ["N", 3])  # noqa: E731
        s0 = _sub_model(m, ["fc0", "act0"], [m.graph.input[0]], *probe("a0", "p0"), [logits("p0"), value("a0")])
        s1 = _sub_model(m, ["fc1", "act1"], [value("a0")], *probe("a1", "p1"), [logits("p1"), value("a1")])
        s2 = _sub_model(m, ["fc2"], [value("a1")], [helper.make_node("Add", ["a1", "fc0.bias"], ["s"], name="add")], [],
                        list(m.graph.output))
        s2.graph.node[0].input[0] = "s"
        nodes = list(s2.graph.node)
        del s2.graph.node[:]
        s2.graph.node.extend([nodes[1], nodes[0]])
        return ForwardState(m, state.trainable, (
            Stage("b0", s0, frozenset({"fc0.weight", "fc0.bias", "p0.weight", "p0.bias"}), "p0_logits", ("a0",)),
            Stage("b1", s1, frozenset({"fc1.weight", "fc1.bias", "p1.weight", "p1.bias"}), "p1_logits", ("a1",)),
            Stage("head", s2, frozenset({"fc2.weight", "fc2.bias"}), "logits")))

    def report(self) -> PassReport:
        return PassReport(True, "shared frozen")


def test_export_keeps_the_trained_value_when_a_later_stage_holds_a_frozen_copy(tmp_path: Path) -> None:
    host = host_with(SharedFrozenPass)
    recipe = recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.02},
                               "passes": [{"name": "shared-frozen"}]}, host=host)
    model = mlp(8, (16, 16), 3)
    edgeplug.rewrite(model, recipe, tmp_path / "out", host=host)
    edgeplug.Trainer(tmp_path / "out", progress=False).fit(classification_data((8,), 3), epochs=1, batch_size=16)
    edgeplug.export(tmp_path / "out", tmp_path / "m.onnx")
    exported = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "m.onnx").graph.initializer}["fc0.bias"]
    initial = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}["fc0.bias"]
    assert not np.allclose(exported, initial)
