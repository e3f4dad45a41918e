"""quantize-frozen: frozen layer weights as int8 + DequantizeLinear in the training graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import classification_data, cnn, mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import edgeplug
from edgeplug import _ort
from edgeplug.recipe import recipe_from_dict
from edgeplug_plugins.qcore.frozen import quantize_frozen
from edgeplug_plugins.qcore.layers import weight_layers
from edgeplug_plugins.qcore.quantize import (
    dequantize_weights,
    weight_grid,
    weight_limits,
)

IMAGE = 6


def _recipe(*passes: dict, lr: float = 0.05) -> edgeplug.Recipe:
    return recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": lr}, "passes": list(passes)})


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = _ort.inference_runtime().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _details(report: dict) -> dict:
    return next(p for p in report["passes"] if p["name"] == "quantize-frozen")["details"]


def _gemm_matmul_model(seed: int = 0) -> onnx.ModelProto:
    """x[N,6] -> Gemm(transB=1, 5) -> Relu -> MatMul(4) -> logits: the two other weight layouts."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in (
        ("g.weight", (5, 6)), ("g.bias", (5,)), ("m.weight", (5, 4)))]
    nodes = [helper.make_node("Gemm", ["x", "g.weight", "g.bias"], ["h"], name="g", transB=1),
             helper.make_node("Relu", ["h"], ["a"], name="act"),
             helper.make_node("MatMul", ["a", "m.weight"], ["logits"], name="m")]
    graph = helper.make_graph(nodes, "gm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


# -- the rewrite itself, over generated graphs ------------------------------------------------------

models = st.one_of(
    st.builds(lambda c, bn, s: ("cnn", cnn(channels=tuple(c), image=IMAGE, batch_norm=bn, seed=s)),
              st.lists(st.integers(1, 6), min_size=1, max_size=3), st.booleans(), st.integers(0, 5)),
    st.builds(lambda h, s: ("mlp", mlp(hidden=tuple(h), seed=s)), st.lists(st.integers(1, 9), max_size=3), st.integers(0, 5)),
    st.builds(lambda s: ("gm", _gemm_matmul_model(s)), st.integers(0, 5)),
)


@settings(max_examples=25, deadline=None)
@given(case=models, data=st.data(), bits=st.integers(2, 8))
def test_frozen_weights_land_on_the_grid_and_trained_ones_stay_float(case: tuple[str, onnx.ModelProto], data: st.DataObject,
                                                                      bits: int) -> None:
    kind, model = case
    layers = weight_layers(model)
    weights = [layer.weight for layer in layers]
    trained = data.draw(st.sets(st.sampled_from(weights)), label="trained")
    result = quantize_frozen(model, trained, bits=bits, op_types=["Conv", "Gemm", "MatMul"], exclude=[])
    onnx.checker.check_model(result.model, full_check=True)
    before, after = _inits(model), _inits(result.model)
    assert {q.weight for q in result.quantized} == set(weights) - trained
    for name in trained:
        assert after[name].dtype == np.float32 and np.array_equal(after[name], before[name])
    reference = onnx.ModelProto()
    reference.CopyFrom(model)  # the float model with each frozen weight replaced by its grid values
    low, high = weight_limits(bits)
    for layer in layers:
        if layer.weight in trained:
            continue
        assert layer.weight not in after
        codes, scale, zero = (after[f"{layer.weight}_{part}"] for part in ("quantized", "scale", "zero_point"))
        assert codes.dtype == np.int8 and codes.shape == before[layer.weight].shape
        assert codes.min() >= low and codes.max() <= high and scale.shape == (layer.out_channels,)
        matrix = layer.to_matrix(before[layer.weight])
        grid = weight_grid(matrix, bits)
        values = dequantize_weights(layer.to_matrix(codes), grid)
        assert np.all(np.abs(values - matrix) <= grid.scale[:, None] / 2 + 1e-6)  # nearest grid point (range contains all)
        for tensor in reference.graph.initializer:
            if tensor.name == layer.weight:
                tensor.CopyFrom(numpy_helper.from_array(layer.from_matrix(values), layer.weight))
    shape = [d.dim_value or 3 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(_run(result.model, x), _run(reference, x), rtol=1e-5, atol=1e-5)  # the axis is right


def test_shared_and_excluded_weights_stay_float() -> None:
    model = _gemm_matmul_model()
    model.graph.node.append(helper.make_node("Identity", ["m.weight"], ["m_copy"], name="copy"))
    model.graph.output.append(helper.make_tensor_value_info("m_copy", TensorProto.FLOAT, [5, 4]))
    result = quantize_frozen(model, set(), bits=8, op_types=["Conv", "Gemm", "MatMul"], exclude=["g"])
    assert result.quantized == ()
    assert result.skipped == {"g.weight": "excluded", "m.weight": "also read by a node that is not a layer's weight slot"}
    only_conv = quantize_frozen(_gemm_matmul_model(), set(), bits=8, op_types=["Conv"], exclude=[])
    assert only_conv.quantized == () and set(only_conv.skipped) == {"g.weight", "m.weight"}


# -- through the pipeline: training, gradients, sizes, export -----------------------------------------

def _sizes(folder: Path) -> int:
    return sum((folder / name).stat().st_size for name in ("training_model.onnx", "eval_model.onnx", "checkpoint"))


def test_training_reaches_a_layer_before_a_frozen_quantized_one_and_files_shrink(tmp_path: Path) -> None:
    """conv0 and fc train; conv1 between them is int8: its input gradient must reach conv0."""
    model = cnn(channels=(8, 32), classes=4, image=IMAGE, batch_norm=False)
    data = classification_data((1, IMAGE, IMAGE), 4, n=48)
    trainable = {"name": "trainable", "options": {"include": ["conv0.*", "fc.*"]}}
    quantized, plain = tmp_path / "q", tmp_path / "f"
    report = edgeplug.rewrite(model, _recipe(trainable, {"name": "quantize-frozen"}), quantized).report
    edgeplug.rewrite(model, _recipe(trainable), plain)
    details = _details(report)
    assert [q["weight"] for q in details["quantized"]] == ["conv1.weight"]
    assert set(report["parameters"]["trainable"]) == {"conv0.weight", "conv0.bias", "fc.weight", "fc.bias"}
    assert _sizes(quantized) < _sizes(plain) - 0.6 * details["float_bytes"]  # 9 KiB of float weight -> ~2.4 KiB
    training = onnx.load(str(quantized / "training_model.onnx"))
    assert any(n.op_type == "DequantizeLinear" for n in training.graph.node)

    forward = onnx.load(str(quantized / "forward_model.onnx"))
    result = edgeplug.Trainer(quantized, progress=False).fit(data, epochs=6, batch_size=8)
    losses = [epoch.train.loss for epoch in result.epochs]
    assert losses[-1] < losses[0]
    edgeplug.export(quantized, tmp_path / "trained.onnx")
    exported = onnx.load(str(tmp_path / "trained.onnx"))
    trained, initial = _inits(exported), _inits(forward)
    assert not np.array_equal(trained["conv0.weight"], initial["conv0.weight"])  # the gradient crossed conv1
    assert trained["conv0.weight"].dtype == np.float32
    for part in ("quantized", "scale", "zero_point"):
        name = f"conv1.weight_{part}"
        assert trained[name].dtype == initial[name].dtype and np.array_equal(trained[name], initial[name])
    logits = _run(exported, data["x"])  # plain onnxruntime inference
    assert logits.shape == (48, 4) and np.isfinite(logits).all()


def test_untrained_export_equals_the_forward_model(tmp_path: Path) -> None:
    model = cnn(channels=(4, 8), classes=3, image=IMAGE)
    recipe = _recipe({"name": "trainable", "options": {"layers": "classifier"}}, {"name": "freeze-bn"}, {"name": "quantize-frozen"})
    edgeplug.rewrite(model, recipe, tmp_path / "out")
    edgeplug.export(tmp_path / "out", tmp_path / "m.onnx")
    x = classification_data((1, IMAGE, IMAGE), 3, n=8)["x"]
    forward = onnx.load(str(tmp_path / "out" / "forward_model.onnx"))
    np.testing.assert_allclose(_run(onnx.load(str(tmp_path / "m.onnx")), x), _run(forward, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_run(forward, x), _run(model, x), rtol=0.1, atol=0.05)  # 8-bit weights: close to float


@pytest.mark.parametrize("axis", ["input", "output"])
def test_after_sparse_update_the_frozen_channel_halves_are_quantized(tmp_path: Path, axis: str) -> None:
    model = cnn(channels=(4, 8), image=IMAGE, batch_norm=False)
    data = classification_data((1, IMAGE, IMAGE), 10, n=24)
    sparse = {"name": "sparse-update", "options": {"strategy": "static", "memory_budget_bytes": 200_000, "batch_size": 8,
                                                   "channel_ratio": 0.5, "axis": axis, "classifier": "candidate", "layers": 2}}
    out = tmp_path / "out"
    report = edgeplug.rewrite(model, _recipe(sparse, {"name": "quantize-frozen"}), out, calibration=data).report
    quantized = {q["weight"] for q in _details(report)["quantized"]}
    trainable = set(report["parameters"]["trainable"])
    halves = {name for name in quantized if name.endswith(".sparse_frozen")}
    assert halves, quantized  # a split layer's frozen half became int8
    assert {name.removesuffix(".sparse_frozen") + ".sparse_trainable" for name in halves} <= trainable
    forward = _inits(onnx.load(str(out / "forward_model.onnx")))
    assert all(forward[name].dtype == np.float32 for name in trainable)
    assert not quantized & trainable
    result = edgeplug.Trainer(out, progress=False).fit(data, epochs=4, batch_size=8)
    assert result.epochs[-1].train.loss < result.epochs[0].train.loss
    edgeplug.export(out, tmp_path / "trained.onnx")
    assert _run(onnx.load(str(tmp_path / "trained.onnx")), data["x"]).shape == (24, 10)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(channels=st.lists(st.integers(2, 6), min_size=1, max_size=2), layers=st.integers(1, 2), seed=st.integers(0, 3))
def test_any_trainable_choice_then_quantize_frozen_builds_artifacts_that_train(
        tmp_path_factory: pytest.TempPathFactory, channels: list[int], layers: int, seed: int) -> None:
    model = cnn(channels=tuple(channels), classes=3, image=IMAGE, batch_norm=False, seed=seed)
    data = classification_data((1, IMAGE, IMAGE), 3, n=16, seed=seed)
    out = tmp_path_factory.mktemp("frozen") / "out"
    report = edgeplug.rewrite(model, _recipe({"name": "trainable", "options": {"layers": layers}}, {"name": "quantize-frozen"}),
                              out).report
    weights = {layer.weight for layer in weight_layers(model)}
    assert {q["weight"] for q in _details(report)["quantized"]} == weights - set(report["parameters"]["trainable"])
    result = edgeplug.Trainer(out, progress=False).fit(data, epochs=3, batch_size=8)
    assert result.epochs[-1].train.loss < result.epochs[0].train.loss


def test_bad_options_are_recipe_errors() -> None:
    with pytest.raises(edgeplug.RecipeError, match="op_types"):
        _recipe({"name": "quantize-frozen", "options": {"op_types": ["Relu"]}})
    with pytest.raises(edgeplug.RecipeError, match="bits"):
        _recipe({"name": "quantize-frozen", "options": {"bits": 9}})

