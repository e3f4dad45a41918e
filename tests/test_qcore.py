"""qcore: integer grids, flips, forgetting counts and coreset draws (fast, no artifacts)."""

from __future__ import annotations

from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import onnx
import pytest
from builders import cnn, mlp
from hypothesis import example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgeplug import _ort
from edgeplug.errors import ModelError
from edgeplug_plugins.qcore.build import quantize
from edgeplug_plugins.qcore.coreset import (
    Coreset,
    coreset_size,
    draw,
    draw_reserved,
    forgetting_counts,
    recount,
    sampling_weights,
)
from edgeplug_plugins.qcore.flipnet import apply_flips, mlp_graph, predict_steps
from edgeplug_plugins.qcore.layers import find_layers
from edgeplug_plugins.qcore.qmodel import QuantizedRunner, export_model, initial_state
from edgeplug_plugins.qcore.quantize import (
    activation_grid,
    dequantize_weights,
    quantize_weights,
    weight_grid,
    weight_limits,
)

bits_st = st.integers(min_value=2, max_value=8)
matrices = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
                      elements=st.floats(-4, 4, width=32, allow_subnormal=False))


def _ort_dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=0)
    graph = helper.make_graph([node], "dq", [helper.make_tensor_value_info("q", TensorProto.INT8, list(codes.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = _ort.inference_runtime().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"q": codes})[0]


@settings(max_examples=40, deadline=None)
@given(matrix=matrices, bits=bits_st)
def test_quantize_dequantize_round_trip_is_exact_on_the_grid(matrix: np.ndarray, bits: int) -> None:
    grid = weight_grid(matrix, bits)
    codes = quantize_weights(matrix, grid)
    low, high = weight_limits(bits)
    assert codes.dtype == np.int8 and codes.min() >= low and codes.max() <= high
    values = dequantize_weights(codes, grid)
    assert np.array_equal(quantize_weights(values, grid), codes)  # grid points come back to the same codes
    assert np.array_equal(_ort_dequantize(codes, grid.scale, grid.zero_point), values)  # onnxruntime agrees bit for bit
    assert np.all(np.abs(values - matrix) <= grid.scale[:, None] / 2 + 1e-5 * (1 + np.abs(matrix)))


@settings(max_examples=30, deadline=None)
@given(values=hnp.arrays(np.float32, st.integers(2, 50), elements=st.floats(-10, 10, width=32)), bits=bits_st)
@example(values=np.array([0.0, 1e-45], np.float32), bits=2)  # a denormal range: its step underflowed to 0
def test_activation_grid_holds_zero_and_spans_its_codes(values: np.ndarray, bits: int) -> None:
    grid = activation_grid(values, bits, 100.0)
    assert 0 <= grid.zero_point <= 2**bits - 1
    assert grid.low <= 0.0 <= grid.high
    # the integer zero point moves the range by at most one step at either end
    tolerance = grid.scale * (1 + 1e-4)
    assert grid.low <= min(values.min(), 0) + tolerance and grid.high >= max(values.max(), 0) - tolerance


@settings(max_examples=40, deadline=None)
@given(data=st.data(), bits=bits_st)
def test_flips_stay_in_minus_one_zero_one_and_weights_on_the_grid(data: st.DataObject, bits: int) -> None:
    model = mlp(features=5, hidden=(4,), classes=3)
    state = initial_state(model, bits)
    low, high = weight_limits(bits)
    for layer in find_layers(model):
        shape = state.codes[layer.node].shape
        state.codes[layer.node] = data.draw(hnp.arrays(np.int8, shape, elements=st.integers(low, high)))
        flips = data.draw(hnp.arrays(np.int8, shape, elements=st.integers(-1, 1)))
        after = apply_flips(layer, state, flips)
        assert after.dtype == np.int8 and after.min() >= low and after.max() <= high
        assert np.abs(after.astype(int) - state.codes[layer.node]).max(initial=0) <= 1


def test_a_flip_network_only_outputs_minus_one_zero_or_one(tmp_path: Path) -> None:
    path = tmp_path / "flipnet.onnx"
    onnx.save(mlp_graph(8, seed=3), str(path))
    features = np.random.default_rng(0).standard_normal((500, 4)).astype(np.float32) * 10
    steps = predict_steps(path, features, None, None)
    assert steps.shape == (500,) and set(np.unique(steps)) <= {-1, 0, 1}


def test_forgetting_counts_events_and_never_learned() -> None:
    records = np.array([[[1, 1, 0, 0], [0, 1, 0, 1], [1, 1, 0, 0]],   # 8 bits over 3 records
                        [[1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 0, 0]]], bool)  # 2 bits
    # example 0: 8 bits forgets once (1->0); 2 bits never. example 2: never learned at either width.
    # example 3: 8 bits 0->1->0 once; 2 bits 1->1->0 once.
    assert forgetting_counts(records, never_learned=5).tolist() == [1, 0, 10, 2]


@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(0, 20), min_size=2, max_size=30))
def test_sampling_weights_follow_forgetting_counts(counts: list[int]) -> None:
    array = np.array(counts)
    weights = sampling_weights(array)
    assert weights.sum() == pytest.approx(1.0)
    if array.sum() > 0:
        assert np.allclose(weights * array.sum(), array)  # proportional, zero for never-forgotten examples
        rng = np.random.default_rng(0)
        drawn = np.bincount([draw(array, 1, rng)[0] for _ in range(1000)], minlength=len(array)) / 1000
        assert np.all(drawn[array == 0] == 0)
        assert np.abs(drawn - weights).max() < 0.07  # > 4 standard deviations of a frequency over 1000 draws
    else:
        assert np.allclose(weights, 1 / len(array))


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 5), min_size=1, max_size=40), size=st.integers(1, 40), seed=st.integers(0, 99))
def test_a_draw_has_the_fixed_size_and_prefers_forgotten_examples(counts: list[int], size: int, seed: int) -> None:
    array = np.array(counts)
    chosen = draw(array, size, np.random.default_rng(seed))
    assert len(chosen) == min(size, len(array)) == len(set(chosen.tolist()))
    forgotten = int((array > 0).sum())
    assert int((array[chosen] > 0).sum()) == min(forgotten, len(chosen))


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 9), min_size=2, max_size=40), data=st.data(), reserve=st.floats(0, 1), seed=st.integers(0, 99))
def test_a_reserved_draw_keeps_its_share_of_training_examples(counts: list[int], data: st.DataObject, reserve: float,
                                                              seed: int) -> None:
    array = np.array(counts)
    origin = np.array(data.draw(st.lists(st.integers(0, 3), min_size=len(counts), max_size=len(counts))))
    size = data.draw(st.integers(1, len(counts)))
    chosen = draw_reserved(array, origin, size, reserve, np.random.default_rng(seed))
    assert len(chosen) == size == len(set(chosen.tolist()))
    assert int((origin[chosen] == 0).sum()) >= min(int(round(reserve * size)), int((origin == 0).sum()))
    if reserve == 0:
        np.testing.assert_array_equal(chosen, draw(array, size, np.random.default_rng(seed)))


def test_a_reserve_keeps_training_examples_that_a_plain_draw_loses() -> None:
    """A stream of misclassified examples (never-learned counts, the largest) pushes the training examples out
    of a plain draw; the reserve keeps its places for them."""
    counts = np.array([1] * 10 + [7] * 30)
    origin = np.array([0] * 10 + [1] * 30)
    plain = [int((origin[draw(counts, 10, np.random.default_rng(s))] == 0).sum()) for s in range(20)]
    kept = [int((origin[draw_reserved(counts, origin, 10, 0.5, np.random.default_rng(s))] == 0).sum()) for s in range(20)]
    assert max(plain) < 5 and min(kept) >= 5


def test_recount_adds_events_for_old_examples_and_starts_new_ones() -> None:
    pool = Coreset(np.zeros((4, 2), np.float32), np.zeros(4, np.int64), np.array([2, 0, 1, 0]),
                   np.array([True, True, False, False]), np.array([0, 0, 1, 1]))
    now = np.array([False, True, True, False])
    new = np.array([False, False, True, True])
    assert recount(pool, now, new, never_learned=7).counts.tolist() == [3, 0, 0, 7]


def test_coreset_size_is_a_count_or_a_fraction() -> None:
    assert coreset_size(20, 1000) == 20 and coreset_size(0.02, 1000) == 20 and coreset_size(0.0001, 100) == 1


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_exported_model_runs_in_plain_onnxruntime_like_the_runner(bits: int) -> None:
    model = cnn((4, 8), 10)
    x = np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)
    state = initial_state(model, bits)
    runner = QuantizedRunner(model, state)
    runner.refresh_norm_stats(x)
    inputs = runner.layer_inputs(x)
    for layer in runner.layers:
        if not layer.first:
            state.activation_grids[layer.node] = activation_grid(inputs[layer.node], 8 if layer.last else bits, 99.9)
    runner = QuantizedRunner(model, state)
    exported = export_model(model, state)
    weights = {t.name: t for t in exported.graph.initializer if t.name.endswith("__qcodes")}
    assert len(weights) == 3 and all(t.data_type == TensorProto.INT8 for t in weights.values())
    assert {n.op_type for n in exported.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    session = _ort.inference_runtime().InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], runner.logits(x), rtol=1e-5, atol=1e-5)
    limits = weight_limits(bits)
    assert all(limits[0] <= c.min() and c.max() <= limits[1] for c in state.codes.values())


def test_a_model_without_quantizable_layers_is_a_model_error() -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    with pytest.raises(ModelError, match="no Conv, Gemm or MatMul"):
        find_layers(helper.make_model(graph))


def _quantized(model: onnx.ModelProto, x: np.ndarray, bits: int) -> QuantizedRunner:
    """`model` at `bits` with statistics and activation ranges from `x` (as `edgeplug quantize` sets them)."""
    return QuantizedRunner(model, quantize(model, x, bits, 99.9), batch=7)


def _residual_cnn() -> onnx.ModelProto:
    """cnn with a skip from the first block's output around the third conv: no cut at that conv's input."""
    model = cnn((4, 4, 4), 5)
    nodes = model.graph.node
    pool = next(n for n in nodes if n.name == "pool")
    pool.input[0] = "res"
    nodes.insert(list(nodes).index(pool), helper.make_node("Add", ["a2", "a0"], ["res"], name="skip"))
    return model


@pytest.mark.parametrize(("make", "cuts"), [(lambda: cnn((4, 8), 10), {"conv0": False, "conv1": True, "fc": True}),
                                            (_residual_cnn, {"conv0": False, "conv1": True, "conv2": False, "fc": True})],
                         ids=["plain", "residual"])
def test_rerunning_after_a_layer_equals_a_whole_forward_pass(make, cuts: dict[str, bool]) -> None:
    """Flips are judged from kept activations through the layer's suffix; where a skip crosses the cut
    (the residual model's conv2) or the layer reads the graph input, the whole model runs instead."""
    from edgeplug_plugins.qcore.calibrate import feature_probes

    model = make()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((23, 1, 8, 8)).astype(np.float32)
    runner = _quantized(model, x, 4)
    probes = feature_probes(model, runner.layers)
    runner = QuantizedRunner(model, runner.state, probes=probes, batch=7)
    acts = runner.activations(x, probes)
    for layer in reversed(runner.layers):  # as the device loop goes: the classifier first
        runner.state.codes[layer.node] = apply_flips(layer, runner.state, rng.integers(-1, 2, runner.state.codes[layer.node].shape))
        acts = runner.rerun_from(layer, acts, x)
        whole = runner.activations(x, probes)
        np.testing.assert_allclose(acts.logits, whole.logits, rtol=1e-5, atol=1e-5)
        for name in probes:
            np.testing.assert_allclose(acts.values[name], whole.values[name], rtol=1e-5, atol=1e-5)
    assert {layer.node: runner._suffix(layer) is not None for layer in runner.layers} == cuts


@pytest.mark.parametrize("momentum", [1.0, 0.3])
def test_norm_statistics_are_those_of_all_the_data_layer_after_layer(momentum: float) -> None:
    model = cnn((4, 8), 10)
    x = np.random.default_rng(2).standard_normal((37, 1, 8, 8)).astype(np.float32) * 2 + 0.5
    runner = _quantized(model, x[:20], 8)
    expected = runner.state.copy()
    check = QuantizedRunner(model, expected)
    for bn in check.norms:  # the reference: the whole batch at once, one norm after the other
        (value,) = check.run(x, [bn.input[0]])
        mean, var = expected.norm_stats[bn.name]
        expected.norm_stats[bn.name] = ((1 - momentum) * mean + momentum * value.mean(axis=(0, 2, 3), dtype=np.float64),
                                        (1 - momentum) * var + momentum * value.var(axis=(0, 2, 3), dtype=np.float64))
    runner.refresh_norm_stats(x, momentum)  # batches of 7, merged
    for name, (mean, var) in expected.norm_stats.items():
        np.testing.assert_allclose(runner.state.norm_stats[name][0], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(runner.state.norm_stats[name][1], var, rtol=1e-5, atol=1e-6)


@given(st.lists(st.integers(0, 6), min_size=1, max_size=4), st.data())
def test_a_stacked_view_reads_like_the_concatenation(sizes: list[int], data: st.DataObject) -> None:
    from edgeplug_plugins.qcore.coreset import Stacked

    parts = [np.arange(10 * k, 10 * k + 2 * n, dtype=np.float32).reshape(n, 2) for k, n in enumerate(sizes)]
    stacked, whole = Stacked(*parts), np.concatenate(parts)
    assert len(stacked) == len(whole)
    start = data.draw(st.integers(0, len(whole)))
    stop = data.draw(st.integers(start, len(whole) + 3))
    np.testing.assert_array_equal(stacked[start:stop], whole[start:stop])
    if len(whole):
        rows = np.asarray(data.draw(st.lists(st.integers(0, len(whole) - 1), max_size=8)), dtype=np.int64)
        np.testing.assert_array_equal(stacked[rows], whole[rows])


def test_learning_rates_written_with_an_exponent_reach_the_trainer(tmp_path: Path) -> None:
    """backprop_lr / flip_lr of 1e-05: json.dumps writes '1e-05', which a YAML 1.1 reader takes for a string."""
    from builders import classification_data

    from edgeplug_plugins.qcore.backprop import backprop_calibrate
    from edgeplug_plugins.qcore.flipnet import train_flipnet

    model, data = mlp(4, (6,), 3), classification_data((4,), 3, n=16)
    state = quantize(model, data["x"], 8, 99.99)
    tuned = backprop_calibrate(model, state, data["x"], data["y"], epochs=1, lr=1e-05)
    assert tuned.codes.keys() == state.codes.keys()
    rng = np.random.default_rng(0)
    info = train_flipnet(rng.standard_normal((64, 4)).astype(np.float32), rng.integers(-1, 2, 64).astype(np.float32),
                         tmp_path / "flip.onnx", hidden=4, epochs=1, lr=1e-05, seed=0)
    assert (tmp_path / "flip.onnx").is_file() and info["rows"] > 0


def test_straight_through_calibrations_add_up_small_updates_that_rounding_throws_away() -> None:
    """A plain calibration at a learning rate far below half a grid step moves no code; straight-through
    calibrations that share latent float weights move codes, and the codes are always Q(latent)."""
    from builders import classification_data

    from edgeplug_plugins.qcore.backprop import backprop_calibrate, latent_weights
    from edgeplug_plugins.qcore.quantize import quantize_weights

    model, data = mlp(4, (6,), 3), classification_data((4,), 3, n=32)
    state = quantize(model, data["x"], 4, 99.99)
    plain = state
    for _ in range(3):
        plain = backprop_calibrate(model, plain, data["x"], data["y"], epochs=10, lr=3e-4)
    assert all(np.array_equal(plain.codes[k], state.codes[k]) for k in state.codes)
    latent = latent_weights(model)
    start = {k: v.copy() for k, v in latent.items()}
    assert all(np.array_equal(quantize_weights(latent[k], state.weight_grids[k]), state.codes[k]) for k in state.codes)
    tuned = state
    for _ in range(3):
        tuned = backprop_calibrate(model, tuned, data["x"], data["y"], epochs=10, lr=3e-4, latent=latent)
        assert all(np.array_equal(tuned.codes[k], quantize_weights(latent[k], state.weight_grids[k])) for k in state.codes)
    assert any(not np.array_equal(latent[k], start[k]) for k in latent)
    assert any(not np.array_equal(tuned.codes[k], state.codes[k]) for k in state.codes)
    # the latent weights moved by at most what 30 AdamW steps of 3e-4 move a weight, far less than a grid step
    assert max(float(np.abs(latent[k] - start[k]).max()) for k in latent) < 30 * 3e-4 * 1.5


def test_straight_through_flip_targets_move_codes_that_a_plain_calibration_rounds_back() -> None:
    """backprop_straight_through: the flip networks' targets come from a quantization-aware calibration that
    starts at the float weights, so a learning rate too small for plain rounding to move anything still gives
    non-zero targets (the weights nearest a rounding boundary)."""
    from builders import classification_data

    from edgeplug_plugins.qcore.build import flip_examples

    model, data = mlp(4, (6,), 3), classification_data((4,), 3, n=32)
    state = quantize(model, data["x"], 4, 99.99)
    reference = QuantizedRunner(model, state).channel_stats(data["x"])
    options = {"norm_momentum": 1.0, "backprop_epochs": 20, "backprop_lr": 3e-4, "seed": 0}
    _, plain = flip_examples(model, state, reference, data["x"], data["y"], options)
    _, straight = flip_examples(model, state, reference, data["x"], data["y"], {**options, "backprop_straight_through": True})
    assert plain.keys() == straight.keys()
    assert all(not v.any() for v in plain.values())
    assert any(v.any() for v in straight.values())
    assert all(set(np.unique(v)) <= {-1.0, 0.0, 1.0} for v in straight.values())


def test_a_straight_through_calibration_of_some_layers_needs_latent_weights_only_for_those() -> None:
    from builders import classification_data

    from edgeplug_plugins.qcore.backprop import backprop_calibrate, latent_weights

    model, data = mlp(4, (6,), 3), classification_data((4,), 3, n=32)
    state = quantize(model, data["x"], 4, 99.99)
    last = [layer.node for layer in find_layers(model) if layer.last]
    latent = latent_weights(model, last)
    assert list(latent) == last
    tuned = backprop_calibrate(model, state, data["x"], data["y"], epochs=30, lr=3e-3, layers=last, latent=latent)
    for node in state.codes:
        if node not in last:
            np.testing.assert_array_equal(tuned.codes[node], state.codes[node])
    assert any(not np.array_equal(tuned.codes[k], state.codes[k]) for k in last)
    with pytest.raises(ValueError, match="no latent weights"):
        backprop_calibrate(model, state, data["x"], data["y"], epochs=1, lr=3e-3, latent=latent)
