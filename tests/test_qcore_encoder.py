"""qcore on models with several inputs: a BERT-style encoder fed token ids and an attention mask.

What is quantized: the Linear layers (MatMul with an initializer weight, on [batch, sequence, features]) and the
classifier; embeddings, LayerNorm and attention's activation-by-activation MatMuls stay float. The coreset keeps
every input of each example; the device loop feeds all of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from builders import token_data, two_input_encoder
from hypothesis import given, settings
from hypothesis import strategies as st

import edgeplug
from edgeplug import _ort, cli
from edgeplug.errors import RecipeError
from edgeplug_plugins.qcore.build import build, quantize
from edgeplug_plugins.qcore.calibrate import Calibrator
from edgeplug_plugins.qcore.coreset import Coreset
from edgeplug_plugins.qcore.examples import Examples
from edgeplug_plugins.qcore.layers import find_layers
from edgeplug_plugins.qcore.qmodel import QuantizedRunner, export_model
from edgeplug_plugins.qcore.quantize import weight_limits

OPTIONS = {"bits": 8, "coreset_size": 10, "record_bits": [8, 4], "drifts": 1, "drift_chunk": 12, "backprop_epochs": 1,
           "flip_epochs": 1, "calibration_samples": 32}
INPUTS = ("input_ids", "attention_mask")


pytestmark = pytest.mark.usefixtures("qcore_registered")


def _recipe(root: Path, **options: object) -> Path:
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.01},
                                    "passes": [{"name": "qcore", "options": {**OPTIONS, **options}}]}), encoding="utf-8")
    return path


def _examples(data: dict[str, np.ndarray]) -> Examples:
    return Examples({name: data[name] for name in INPUTS})


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qcore-encoder")
    edgeplug.rewrite(two_input_encoder(), _recipe(root), root / "out")
    np.savez(root / "train.npz", **token_data(120, seed=0))
    summary = build(root / "out", root / "train.npz", epochs=2, batch_size=16, echo=lambda text: None)
    assert summary["coreset_size"] == 10 and list(summary["flipnets"]) == ["classifier"]
    for k in (1, 2):
        np.savez(root / f"chunk_{k}.npz", **token_data(16, seed=10 + k, shift=k))
    return root / "out"


def test_the_pass_takes_two_inputs_and_says_what_stays_float(built: Path) -> None:
    report = json.loads((built / "report.json").read_text())
    details = next(p for p in report["passes"] if p["name"] == "qcore")["details"]
    assert details["data_inputs"] == list(INPUTS)
    assert details["layers"][-1] == "classifier" and len(details["layers"]) == 7  # q, k, v, output, up, down + classifier
    assert details["float_input_layers"] == []  # no Linear reads a graph input: the token ids feed an embedding
    assert details["float_nodes"]["Gather"] == 1 and details["float_nodes"]["LayerNormalization"] == 3
    assert details["float_nodes"]["MatMul"] == 2  # attention scores and context: activations times activations


def test_quantized_encoder_matches_its_exported_model_in_plain_onnxruntime(built: Path) -> None:
    model = onnx.load(str(built / "qcore" / "float.onnx"))
    data = token_data(20, seed=3)
    state = quantize(model, _examples(data), 8, 99.99)
    exported = export_model(model, state)
    session = _ort.inference_runtime().InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {name: data[name] for name in INPUTS})[0]
    got = QuantizedRunner(model, state).logits(_examples(data))
    assert np.array_equal(got, expected)
    float_logits = _ort.inference_runtime().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {name: data[name] for name in INPUTS})[0]
    assert np.abs(got - float_logits).max() < 0.1 * (np.abs(float_logits).max() + 1)  # 8 bits: close to the float model


def test_the_coreset_keeps_every_input_of_each_example(built: Path) -> None:
    coreset = Coreset.load(built / "qcore" / "coreset.npz")
    assert isinstance(coreset.x, Examples) and coreset.x.names == list(INPUTS)
    assert coreset.x.arrays["input_ids"].dtype == np.int64 and coreset.x.arrays["input_ids"].shape == (10, 10)
    ids, mask = coreset.x.arrays["input_ids"], coreset.x.arrays["attention_mask"]
    assert np.all((ids > 0) == (mask > 0))  # ids and masks of the same examples, still aligned


def test_calibrate_keeps_its_promise_on_the_encoder(built: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "out"
    shutil.copytree(built, folder)
    before = {k: v.copy() for k, v in np.load(folder / "qcore" / "state.npz").items() if k.startswith("codes/")}
    status = cli.main(["calibrate", str(folder), "--stream", str(built.parent / "chunk_1.npz"), str(built.parent / "chunk_2.npz"),
                       "--json", "--no-progress"])
    assert status == 0
    state = np.load(folder / "qcore" / "state.npz")
    low, high = weight_limits(8)
    for key, codes in before.items():
        assert state[key].min() >= low and state[key].max() <= high
        if key != "codes/classifier":  # only the classifier's flip network acts (flip_layers: last)
            assert np.array_equal(state[key], codes)
    coreset = Coreset.load(folder / "qcore" / "coreset.npz")
    assert len(coreset) == 10 and coreset.x.names == list(INPUTS)
    # the folder's quantized model is the recalibrated one and runs with both inputs in plain onnxruntime
    data = token_data(8, seed=5)
    session = _ort.inference_runtime().InferenceSession(str(folder / "qcore" / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {name: data[name] for name in INPUTS})[0].shape == (8, 3)


def test_a_step_reads_the_chunk_and_coreset_through_both_inputs(built: Path) -> None:
    from edgeplug_plugins.qcore.build import read_options

    calibrator = Calibrator(built / "qcore", read_options(built), threads=1)
    chunk = token_data(16, seed=21, shift=2)
    result = calibrator.step(_examples(chunk), chunk["y"], 1)
    assert result.examples == 16 and 0.0 <= result.accuracy_after <= 1.0
    assert len(calibrator.coreset) == 10 and isinstance(calibrator.coreset.x, Examples)


@settings(max_examples=6, deadline=None)
@given(layers=st.integers(1, 2), seed=st.integers(0, 1000), sequence=st.integers(3, 9))
def test_rerunning_after_any_layer_equals_a_whole_forward_pass_on_generated_encoders(layers: int, seed: int, sequence: int) -> None:
    """The suffix sessions read the attention mask as well as the cut: equal to a whole forward pass, bit for bit,
    for every quantized layer of generated encoders of one or two blocks and any padded length."""
    model = two_input_encoder(layers=layers, seed=seed)
    data = token_data(12, sequence=sequence, seed=seed)
    x = _examples(data)
    state = quantize(model, x, 8, 99.99)
    runner = QuantizedRunner(model, state)
    layers_found = find_layers(model)
    acts = runner.activations(x, [layer.input for layer in layers_found])
    for layer in layers_found:
        rng = np.random.default_rng(seed)
        low, high = weight_limits(8)
        state.codes[layer.node] = np.clip(state.codes[layer.node].astype(np.int16) + rng.integers(-1, 2, state.codes[layer.node].shape),
                                          low, high).astype(np.int8)
        rerun = runner.rerun_from(layer, acts, x)
        whole = runner.activations(x, list(acts.values))
        assert np.array_equal(rerun.logits, whole.logits), layer.node
        acts = whole


def test_flip_layers_all_is_refused_on_an_encoder_with_the_reason(tmp_path: Path) -> None:
    edgeplug.rewrite(two_input_encoder(), _recipe(tmp_path, flip_layers="all"), tmp_path / "out")
    np.savez(tmp_path / "train.npz", **token_data(40, seed=0))
    with pytest.raises(RecipeError, match="sequence, features.*flip_layers: last"):
        build(tmp_path / "out", tmp_path / "train.npz", epochs=1, batch_size=16, echo=lambda text: None)


def test_quantize_cli_takes_drift_data_with_both_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edgeplug.rewrite(two_input_encoder(), _recipe(tmp_path), tmp_path / "out")
    np.savez(tmp_path / "train.npz", **token_data(60, seed=0))
    drift = [token_data(20, seed=30 + d, shift=d + 1) for d in range(2)]
    np.savez(tmp_path / "drift.npz", **{k: np.concatenate([d[k] for d in drift]) for k in (*INPUTS, "y")},
             domain=np.repeat(np.arange(2), 20))
    assert cli.main(["quantize", str(tmp_path / "out"), "--data", str(tmp_path / "train.npz"), "--epochs", "1",
                     "--drift-data", str(tmp_path / "drift.npz"), "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["flipnets"]["classifier"]["rows"] > 0
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 3), np.float32), y=np.zeros(4, np.int64), domain=np.zeros(4, np.int64))
    assert cli.main(["quantize", str(tmp_path / "out"), "--data", str(tmp_path / "train.npz"), "--epochs", "1",
                     "--drift-data", str(tmp_path / "bad.npz"), "--no-progress"]) == 2
    assert "missing arrays ['input_ids', 'attention_mask']" in capsys.readouterr().err


def test_a_backprop_calibration_of_the_classifier_alone_leaves_the_encoder_codes(built: Path) -> None:
    """What an encoder's flip targets come from: only the layers that get flip networks train."""
    from edgeplug_plugins.qcore.backprop import backprop_calibrate

    model = onnx.load(str(built / "qcore" / "float.onnx"))
    data = token_data(24, seed=4, shift=1)
    state = quantize(model, _examples(data), 8, 99.99)
    tuned = backprop_calibrate(model, state, _examples(data), data["y"], epochs=3, lr=0.05, layers={"classifier"})
    assert all(np.array_equal(tuned.codes[k], state.codes[k]) for k in state.codes if k != "classifier")
    assert not np.array_equal(tuned.codes["classifier"], state.codes["classifier"])
