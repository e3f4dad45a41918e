"""The personalize pass and commands: slot round trip, refused slot files, a device path
without the training API, anchor packing within its quantization step, generated graphs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import numpy_helper

import edgeplug
import edgeplug_plugins.personalize as plugin
from edgeplug import cli
from edgeplug.errors import RecipeError
from edgeplug.plugins import default_host, reset_default_host
from edgeplug.recipe import recipe_from_dict
from edgeplug_plugins.personalize import anchors, baselines
from edgeplug_plugins.personalize.device import DeviceModel, personalised_model
from edgeplug_plugins.personalize.slotfile import SlotFileError, read_slots, write_slots
from tests.builders import cnn, mlp

ROOT = Path(__file__).resolve().parent.parent


def _host() -> edgeplug.PluginHost:
    host = edgeplug.PluginHost(only={"normalize", "freeze-bn"})
    host.register(plugin, name="personalize", version="test")
    return host


def _rewrite(model: onnx.ModelProto, out: Path, options: dict | None = None) -> Path:
    host = _host()
    passes = [{"name": "personalize", "options": options or {}}, {"name": "freeze-bn", "options": {"layers": "all"}}]
    recipe = recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.01}, "passes": passes}, host=host)
    edgeplug.rewrite(model, recipe, out, host=host)
    return out


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _rewrite(cnn(channels=(4, 8), classes=5, seed=1), tmp_path_factory.mktemp("personalize") / "out")


def _register_on_default_host() -> None:
    """The CLI's host with this plugin, whether or not its entry point is installed."""
    host = default_host()
    if "personalize" not in host.plugin_names():
        host.register(plugin, name="personalize", version="test")


@pytest.fixture
def cli_plugin(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("EDGEPLUG_PLUGINS", "normalize")
    reset_default_host()
    _register_on_default_host()
    yield
    reset_default_host()


def test_pass_writes_slots_and_trains_exactly_them(artifacts: Path) -> None:
    report = json.loads((artifacts / "report.json").read_text())
    device = DeviceModel(artifacts)
    parameters = [s.name for s in device.manifest.parameter_slots()]
    assert parameters == ["fc.weight", "fc.bias", "bn0.scale", "bn0.bias", "bn1.scale", "bn1.bias"]
    assert sorted(s.name for s in device.manifest.slots if s.role == "statistics") == ["bn0.mean", "bn0.var", "bn1.mean", "bn1.var"]
    assert set(report["parameters"]["trainable"]) == set(parameters)
    x = _images(10)
    reference = edgeplug._ort.inference_runtime().InferenceSession(
        cnn(channels=(4, 8), classes=5, seed=1).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(device.logits(x), reference, rtol=1e-5, atol=1e-6)
    assert device.features(x).shape == (10, device.manifest.feature_width) == (10, 2 * 4 + 2 * 8 + 8)


def test_slot_round_trip_lands_exactly_where_named(artifacts: Path, tmp_path: Path) -> None:
    device = DeviceModel(artifacts)
    rng = np.random.default_rng(3)
    values = {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in device.manifest.parameter_slots()}
    write_slots(tmp_path / "slots.npz", values, device.manifest, "test")
    read, meta = read_slots(tmp_path / "slots.npz", device.manifest)
    assert meta["method"] == "test" and set(read) == set(values)
    baked = personalised_model(device, read)
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(device.path)).graph.initializer}
    for tensor in baked.graph.initializer:
        expected = values.get(tensor.name, original[tensor.name])
        assert np.array_equal(numpy_helper.to_array(tensor), expected), tensor.name
    assert [i.name for i in baked.graph.input] == ["x"] and [o.name for o in baked.graph.output] == ["logits"]
    x = _images(7, 1)
    session = edgeplug._ort.inference_runtime().InferenceSession(baked.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], device.logits(x, read), rtol=1e-6, atol=1e-6)


def test_wrong_shape_dtype_or_foreign_slot_files_are_refused(artifacts: Path, tmp_path: Path) -> None:
    device = DeviceModel(artifacts)
    manifest = device.manifest
    good = {"fc.bias": np.zeros(5, np.float32)}
    write_slots(tmp_path / "good.npz", good, manifest, "test")
    with pytest.raises(SlotFileError, match=r"slot 'fc.bias' has shape \(6,\) but the model's slot is \(5,\)"):
        write_slots(tmp_path / "bad.npz", {"fc.bias": np.zeros(6, np.float32)}, manifest, "test")
    with pytest.raises(SlotFileError, match="has dtype float64"):
        write_slots(tmp_path / "bad.npz", {"fc.bias": np.zeros(5)}, manifest, "test")
    with pytest.raises(SlotFileError, match="'conv0.weight' is not a slot"):
        write_slots(tmp_path / "bad.npz", {"conv0.weight": np.zeros((4, 1, 3, 3), np.float32)}, manifest, "test")
    other = _rewrite(cnn(channels=(4, 8), classes=5, seed=2), tmp_path / "other")  # same shapes, other weights
    foreign = DeviceModel(other).manifest
    assert foreign.fingerprint != manifest.fingerprint
    write_slots(tmp_path / "foreign.npz", good, foreign, "test")
    with pytest.raises(SlotFileError, match="was made for another model"):
        read_slots(tmp_path / "foreign.npz", manifest)
    np.savez(tmp_path / "plain.npz", **good)
    with pytest.raises(SlotFileError, match="no __meta__ entry"):
        read_slots(tmp_path / "plain.npz", manifest)


def test_cli_refuses_a_bad_slot_file_in_one_line(artifacts: Path, tmp_path: Path, cli_plugin, capsys) -> None:
    device = DeviceModel(artifacts)
    path = tmp_path / "slots.npz"
    write_slots(path, {"fc.bias": np.zeros(5, np.float32)}, device.manifest, "test")
    with np.load(path) as archive:  # tamper: same metadata, bigger array
        content = {k: archive[k] for k in archive.files}
    content["fc.bias"] = np.zeros(6, np.float32)
    np.savez(path, **content)
    np.savez(tmp_path / "data.npz", x=_images(4))
    assert cli.main(["personalize", "apply", str(artifacts), "--slots", str(path), "--data", str(tmp_path / "data.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "slot 'fc.bias' has shape (6,) but the model's slot is (5,)" in err


def test_cli_end_to_end_cloud_and_device_halves(artifacts: Path, tmp_path: Path, cli_plugin, capsys) -> None:
    rng = np.random.default_rng(0)
    x = _images(120)
    domain = np.repeat(np.arange(6), 20)
    x = x * (1 + domain[:, None, None, None] * 0.2)
    y = rng.integers(0, 5, 120)
    np.savez(tmp_path / "domains.npz", x=x, y=y, domain=domain)
    np.savez(tmp_path / "device.npz", x=_images(40, 5) * 1.7)
    np.savez(tmp_path / "test.npz", x=_images(20, 6) * 1.7, y=rng.integers(0, 5, 20))
    gen, anchors_file, stats, slots = (tmp_path / n for n in ("gen", "anchors.npz", "stats.npz", "slots.npz"))
    assert cli.main(["personalize", "train-generator", str(artifacts), "--domains", str(tmp_path / "domains.npz"), "-o", str(gen),
                     "--steps", "6", "--draws", "2", "--device-samples", "16", "--count", "4", "--hidden", "8", "--validation-domains", "0"]) == 0
    assert cli.main(["personalize", "anchors", str(artifacts), "--data", str(tmp_path / "device.npz"), "-o", str(anchors_file),
                     "--generator", str(gen), "--statistics", str(stats)]) == 0
    assert cli.main(["personalize", "generate", str(gen), "--anchors", str(anchors_file), "-o", str(slots)]) == 0
    assert cli.main(["personalize", "apply", str(artifacts), "--slots", str(stats), "--slots", str(slots),
                     "--data", str(tmp_path / "test.npz"), "-o", str(tmp_path / "personal.onnx")]) == 0
    out = capsys.readouterr().out
    assert "4 anchors x 32 features" in out and "accuracy on" in out
    device = DeviceModel(artifacts)
    generated, _ = read_slots(slots, device.manifest)
    baked = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "personal.onnx")).graph.initializer}
    assert set(generated) == {s.name for s in device.manifest.parameter_slots()}
    defaults = device.defaults()
    assert any(not np.array_equal(value, defaults[name]) for name, value in generated.items())  # trained: not a no-op
    for name, value in generated.items():
        assert np.array_equal(baked[name], value)
    statistics, _ = read_slots(stats, device.manifest)
    for name, value in statistics.items():
        assert np.array_equal(baked[name], value)
    # the generator refuses anchors made without the statistics it was trained with
    assert cli.main(["personalize", "anchors", str(artifacts), "--data", str(tmp_path / "device.npz"), "-o", str(anchors_file)]) == 0
    capsys.readouterr()
    assert cli.main(["personalize", "generate", str(gen), "--anchors", str(anchors_file), "-o", str(slots)]) == 2
    assert "expects anchors computed with device statistics" in capsys.readouterr().err

    # every step prints one JSON document with --json (tests/test_cli_conventions.py leaves them to this test)
    steps = {
        "train-generator": [str(artifacts), "--domains", str(tmp_path / "domains.npz"), "-o", str(tmp_path / "gen2"), "--steps", "2",
                            "--draws", "1", "--device-samples", "16", "--count", "4", "--hidden", "8", "--validation-domains", "0",
                            "--model-statistics"],
        "anchors": [str(artifacts), "--data", str(tmp_path / "device.npz"), "-o", str(tmp_path / "a2.npz"), "--generator", str(tmp_path / "gen2")],
        "generate": [str(tmp_path / "gen2"), "--anchors", str(tmp_path / "a2.npz"), "-o", str(tmp_path / "s2.npz")],
        "baseline": [str(artifacts), "--data", str(tmp_path / "device.npz"), "--method", "stats", "-o", str(tmp_path / "b2.npz")],
        "apply": [str(artifacts), "--slots", str(tmp_path / "s2.npz"), "--data", str(tmp_path / "test.npz")],
    }
    for step, arguments in steps.items():
        assert cli.main(["personalize", step, *arguments, "--json"]) == 0, step
        document = json.loads(capsys.readouterr().out)
        assert document.get("output") or "accuracy" in document, (step, document)


DEVICE_SCRIPT = textwrap.dedent("""
    import sys
    for name in ("onnxruntime.training.api", "onnxruntime.training.artifacts", "onnxruntime.training.onnxblock", "torch"):
        sys.modules[name] = None  # importing any of them now raises ImportError
    import edgeplug_plugins.personalize as plugin
    from edgeplug import cli
    from edgeplug.plugins import default_host
    if "personalize" not in default_host().plugin_names():
        default_host().register(plugin, name="personalize", version="test")
    art, folder = sys.argv[1], sys.argv[2]
    steps = [
        ["personalize", "anchors", art, "--data", folder + "/device.npz", "-o", folder + "/a.npz", "--statistics", folder + "/s.npz"],
        ["personalize", "baseline", art, "--data", folder + "/device.npz", "--method", "prototype", "-o", folder + "/p.npz"],
        ["personalize", "apply", art, "--slots", folder + "/s.npz", "--slots", folder + "/p.npz", "--data", folder + "/device.npz",
         "-o", folder + "/m.onnx"],
    ]
    for argv in steps:
        assert cli.main(argv) == 0, argv
    loaded = [n for n in ("onnxruntime.training.api", "onnxruntime.training.artifacts", "onnxruntime.training.onnxblock")
              if sys.modules.get(n) is not None]
    print("training modules loaded:", loaded)
""")


def test_device_path_runs_without_the_training_api(artifacts: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "device.npz", x=_images(30, 9))
    result = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, str(artifacts), str(tmp_path)], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "EDGEPLUG_PLUGINS": "normalize"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "training modules loaded: []" in result.stdout
    assert (tmp_path / "m.onnx").is_file()


@settings(max_examples=60, deadline=None)
@given(values=arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 20)),
                     elements=st.floats(-1e4, 1e4, width=32)),
       weights=st.integers(1, 1000))
def test_anchor_packing_is_lossless_within_its_step(values: np.ndarray, weights: int) -> None:
    packed = anchors.pack(values, np.full(len(values), weights))
    assert packed.codes.dtype == np.uint8 and packed.codes.shape == values.shape
    error = np.abs(packed.values().astype(np.float64) - values.astype(np.float64))
    bound = packed.step.astype(np.float64) / 2
    assert np.all(error <= bound + 1e-6 * np.maximum(1.0, np.abs(values)))


def test_anchor_file_round_trip_and_selection(artifacts: Path, tmp_path: Path) -> None:
    device = DeviceModel(artifacts)
    features = device.features(_images(50, 4))
    for method in ("kmeans", "kcenter"):
        chosen, weights = anchors.select(features, 6, method)
        assert len(set(chosen.tolist())) == 6 and weights.sum() == 50
    packed = anchors.pack(features[chosen], weights)
    size = anchors.write_anchors(tmp_path / "a.npz", packed, device.manifest.fingerprint, "kcenter", 50, 50 * 256, statistics=False)
    back, meta = anchors.read_anchors(tmp_path / "a.npz", device.manifest.fingerprint)
    assert np.array_equal(back.codes, packed.codes) and meta["samples"] == 50
    assert size == (tmp_path / "a.npz").stat().st_size
    with pytest.raises(edgeplug.ModelError, match="computed on another model"):
        anchors.read_anchors(tmp_path / "a.npz", "0" * 64)


def test_stats_baseline_matches_batch_statistics(artifacts: Path) -> None:
    device = DeviceModel(artifacts)
    x = _images(40, 2) * 3 + 1
    values = baselines.statistics(device, x)
    (first,) = device.run(x, ["c0"])
    np.testing.assert_allclose(values["bn0.mean"], first.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(values["bn0.var"], first.var(axis=(0, 2, 3)), rtol=1e-4, atol=1e-6)
    (second,) = device.run(x, ["c1"], values)  # the second layer sees the first one re-normalised
    np.testing.assert_allclose(values["bn1.mean"], second.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    proto = baselines.prototype(device, x)
    assert proto["fc.weight"].shape == (8, 5) and not np.any(proto["fc.bias"])


def test_inserted_adapters_start_as_identity_and_are_slots(tmp_path: Path) -> None:
    model = cnn(channels=(4, 8), classes=3, batch_norm=False, seed=4)  # a folded-BN deployment export has no BN
    out = _rewrite(model, tmp_path / "out", {"slots": ["classifier"], "adapters": ["c0", "c1"]})
    device = DeviceModel(out)
    groups = {s.name: (s.group, s.shape) for s in device.manifest.parameter_slots()}
    assert groups["c0.adapter.scale"] == ("adapter", (4, 1, 1)) and groups["c1.adapter.shift"] == ("adapter", (8, 1, 1))
    assert [f.tensor for f in device.manifest.features] == ["c0", "c1", "flat"]
    x = _images(6, 3)
    reference = edgeplug._ort.inference_runtime().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(device.logits(x), reference.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)
    doubled = {"c0.adapter.scale": np.full((4, 1, 1), 2.0, np.float32)}  # = conv0 with twice its weight and bias
    for tensor in model.graph.initializer:
        if tensor.name.startswith("conv0."):
            tensor.CopyFrom(numpy_helper.from_array(2 * numpy_helper.to_array(tensor), tensor.name))
    reference = edgeplug._ort.inference_runtime().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(device.logits(x, doubled), reference.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)
    assert set(json.loads((out / "report.json").read_text())["parameters"]["trainable"]) == set(groups)
    with pytest.raises(RecipeError, match="adapter tensor 'logits' is a model output"):
        _rewrite(model, tmp_path / "bad", {"slots": ["classifier"], "adapters": ["logits"]})


def test_bad_options_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no BatchNormalization"):
        _rewrite(mlp(), tmp_path / "a", {"slots": ["normalization"]})
    with pytest.raises(RecipeError, match="slot pattern 'nothing.*' matches no parameter"):
        _rewrite(mlp(), tmp_path / "b", {"slots": ["nothing.*"]})
    with pytest.raises(RecipeError, match="feature tensor 'nope'"):
        _rewrite(mlp(), tmp_path / "c", {"slots": ["classifier"], "features": ["nope"]})
    assert not (tmp_path / "a").exists()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(channels=st.lists(st.integers(1, 6), min_size=1, max_size=3), classes=st.integers(2, 6),
       batch_norm=st.booleans(), seed=st.integers(0, 100))
def test_generated_models_keep_their_function(tmp_path_factory: pytest.TempPathFactory, channels: list[int], classes: int,
                                              batch_norm: bool, seed: int) -> None:
    model = cnn(channels=tuple(channels), classes=classes, batch_norm=batch_norm, seed=seed)
    out = _rewrite(model, tmp_path_factory.mktemp("gen") / "out", None if batch_norm else {"slots": ["classifier"], "adapters": ["c0"]})
    device = DeviceModel(out)
    x = _images(5, seed)
    reference = edgeplug._ort.inference_runtime().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(device.logits(x), reference.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)
    trainer = edgeplug.Trainer(out, host=_host(), progress=False, checkpoints=False)
    trainer.fit({"x": x, "y": np.arange(5) % classes}, epochs=1, batch_size=5)
    assert set(json.loads((out / "report.json").read_text())["parameters"]["trainable"]) == {
        s.name for s in device.manifest.parameter_slots()}


def test_a_model_with_several_inputs_is_refused_with_the_reason(tmp_path: Path) -> None:
    """A text encoder (token ids + attention mask): refused before anything is written, saying why and what to use."""
    from tests.builders import two_input_encoder

    recipe = recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.01},
                               "passes": [{"name": "personalize", "options": {"slots": ["classifier"]}}]})
    with pytest.raises(edgeplug.ModelError, match=r"one data input; this one has \['input_ids', 'attention_mask'\].*use qcore, lora"):
        edgeplug.rewrite(two_input_encoder(), recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
