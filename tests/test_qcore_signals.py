"""qcore's forward-only update signals for hidden layers: exact weight correlations, descent on the local loss."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgeplug_plugins.qcore.layers import find_layers
from edgeplug_plugins.qcore.signals import alignment_signal, class_means, weight_correlation


def conv_model(weight: np.ndarray, *, strides: list[int], pads: list[int], dilations: list[int], group: int) -> onnx.ModelProto:
    dims = weight.ndim - 2
    in_channels = weight.shape[1] * group
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", strides=strides, pads=pads, dilations=dilations, group=group)
    fc = helper.make_node("Gemm", ["flat", "fcw"], ["logits"], name="fc")
    flat = helper.make_node("Flatten", ["y"], ["flat"], name="flatten")
    graph = helper.make_graph([node, flat, fc], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_channels] + [None] * dims)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros((1, 1), np.float32), "fcw")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def conv_output(model: onnx.ModelProto, weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    copy.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight.astype(np.float32), "w"))
    copy.graph.output[0].name = "y"
    del copy.graph.node[1:]
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0].astype(np.float64)


@settings(max_examples=12, deadline=None)
@given(dims=st.integers(1, 2), kernel=st.integers(1, 3), stride=st.integers(1, 2), pad=st.integers(0, 2),
       dilation=st.integers(1, 2), group=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_conv_correlation_is_the_weight_gradient(dims: int, kernel: int, stride: int, pad: int, dilation: int, group: int,
                                                 seed: int) -> None:
    """f(W) = mean_n sum delta * conv(x, W) is linear in W; its gradient is what weight_correlation returns."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((2 * group, 2, *([kernel] * dims))).astype(np.float32)
    x = rng.standard_normal((3, 2 * group, *([7] * dims))).astype(np.float32)
    model = conv_model(weight, strides=[stride] * dims, pads=[pad] * (2 * dims), dilations=[dilation] * dims, group=group)
    base = conv_output(model, weight, x)
    delta = rng.standard_normal(base.shape).astype(np.float32)
    (layer,) = [layer for layer in find_layers(model) if layer.node == "conv"]
    got = weight_correlation(layer, model.graph.node[0], x, delta)
    assert got is not None
    expected = np.zeros(weight.size)
    for i in range(weight.size):  # f(W + e_i) - f(W): exact because f is linear
        bumped = weight.copy().reshape(-1)
        bumped[i] += 1.0
        expected[i] = ((conv_output(model, bumped.reshape(weight.shape), x) - base) * delta).sum() / len(x)
    np.testing.assert_allclose(got.reshape(-1), expected, rtol=1e-4, atol=1e-4)


def test_gemm_correlation() -> None:
    rng = np.random.default_rng(0)
    x, delta = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((5, 3)).astype(np.float32)
    weight = rng.standard_normal((4, 3)).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w"], ["logits"], name="fc")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph)
    (layer,) = find_layers(model)
    np.testing.assert_allclose(weight_correlation(layer, node, x, delta), delta.T @ x / 5, rtol=1e-5)


def test_alignment_step_lowers_the_local_loss() -> None:
    """A small step of the weights along the signal moves every class's output means towards the reference."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((4, 3, 3)).astype(np.float32)
    model = conv_model(weight, strides=[1], pads=[1, 1], dilations=[1], group=1)
    (layer,) = [layer for layer in find_layers(model) if layer.node == "conv"]
    x = rng.standard_normal((40, 3, 16)).astype(np.float32) + rng.standard_normal((1, 3, 1)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    reference = class_means(conv_output(model, weight, x) + rng.standard_normal((1, 4, 1)), y, 3)  # shifted targets

    def local_loss(w: np.ndarray) -> float:
        means = conv_output(model, w, x).mean(axis=2)
        return float(0.5 * ((reference[y] - means) ** 2).sum(axis=1).mean())

    signal = alignment_signal(layer, model.graph.node[0], x, conv_output(model, weight, x), y, reference, 1.0)
    assert signal is not None
    step = 0.05 * signal.reshape(weight.shape) / np.abs(signal).max()
    assert local_loss(weight + step) < local_loss(weight) - 1e-4


def test_class_means_mark_absent_classes() -> None:
    means = class_means(np.ones((4, 2, 3), np.float32), np.array([0, 0, 2, 2]), 4)
    assert np.isnan(means[1]).all() and np.isnan(means[3]).all()
    np.testing.assert_allclose(means[0], 1.0)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER"])
def test_auto_pad_has_no_signal(auto_pad: str) -> None:
    weight = np.ones((2, 2, 3), np.float32)
    model = conv_model(weight, strides=[1], pads=[0, 0], dilations=[1], group=1)
    node = model.graph.node[0]
    del node.attribute[:]
    node.attribute.append(helper.make_attribute("auto_pad", auto_pad))
    (layer,) = [layer for layer in find_layers(model) if layer.node == "conv"]
    assert weight_correlation(layer, node, np.ones((1, 2, 5), np.float32), np.ones((1, 2), np.float32)) is None
