"""The core passes on a BERT-style encoder (the committed toy BERT, two inputs): last layers across the post-LN
residual, BitFit-style biases and norms, freeze-bn's answer for LayerNorm, int8 embedding tables, tied frozen norms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeplug
from edgeplug import _ort
from edgeplug.recipe import recipe_from_dict
from edgeplug.trainability import untie_frozen_norm_parameters

REPO = Path(__file__).resolve().parent.parent
TINY_BERT = REPO / "tests" / "fixtures" / "text" / "tiny_bert.onnx"


def text_data(n: int = 24, length: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, length, n)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, 128, (n, length)) * mask
    return {"input_ids": ids, "attention_mask": mask, "y": (ids[:, 1] % 3).astype(np.int64)}


def rewrite(passes: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    recipe = {"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.003}, "passes": passes}
    return edgeplug.rewrite(TINY_BERT, recipe_from_dict(recipe), out).report


def logits(model: Path | onnx.ModelProto, data: dict[str, np.ndarray]) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = _ort.inference_runtime().InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]})[0]


def test_last_layers_of_a_post_ln_encoder_take_their_layernorm(tmp_path: Path) -> None:
    report = rewrite([{"name": "trainable", "options": {"layers": 2}}], tmp_path / "out")
    trainable = set(report["parameters"]["trainable"])
    # classifier + the last block's output dense (MatMul weight, bias) and, across the residual Add, its LayerNorm
    assert {"classifier.weight", "classifier.bias", "encoder.layer.1.output.dense.bias",
            "encoder.layer.1.output.LayerNorm.weight", "encoder.layer.1.output.LayerNorm.bias"} <= trainable
    assert not any(name.startswith(("encoder.layer.0.", "embeddings.")) for name in trainable)


def test_biases_and_norms_only(tmp_path: Path) -> None:
    report = rewrite([{"name": "trainable", "options": {"layers": "classifier", "biases": True, "norms": True}}], tmp_path / "out")
    trainable = set(report["parameters"]["trainable"])
    model = onnx.load(str(TINY_BERT))
    names = {t.name for t in model.graph.initializer}
    expected = {n for n in names if n.endswith((".bias", "LayerNorm.weight"))} | {"classifier.weight"}
    assert trainable == expected
    entry = next(p for p in report["passes"] if p["name"] == "trainable")
    assert entry["details"]["biases"] == 13 and entry["details"]["norms"] == 10  # 6 Linear biases x 2 + head; 5 LayerNorms x 2
    fit = edgeplug.Trainer(tmp_path / "out", progress=False, checkpoints=False).fit(text_data(), epochs=2, batch_size=8)
    assert np.isfinite(fit.step_losses).all()


def test_freeze_bn_on_layernorm_says_there_is_nothing_to_freeze(tmp_path: Path) -> None:
    report = rewrite([{"name": "trainable", "options": {"layers": 2}}, {"name": "freeze-bn"}], tmp_path / "out")
    entry = next(p for p in report["passes"] if p["name"] == "freeze-bn")
    assert len(entry["details"]["per_example_norms"]) == 5
    assert "LayerNormalization left as they are" in entry["summary"]


def test_quantize_frozen_stores_embedding_tables_per_row(tmp_path: Path) -> None:
    data = text_data()
    report = rewrite([{"name": "trainable", "options": {"layers": "classifier"}}, {"name": "quantize-frozen"}], tmp_path / "out")
    entry = next(p for p in report["passes"] if p["name"] == "quantize-frozen")
    quantized = {q["weight"]: q for q in entry["details"]["quantized"]}
    for table in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
        assert table in quantized
        assert quantized[table]["quantized_bytes"] < quantized[table]["float_bytes"] / 3
    forward = onnx.load(str(tmp_path / "out" / "forward_model.onnx"))
    assert "embeddings.word_embeddings.weight" not in {t.name for t in forward.graph.initializer}  # no float table left
    assert not any(n.op_type == "DequantizeLinear" and "word_embeddings" in n.input[0] for n in forward.graph.node)
    # per-row int8: close to the float model (rounding of each row to 255 levels)
    expected, got = logits(TINY_BERT, data), logits(forward, data)
    assert np.abs(got - expected).max() < 0.05 * (np.abs(expected).max() + 1)
    fit = edgeplug.Trainer(tmp_path / "out", progress=False, checkpoints=False).fit(data, epochs=2, batch_size=8)
    assert np.isfinite(fit.step_losses).all()
    edgeplug.export(tmp_path / "out", tmp_path / "exported.onnx")
    assert logits(tmp_path / "exported.onnx", data).shape == (len(data["y"]), 3)


def test_tied_frozen_norm_parameters_get_one_copy_per_reader() -> None:
    """dynamo's optimiser merges equal LayerNorm weights: frozen, each reader gets its own copy; trainable, the tie stays."""
    scale = numpy_helper.from_array(np.ones(4, np.float32), "ln.weight")
    bias = numpy_helper.from_array(np.zeros(4, np.float32), "ln.bias")
    nodes = [helper.make_node("LayerNormalization", ["x", "ln.weight", "ln.bias"], ["h"], name="ln0", axis=-1),
             helper.make_node("LayerNormalization", ["h", "ln.weight", "ln.bias"], ["y"], name="ln1", axis=-1)]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [scale, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    untied = untie_frozen_norm_parameters(model, trainable={"ln.bias"})
    assert untied == ["ln.weight"]
    assert [n.input[1] for n in model.graph.node] == ["ln.weight", "ln.weight.copy1"]
    assert [n.input[2] for n in model.graph.node] == ["ln.bias", "ln.bias"]  # trainable: still tied
    onnx.checker.check_model(model)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    session = _ort.inference_runtime().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    h = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)
    expected = (h - h.mean(1, keepdims=True)) / np.sqrt(h.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, atol=1e-4)


@pytest.mark.parametrize("options", [{"op_types": ["MatMul"]}, {"exclude": ["embeddings.word_embeddings.weight"]}])
def test_embedding_tables_stay_float_when_not_asked(options: dict[str, Any], tmp_path: Path) -> None:
    report = rewrite([{"name": "trainable", "options": {"layers": "classifier"}}, {"name": "quantize-frozen", "options": options}],
                     tmp_path / "out")
    entry = next(p for p in report["passes"] if p["name"] == "quantize-frozen")
    assert "embeddings.word_embeddings.weight" not in {q["weight"] for q in entry["details"]["quantized"]}


def _shortcut(options: dict[str, Any], out: Path, calibration: dict[str, np.ndarray] | None) -> dict[str, Any]:
    recipe = {"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.003}, "passes": [
        {"name": "trainable", "options": {"layers": 3}},
        {"name": "activation-shortcut", "options": {"method": "asi", "batch_size": 8, "op_types": ["MatMul", "Gemm"], **options}}]}
    report = edgeplug.rewrite(TINY_BERT, recipe_from_dict(recipe), out, calibration=calibration).report
    return next(p for p in report["passes"] if p["name"] == "activation-shortcut")["details"]


def test_activation_shortcut_compresses_linear_inputs_at_the_sequence_length(tmp_path: Path) -> None:
    """ASI on the encoder's [batch, sequence, features] Linear inputs: a Tucker core over (batch, sequence,
    features) at the calibration arrays' length; full ranks train exactly like vanilla backprop; the trainer
    does not trim; without a length the layers stay vanilla and the report says why."""
    data = text_data(16, 16)
    details = _shortcut({"compression": 4}, tmp_path / "asi", data)
    assert details["dims"] == {"sequence": 16}
    encoder = [layer for layer in details["layers"] if layer["node"].startswith("/layer.1/")]
    assert len(encoder) == 2 and all(len(layer["input_shape"]) == 3 and layer["input_freed"] for layer in encoder)
    assert details["compressed_bytes"] * 3 < details["vanilla_bytes"]
    fit = edgeplug.Trainer(tmp_path / "asi", progress=False, checkpoints=False).fit(data, epochs=2, batch_size=8)
    # batches stay at the padded length the factors were built for (cached prefix or carried state: either refuses trimming)
    assert np.isfinite(fit.step_losses).all() and fit.trimming is not None and "reason" in fit.trimming

    exact = _shortcut({"ranks": "full", "dims": {"sequence": 16}}, tmp_path / "full", None)
    assert len(exact["layers"]) == 3
    plain = rewrite([{"name": "trainable", "options": {"layers": 3}}], tmp_path / "plain")
    assert plain
    losses = [edgeplug.Trainer(tmp_path / name, progress=False, checkpoints=False, trim_padding=False).fit(
        data, epochs=2, batch_size=8).step_losses for name in ("full", "plain")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)

    vanilla = _shortcut({"ranks": [8, 4, 4]}, tmp_path / "unknown", None)
    assert [layer["node"] for layer in vanilla["layers"]] == ["/classifier/Gemm"]
    assert all("length of 'sequence' is unknown" in entry["reason"] for entry in vanilla["skipped"])
