"""qcore end to end: rewrite -> quantize (train with records, coreset, flip networks) -> calibrate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from builders import cnn

import edgeplug
from edgeplug import _ort, cli
from edgeplug.errors import RecipeError
from edgeplug_plugins.qcore.build import build, read_options
from edgeplug_plugins.qcore.calibrate import Calibrator
from edgeplug_plugins.qcore.quantize import weight_limits

OPTIONS = {"bits": 4, "coreset_size": 12, "record_bits": [8, 2], "drifts": 1, "drift_chunk": 16, "backprop_epochs": 1,
           "flip_epochs": 1, "calibration_samples": 64}


def _digits(n: int, seed: int, shift: float = 0.0) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(digits.target), n, replace=False)
    x = (digits.images[picked] / 16.0)[:, None].astype(np.float32) * (1 - shift) + shift
    return {"x": x.astype(np.float32), "y": digits.target[picked].astype(np.int64)}


pytestmark = pytest.mark.usefixtures("qcore_registered")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qcore")
    (root / "recipe.yaml").write_text(yaml.safe_dump({
        "loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.01}, "passes": [{"name": "qcore", "options": OPTIONS}],
    }), encoding="utf-8")
    edgeplug.rewrite(cnn((4, 8), 10), root / "recipe.yaml", root / "out")
    np.savez(root / "train.npz", **_digits(300, 0))
    summary = build(root / "out", root / "train.npz", epochs=2, batch_size=32, echo=lambda text: None)
    assert summary["coreset_size"] == 12 and summary["record_epochs"] == [1, 2]
    for k in (1, 2, 3):
        np.savez(root / f"chunk_{k}.npz", **_digits(10 + 5 * k, k, shift=0.1 * k))
    return root


def test_quantize_writes_the_quantized_model_coreset_and_flip_networks(built: Path) -> None:
    folder = built / "out" / "qcore"
    summary = json.loads((folder / "build.json").read_text())
    assert sorted(summary["flipnets"]) == ["conv0", "conv1", "fc"]
    assert {p.name for p in folder.iterdir()} >= {"float.onnx", "model.int4.onnx", "state.npz", "coreset.npz", "reference.npz"}
    assert summary["quantized_bytes"] > 0 and summary["float_bytes"] > 0
    data = _digits(200, 9)
    runtime = _ort.inference_runtime()
    accuracy = {}
    for name in ("float.onnx", "model.int4.onnx"):
        session = runtime.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])
        accuracy[name] = (session.run(None, {"x": data["x"]})[0].argmax(1) == data["y"]).mean()
    calibrator = Calibrator(folder, read_options(built / "out"))
    assert calibrator.accuracy(data["x"], data["y"]) == accuracy["model.int4.onnx"]  # the runner is the exported model
    assert accuracy["float.onnx"] > 0.3 and accuracy["model.int4.onnx"] > accuracy["float.onnx"] - 0.15, accuracy


def test_coreset_size_stays_fixed_and_weights_stay_on_the_grid(built: Path) -> None:
    calibrator = Calibrator(built / "out" / "qcore", read_options(built / "out"))
    low, high = weight_limits(4)
    for k, n in enumerate((5, 40, 13), start=1):
        data = _digits(n, 20 + k, shift=0.2)
        result = calibrator.step(data["x"], data["y"], k)
        assert len(calibrator.coreset) == 12
        assert result.coreset_from_stream == int((calibrator.coreset.origin > 0).sum())
        for codes in calibrator.state.codes.values():
            assert codes.dtype == np.int8 and codes.min() >= low and codes.max() <= high


def test_the_device_loop_builds_and_runs_no_training_graph(built: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def unavailable(*args: object, **kwargs: object) -> None:
        raise AssertionError("the device loop touched onnxruntime-training")

    for name in ("training_api", "training_artifacts", "onnxblock"):
        monkeypatch.setattr(_ort, name, unavailable)
    monkeypatch.setattr(edgeplug.pipeline, "rewrite", unavailable)
    monkeypatch.setattr(edgeplug, "rewrite", unavailable)
    monkeypatch.setattr(edgeplug.Trainer, "__init__", unavailable)
    for module in ("onnxruntime.training.api", "onnxruntime.training.artifacts", "onnxruntime.training.onnxblock"):
        monkeypatch.setitem(sys.modules, module, None)  # importing them now raises ImportError
    chunks = [str(built / f"chunk_{k}.npz") for k in (1, 2, 3)]
    assert cli.main(["calibrate", str(built / "out"), "--stream", *chunks, "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["chunk", "file", "n"] and len(lines) == 5 and lines[4].startswith("updated ")
    assert [line.split()[1] for line in lines[1:4]] == ["chunk_1.npz", "chunk_2.npz", "chunk_3.npz"]


def test_calibrate_with_mismatched_chunk_shapes_is_one_line_exit_2(built: Path, capsys) -> None:
    bad = built / "bad.npz"
    np.savez(bad, x=np.zeros((4, 1, 7, 7), np.float32), y=np.zeros(4, np.int64))
    assert cli.main(["calibrate", str(built / "out"), "--stream", str(built / "chunk_1.npz"), str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.npz" in err and "(N, 1, 8, 8)" in err


def test_calibrate_without_a_coreset_is_one_line_exit_2(built: Path, tmp_path: Path, capsys) -> None:
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(built / "out", copy)
    (copy / "qcore" / "coreset.npz").unlink()
    assert cli.main(["calibrate", str(copy), "--stream", str(built / "chunk_1.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "coreset not found" in err and "edgeplug quantize" in err


def test_quantize_needs_the_qcore_pass(tmp_path: Path, capsys) -> None:
    (tmp_path / "recipe.yaml").write_text("loss: cross-entropy\n", encoding="utf-8")
    edgeplug.rewrite(cnn((4,), 10), tmp_path / "recipe.yaml", tmp_path / "out")
    np.savez(tmp_path / "train.npz", **_digits(20, 0))
    assert cli.main(["quantize", str(tmp_path / "out"), "--data", str(tmp_path / "train.npz")]) == 2
    assert "not rewritten with the 'qcore' pass" in capsys.readouterr().err


def test_the_pass_refuses_a_loss_other_than_cross_entropy(tmp_path: Path) -> None:
    (tmp_path / "recipe.yaml").write_text("loss: mse\npasses:\n  - name: qcore\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="cross-entropy"):
        edgeplug.rewrite(cnn((4,), 10), tmp_path / "recipe.yaml", tmp_path / "out")


def test_chunk_numbers_continue_across_calibrate_calls(built: Path, tmp_path: Path, capsys) -> None:
    """One chunk per call (a device's routine): coreset examples from an earlier call are not this chunk's."""
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(built / "out", copy)
    numbers = []
    for k in (1, 2):
        assert cli.main(["calibrate", str(copy), "--stream", str(built / f"chunk_{k}.npz"), "--no-progress", "--json"]) == 0
        numbers.append(json.loads(capsys.readouterr().out)[0]["chunk"])
    assert numbers[1] > numbers[0]


def test_drift_data_and_reuse_records_through_the_cli(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--drift-data feeds the flip targets from labelled domains; --reuse-records redoes everything after the float
    training from the saved records (same float model, same coreset candidates), here with real drift domains."""
    import shutil

    folder = tmp_path / "out"
    shutil.copytree(built / "out", folder)
    parts = [_digits(20, 20 + d, shift=0.2 * d) for d in (1, 2)]
    np.savez(tmp_path / "drifts.npz", x=np.concatenate([p["x"] for p in parts]), y=np.concatenate([p["y"] for p in parts]),
             domain=np.repeat([7, 9], 20))
    float_before = (folder / "qcore" / "float.onnx").read_bytes()
    capsys.readouterr()
    status = cli.main(["quantize", str(folder), "--data", str(built / "train.npz"), "--drift-data", str(tmp_path / "drifts.npz"),
                       "--reuse-records", "--no-progress", "--json"])
    assert status == 0
    assert sorted(json.loads(capsys.readouterr().out)["flipnets"]) == ["conv0", "conv1", "fc"]  # --json: one document
    assert (folder / "qcore" / "float.onnx").read_bytes() == float_before  # no retraining
    with np.load(folder / "qcore" / "reference.npz") as reference:
        assert {"class_mean/conv0", "class_mean/conv1"} <= set(reference.files)  # hidden layers' alignment targets
    np.savez(tmp_path / "bad.npz", x=parts[0]["x"], y=parts[0]["y"])
    assert cli.main(["quantize", str(folder), "--data", str(built / "train.npz"), "--drift-data", str(tmp_path / "bad.npz"),
                     "--reuse-records", "--no-progress"]) == 2


def test_calibrate_holds_out_part_of_each_chunk_for_the_guard(built: Path) -> None:
    calibrator = Calibrator(built / "out" / "qcore", {**read_options(built / "out"), "guard_split": 0.5, "flip_rounds": 2})
    chunk = _digits(20, 5, shift=0.3)
    result = calibrator.step(chunk["x"], chunk["y"], 1)
    assert result.rounds >= 1 and result.examples == 20
    rows = calibrator._rows(12, 20)  # 12 coreset rows, then the chunk's 20
    assert rows.check is not None and rows.fit is not None
    assert len(rows.check) == 12 + 10 and len(rows.fit) == 12 + 10 and not set(rows.check[12:]) & set(rows.fit[12:])
    assert rows.old.sum() == 12 and calibrator._rows(12, 1).check is None


def test_the_recalibrated_model_is_exported_by_a_public_command_and_export_says_so(built: Path, tmp_path: Path, capsys) -> None:
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(built / "out", copy)
    runtime = _ort.inference_runtime()
    data = _digits(60, 11, shift=0.3)

    def logits(path: Path) -> np.ndarray:
        return runtime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": data["x"]})[0]

    before = logits(copy / "qcore" / "model.int4.onnx")  # (an earlier test may have calibrated `built` already)
    assert cli.main(["export-quantized", str(copy), "-o", str(tmp_path / "before.onnx")]) == 0
    np.testing.assert_array_equal(logits(tmp_path / "before.onnx"), before)
    assert cli.main(["calibrate", str(copy), "--stream", *(str(built / f"chunk_{k}.npz") for k in (1, 2, 3)), "--no-progress"]) == 0
    assert "updated" in capsys.readouterr().out
    assert cli.main(["export-quantized", str(copy), "-o", str(tmp_path / "recalibrated.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == str(tmp_path / "recalibrated.onnx")
    assert cli.main(["export-quantized", str(copy), "-o", str(tmp_path / "initial.onnx"), "--initial"]) == 0
    recalibrated = logits(tmp_path / "recalibrated.onnx")
    # what the device loop runs is what is exported, and the folder's own copy follows the calibration
    calibrator = Calibrator(copy / "qcore", read_options(copy))
    np.testing.assert_array_equal(recalibrated, calibrator.runner.logits(data["x"]))
    np.testing.assert_array_equal(recalibrated, logits(copy / "qcore" / "model.int4.onnx"))
    assert not np.array_equal(recalibrated, before)  # the batch-norm statistics (at least) moved
    assert not np.array_equal(logits(tmp_path / "initial.onnx"), recalibrated)
    from edgeplug_plugins.qcore import export_quantized

    assert export_quantized(copy, tmp_path / "api.onnx").read_bytes() == (tmp_path / "recalibrated.onnx").read_bytes()
    capsys.readouterr()
    assert cli.main(["export", str(copy), "-o", str(tmp_path / "float.onnx")]) == 0
    err = capsys.readouterr().err
    assert "this is its float model" in err and f"edgeplug export-quantized {copy} -o" in err
    with pytest.raises(edgeplug.EdgeplugError, match="run 'edgeplug quantize'"):
        export_quantized(tmp_path / "nowhere", tmp_path / "x.onnx")


@pytest.mark.parametrize(("search", "proposal"), [(False, "network"), (True, "network"), (True, "descent")])
def test_guarded_flips_never_raise_the_coreset_or_the_chunk_loss(built: Path, search: bool, proposal: str) -> None:
    """flip_guard: whatever the flip networks propose, the codes left after the rounds give a coreset cross-entropy
    no higher and a chunk cross-entropy no higher than before the flips (forward passes only); with flip_search and
    descent proposals too. Descent proposals with the search always find flips that lower the chunk's loss."""
    from edgeplug_plugins.qcore.calibrate import split_losses

    for seed in (21, 22):
        calibrator = Calibrator(built / "out" / "qcore", {**read_options(built / "out"), "flip_rounds": 5, "flip_layers": "all",
                                                          "flip_search": search, "flip_proposal": proposal})
        chunk = _digits(30, seed, shift=0.4)
        pool = calibrator.coreset.pooled(chunk["x"], chunk["y"], 1, stacked=True)
        rows = calibrator._rows(len(calibrator.coreset), len(chunk["y"]))
        acts = calibrator.runner.activations(pool.x, calibrator.probes)
        before = split_losses(acts.logits, pool.y, rows.old)
        proposed, kept, _, after_acts = calibrator._flip(pool, acts, rows)
        after = split_losses(calibrator.runner.logits(pool.x), pool.y, rows.old)
        np.testing.assert_allclose(after_acts.logits, calibrator.runner.logits(pool.x), rtol=1e-5, atol=1e-5)
        assert proposed > 0
        assert after[0] <= before[0] + 1e-9 and after[1] <= before[1] + 1e-9
        if kept or proposal == "descent":
            assert kept > 0 and after[1] < before[1]


def test_flip_search_tries_the_most_confident_flips_first() -> None:
    from edgeplug_plugins.qcore.calibrate import _halvings

    assert _halvings(11) == [11, 5, 2, 1] and _halvings(1) == [1]
    previous = np.zeros((2, 3), np.int8)
    proposal = np.array([[1, 0, -1], [1, 1, 0]], np.int8)
    confidence = np.array([[0.5, 9.0, 2.0], [0.1, 3.0, 8.0]], np.float32)  # rows that do not move never count
    codes = Calibrator._most_confident(previous, proposal, confidence, 2)
    np.testing.assert_array_equal(codes, [[0, 0, -1], [0, 1, 0]])
    np.testing.assert_array_equal(Calibrator._most_confident(previous, proposal, confidence, 4), proposal)
    assert not previous.any()


def test_flip_limit_caps_the_flips_of_a_layer_per_round(built: Path) -> None:
    calibrator = Calibrator(built / "out" / "qcore", {**read_options(built / "out"), "flip_rounds": 1, "flip_guard": False,
                                                      "flip_proposal": "descent", "flip_limit": 0.05})
    before = calibrator.state.codes["fc"].copy()
    chunk = _digits(30, 23, shift=0.4)
    calibrator.step(chunk["x"], chunk["y"], 1)
    moved = int(np.count_nonzero(calibrator.state.codes["fc"] != before))
    assert 0 < moved <= int(np.ceil(0.05 * before.size))


@pytest.mark.parametrize("reserve", [0.0, 0.5])
def test_coreset_reserve_keeps_training_examples_through_a_stream(built: Path, reserve: float) -> None:
    """After chunks of shifted digits the coreset keeps at least `coreset_reserve` of its places for training data
    (origin 0), and stays its fixed size; without a reserve, misclassified stream examples take places."""
    import dataclasses

    from edgeplug_plugins.qcore.coreset import Coreset

    saved = Coreset.load(built / "out" / "qcore" / "coreset.npz")  # other tests calibrate this folder: start it afresh
    fresh = dataclasses.replace(saved, origin=np.zeros(len(saved), np.int64))
    calibrator = Calibrator(built / "out" / "qcore", {**read_options(built / "out"), "flip_rounds": 1, "coreset_reserve": reserve},
                            coreset=fresh)
    size = len(calibrator.coreset)
    for k in (1, 2, 3):
        chunk = _digits(40, 30 + k, shift=0.6)
        calibrator.step(chunk["x"], chunk["y"], k)
    training = int((calibrator.coreset.origin == 0).sum())
    assert len(calibrator.coreset) == size
    if reserve:
        assert training >= round(reserve * size)
    else:
        assert training < size
