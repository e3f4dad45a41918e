"""The profiler's counts match hand-computed values on small graphs."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from builders import cnn, mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgeplug.cli import main
from edgeplug.pipeline import rewrite
from edgeplug.profiling import profile, static_profile
from edgeplug.recipe import recipe_from_dict
from edgeplug.validation import load_schema

FLOAT = 4


def conv_then_linear(cin: int = 2, cout: int = 3, size: int = 5, classes: int = 4) -> onnx.ModelProto:
    """x[N, cin, size, size] -> Conv 3x3 pad 1 -> Flatten -> Gemm -> logits[N, classes]."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((cout, cin, 3, 3)).astype(np.float32), "conv.weight"),
        numpy_helper.from_array(rng.standard_normal((cout * size * size, classes)).astype(np.float32), "fc.weight"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["y"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["y"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.weight"], ["logits"], name="fc"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def build(model: onnx.ModelProto, out: Path, recipe: dict[str, object] | None = None) -> Path:
    rewrite(model, recipe_from_dict(recipe or {}), out)
    return out


@pytest.mark.parametrize("batch", [1, 8])
def test_conv_and_linear_counts_are_exact(tmp_path: Path, batch: int) -> None:
    n, cin, cout, size, classes = batch, 2, 3, 5, 4
    full = static_profile(build(conv_then_linear(), tmp_path / "full", {"optimizer": {"name": "adamw"}}), batch)
    conv_macs = n * cout * size * size * cin * 3 * 3
    fc_macs = n * classes * cout * size * size
    assert full.forward_macs == conv_macs + fc_macs
    # conv: weight gradient only (x is data); fc: weight and input gradients
    assert full.backward_macs == conv_macs + 2 * fc_macs
    retained = {t.name: t.bytes for t in full.retained}
    assert retained["x"] == n * cin * size * size * FLOAT  # ConvGrad reads its input for dW
    assert retained["f"] == n * cout * size * size * FLOAT  # Gemm weight gradient reads its input
    assert "y" not in retained  # Flatten's gradient needs only y's shape
    weights = (cout * cin * 9 + cout * size * size * classes) * FLOAT
    assert full.parameter_bytes == full.trainable_parameter_bytes == full.gradient_bytes == weights
    assert full.optimizer_state_bytes == 2 * weights


def test_last_layer_only_saves_exactly_the_conv_input(tmp_path: Path) -> None:
    batch, cin, size = 16, 2, 5
    full = static_profile(build(conv_then_linear(), tmp_path / "full"), batch)
    last = static_profile(build(conv_then_linear(), tmp_path / "last", {"passes": [{"name": "trainable", "options": {"layers": "classifier"}}]}), batch)
    assert full.retained_activation_bytes - last.retained_activation_bytes == batch * cin * size * size * FLOAT
    assert last.backward_macs == batch * 4 * 3 * size * size  # fc weight gradient only
    assert last.optimizer_state_bytes == 2 * 3 * size * size * 4 * FLOAT


def test_sgd_keeps_no_optimizer_state(tmp_path: Path) -> None:
    profile_ = static_profile(build(mlp(), tmp_path / "sgd", {"optimizer": {"name": "sgd"}}), 4)
    assert profile_.optimizer_state_bytes == 0 and profile_.gradient_bytes > 0


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 3), st.sampled_from([1, 2, 7]))
def test_retained_bytes_scale_linearly_with_batch(layers: int, batch: int) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        out = build(cnn(channels=(4,) * layers, batch_norm=False), Path(scratch) / "out")
        one, many = static_profile(out, 1), static_profile(out, batch)
    assert many.retained_activation_bytes == batch * one.retained_activation_bytes
    assert many.forward_macs == batch * one.forward_macs and many.backward_macs == batch * one.backward_macs
    assert many.parameter_bytes == one.parameter_bytes and not many.unknown_shapes


def test_measured_profile_and_json_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = build(mlp(), tmp_path / "out")
    assert main(["profile", str(out), "--batch-size", "4", "--steps", "3", "--warmup", "1", "--json", str(tmp_path / "p.json")]) == 0
    printed = capsys.readouterr().out
    assert "retained activations" in printed and "training step" in printed
    document = json.loads((tmp_path / "p.json").read_text())
    jsonschema.validate(document, load_schema("profile"))
    measured = document["measured"]
    assert len(measured["step_seconds"]) == 3 and measured["median_step_seconds"] > 0
    assert measured["train_peak_rss_bytes"] > measured["baseline_rss_bytes"] > 0


def test_static_only_runs_nothing(tmp_path: Path) -> None:
    result = profile(build(mlp(), tmp_path / "out"), 2, measured=False)
    assert result.measured is None and result.to_dict()["measured"] is None


def test_profile_of_a_folder_that_is_not_artifacts_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", str(tmp_path)]) == 2
    assert "not an edgeplug artifact folder" in capsys.readouterr().err


def test_forward_nodes_renamed_by_the_runtime_stay_forward(tmp_path: Path) -> None:
    """onnxruntime-training turns Concat into `<name>/ConcatReplacement/`; its inputs are not retained."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("wa", (3, 2, 3, 3)), ("wb", (3, 2, 3, 3)), ("fc", (150, 4)))]
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="ca", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="cb", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["a", "b"], ["c"], name="cat", axis=1),
        helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    counted = static_profile(build(model, tmp_path / "out"), 2)
    names = {t.name for t in counted.retained}
    assert {name for name in names if "log_prob" not in name} == {"x", "f", "labels"}  # not a or b
    assert counted.forward_macs == 2 * (2 * 3 * 25 * 18) + 2 * 4 * 150


def test_batch_norm_in_training_mode_is_counted_as_forward(tmp_path: Path) -> None:
    """The runtime renames BatchNormalization to BatchNormInternal; it stays forward and its saved statistics have shapes."""
    counted = static_profile(build(cnn(channels=(4,), batch_norm=True), tmp_path / "out"), 3)
    names = {t.name for t in counted.retained}
    assert not counted.unknown_shapes
    assert "c0" in names  # the conv output, read by the batch-norm gradient
    assert "a0" in names  # the ReLU output, read by its own gradient
    saved = [t for t in counted.retained if t.producer.startswith("bn0")]
    assert sorted(t.shape for t in saved) == [(4,), (4,)]  # batch mean and inverse std, per channel


def test_measurement_works_from_a_folder_holding_an_edgeplug_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The worker once ran as `python -m`, which put the current folder first on sys.path: an `edgeplug/` there (a
    project folder: a namespace package, "cannot import name '__version__' from 'edgeplug' (unknown location)"; or
    another checkout's package) was imported instead of the installed edgeplug."""
    build(mlp(), tmp_path / "out")
    (tmp_path / "edgeplug").mkdir()  # e.g. the root of another edgeplug checkout
    (tmp_path / "edgeplug" / "__init__.py").write_text("raise ImportError('the shadowing edgeplug/ folder was imported')\n")
    monkeypatch.chdir(tmp_path)
    assert main(["profile", "out", "--batch-size", "2", "--steps", "1", "--warmup", "0"]) == 0
    assert "measured" in capsys.readouterr().out


def test_every_layer_gets_measured_forward_and_backward_times(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """onnxruntime's own profiler (SessionOptions.enable_profiling) times each kernel; a node's gradient kernels
    (`<node>_Grad/...`) add up to its backward time, and the table shows them beside the counts."""
    out = build(conv_then_linear(), tmp_path / "out")
    assert main(["profile", str(out), "--batch-size", "4", "--steps", "3", "--warmup", "1", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    jsonschema.validate(document, load_schema("profile"))
    timed = {entry["name"]: entry for entry in document["measured"]["nodes"]}
    assert {"conv", "fc"} <= set(timed) and document["measured"]["kernels_note"] is None
    assert all(timed[name]["forward_seconds"] > 0 and timed[name]["backward_seconds"] > 0 for name in ("conv", "fc"))
    assert {node["name"] for node in document["static"]["nodes"]} >= set(timed)
    assert main(["profile", str(out), "--batch-size", "4", "--steps", "3", "--warmup", "1"]) == 0
    table = capsys.readouterr().out
    assert "fwd ms" in table and "bwd ms" in table and "by measured time" in table


def test_per_node_seconds_takes_medians_after_warmup_and_sums_gradient_kernels() -> None:
    from edgeplug.profiling.measure import per_node_seconds

    events = [{"name": name, "dur": dur} for step in range(3) for name, dur in
              (("fused conv", 100 if step else 9000), ("conv_Grad/Conv_0", 50), ("conv_Grad/ReduceSum_1", 25), ("fc", 10),
               ("GradientAccumulator1", 5))]
    nodes, other = per_node_seconds(events, warmup=1, node_names={"conv": "Conv", "fc": "Gemm", "flatten": "Flatten"})
    assert nodes == [{"name": "conv", "op_type": "Conv", "forward_seconds": pytest.approx(100e-6), "backward_seconds": pytest.approx(75e-6)},
                     {"name": "fc", "op_type": "Gemm", "forward_seconds": pytest.approx(10e-6), "backward_seconds": 0.0}]
    assert other == [{"name": "GradientAccumulator1", "seconds": 5e-6}]


def test_plot_shows_layers_and_is_refused_before_any_work_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = build(conv_then_linear(), tmp_path / "out")
    assert main(["profile", str(out), "--batch-size", "2", "--steps", "1", "--warmup", "0", "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr("edgeplug.profiling.profile", lambda *a, **k: pytest.fail("the profile ran before the check"))
    assert main(["profile", str(out), "--plot", str(tmp_path / "q.png")]) == 2
    assert "pip install 'edgeplug[plot]'" in capsys.readouterr().err and not (tmp_path / "q.png").exists()


PASS_SCHEMAS = sorted("passes/" + path.name.removesuffix(".schema.json")
                      for path in (Path(__file__).parents[1] / "schemas" / "passes").glob("*.schema.json"))
PERSONALIZE_FILES = ["personalize-anchors", "personalize-generator", "personalize-manifest", "personalize-slots"]


@pytest.mark.parametrize("name", ["profile", "report", "fleet-simulation", "recipe", *PERSONALIZE_FILES, *PASS_SCHEMAS])
def test_every_property_of_a_printed_or_written_document_is_described(name: str) -> None:
    """`edgeplug schema NAME` documents what `profile --json`, report.json, `fleet simulate --json`,
    recipes and personalize's files hold, field by field."""
    missing: list[str] = []

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "properties" and isinstance(value, dict):
                    for name, sub in value.items():
                        if isinstance(sub, dict) and "description" not in sub:
                            missing.append(f"{path}.{name}")
                        walk(sub, f"{path}.{name}")
                else:
                    walk(value, path)
        elif isinstance(node, list):
            for value in node:
                walk(value, path)

    walk(load_schema(name), "")
    assert missing == []
