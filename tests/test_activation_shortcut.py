"""activation-shortcut: weight gradients from compressed inputs (ASI, gradient filtering).

The rewritten training graph is run once on a batch (onnxruntime-training's CPU build
runs its own gradient ops in an InferenceSession) and its gradients are compared with
vanilla onnxruntime-training's and with numpy formulas on the same X and dY.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import edgeplug
import edgeplug_plugins.activation_shortcut as activation_shortcut
from edgeplug import _ort
from edgeplug.errors import RecipeError
from edgeplug.graph import GraphIndex
from edgeplug.profiling.measure import measure
from edgeplug.profiling.static import static_profile
from edgeplug.recipe import recipe_from_dict
from edgeplug_plugins.activation_shortcut import calibrate, contract, ranks, tucker
from edgeplug_plugins.activation_shortcut import layers as layers_module
from edgeplug_plugins.activation_shortcut.layers import conv_geometry

BASE = {"loss": "cross-entropy", "optimizer": {"name": "sgd", "lr": 0.05}}
BATCH = 4


def make_host() -> edgeplug.PluginHost:
    """The installed plugins, plus this one if its entry point is not visible (e.g. a stale egg-info on sys.path)."""
    host = edgeplug.PluginHost()
    if "activation-shortcut" not in host.passes():
        host.register(activation_shortcut, name="activation-shortcut", version="test")
    return host


HOST = make_host()


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], shape: list[int | str], classes: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "shortcut", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeplug-tests")
    model.ir_version = 8
    return model


def convnet(seed: int = 0) -> onnx.ModelProto:
    """Strided padded conv -> ReLU -> depthwise conv (asymmetric pads) -> ReLU6 -> strided conv -> GAP -> Gemm."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "c0.w", "c0.b"], ["y0"], name="c0", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["y0"], ["a0"], name="r0"),
        helper.make_node("Conv", ["a0", "c1.w", "c1.b"], ["y1"], name="c1", pads=[1, 0, 1, 2], group=4),
        helper.make_node("Clip", ["y1", "lo", "hi"], ["a1"], name="r1"),
        helper.make_node("Conv", ["a1", "c2.w"], ["y2"], name="c2", strides=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("GlobalAveragePool", ["y2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    inits = [_init("c0.w", rng.standard_normal((4, 3, 3, 3))), _init("c0.b", rng.standard_normal(4) * 0.1),
             _init("c1.w", rng.standard_normal((4, 1, 3, 3))), _init("c1.b", rng.standard_normal(4) * 0.1),
             _init("c2.w", rng.standard_normal((6, 4, 3, 3)) * 0.3), _init("lo", np.array(0.0)), _init("hi", np.array(6.0)),
             _init("fc.w", rng.standard_normal((5, 6))), _init("fc.b", np.zeros(5))]
    return _model(nodes, inits, ["N", 3, 9, 9], 5)


def rewrite(model: onnx.ModelProto, tmp: Path, name: str, shortcut: dict[str, Any] | None, *, before: list[dict[str, Any]] | None = None,
            calibration: dict[str, np.ndarray] | None = None) -> edgeplug.RewriteResult:
    passes = list(before or []) + ([{"name": "activation-shortcut", "options": shortcut}] if shortcut is not None else [])
    return edgeplug.rewrite(model, recipe_from_dict({**BASE, "passes": passes}, host=HOST), tmp / name, force=True,
                            calibration=calibration, host=HOST)


def run_training_graph(artifacts: Path, model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    parameters = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return calibrate.capture(onnx.load(str(artifacts / "training_model.onnx")), parameters, feeds, names)


def factor_feeds(artifacts: Path, rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
    """Random orthonormal factors for every factor input of the rewritten graph."""
    feeds = {}
    for value in onnx.load(str(artifacts / "training_model.onnx")).graph.input:
        if ".asi.U" in value.name:
            dims = [d.dim_value or batch for d in value.type.tensor_type.shape.dim]
            feeds[value.name] = tucker.orth(rng.standard_normal(dims))
    return feeds


def approximation(x: np.ndarray, feeds: dict[str, np.ndarray], node: str, *, axis: int = 1, center: bool = True) -> np.ndarray:
    """What the graph's weight gradient sees: the per-channel mean (kept exactly, `center`) plus the Tucker
    form of the rest, its factors refreshed once from the fed ones, channel mode first (tucker.asi_step)."""
    fed = [feeds.get(f"{node}.asi.U{mode}") for mode in range(x.ndim)]
    mean, factors, core = tucker.asi_step(x, fed, axis, center)
    return (0 if mean is None else mean) + tucker.reconstruct(core, factors)


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def batch(rng: np.random.Generator, shape: tuple[int, ...], classes: int) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal(shape).astype(np.float32), "labels": rng.integers(0, classes, shape[0]).astype(np.int64)}


def backward_readers(training: onnx.ModelProto, tensor: str) -> list[str]:
    """Written independently of the pass: backward = fed by the loss gradient seed or named `<node>_Grad/`."""
    index = GraphIndex(training)
    backward = index.descendants([f"{training.graph.output[0].name}_grad"], float_only=False)
    backward |= {n.name for n in training.graph.node if "_Grad/" in n.name or n.op_type == "InPlaceAccumulatorV2"}
    return [n.name for n in training.graph.node if n.name in backward and n.op_type not in ("Shape", "Size") and tensor in n.input]


GRADS = ["c0.w_grad", "c0.b_grad", "c1.w_grad", "c1.b_grad", "c2.w_grad", "fc.w_grad", "fc.b_grad"]


@pytest.mark.parametrize("compress_batch", [False, True])
def test_full_ranks_give_vanillas_gradients(tmp_path: Path, compress_batch: bool) -> None:
    model = convnet()
    rng = np.random.default_rng(0)
    feeds = batch(rng, (BATCH, 3, 9, 9), 5)
    rewrite(model, tmp_path, "vanilla", None)
    result = rewrite(model, tmp_path, "full", {"ranks": "full", "batch_size": BATCH, "compress_batch": compress_batch})
    vanilla = run_training_graph(tmp_path / "vanilla", model, feeds, GRADS)
    full = run_training_graph(tmp_path / "full", model, feeds, GRADS)
    for name in GRADS:
        assert relative(full[name], vanilla[name]) < 1e-4, name
    details = result.report["passes"][-1]["details"]
    assert [la["node"] for la in details["layers"]] == ["c0", "c1", "c2", "fc"]


@pytest.mark.parametrize("ranks_option,compress_batch", [([3, 2, 3, 2], True), ([4, 2, 2, 2], False), ([2, 1, 1, 1], True)])
def test_reduced_ranks_match_numpy_on_the_reconstruction(tmp_path: Path, ranks_option: list[int], compress_batch: bool) -> None:
    model = convnet()
    rng = np.random.default_rng(1)
    result = rewrite(model, tmp_path, "asi", {"ranks": ranks_option, "batch_size": BATCH, "compress_batch": compress_batch})
    rewrite(model, tmp_path, "vanilla", None)
    feeds = {**batch(rng, (BATCH, 3, 9, 9), 5), **factor_feeds(tmp_path / "asi", rng, BATCH)}
    nodes = {n.name: n for n in model.graph.node}
    weights = {n.input[1]: n for n in nodes.values() if n.op_type in ("Conv", "Gemm")}
    inputs = [t for n in weights.values() for t in (n.input[0], f"{n.output[0]}_grad")]
    vanilla = run_training_graph(tmp_path / "vanilla", model, feeds, inputs + GRADS)
    got = run_training_graph(tmp_path / "asi", model, feeds, GRADS)
    for weight, node in weights.items():
        x, dy = vanilla[node.input[0]], vanilla[f"{node.output[0]}_grad"]
        approx = approximation(x, feeds, node.name)
        if node.op_type == "Conv":
            expected = tucker.conv_weight_grad(approx, dy, conv_geometry(node, x.shape, numpy_helper.to_array(
                next(t for t in model.graph.initializer if t.name == weight)).shape))
        else:
            expected = tucker.linear_weight_grad(approx, dy).T
        assert relative(got[f"{weight}_grad"], expected) < 1e-4, weight
        assert relative(got[f"{weight}_grad"], vanilla[f"{weight}_grad"]) > 1e-3, f"{weight}: ranks {ranks_option} should lose something"
    # biases and the first layer's input gradient path stay exact
    for name in ("c1.b_grad", "fc.b_grad", "c0.b_grad"):
        assert relative(got[name], vanilla[name]) < 1e-4 or name == "c0.b_grad"
    assert result.report["passes"][-1]["details"]["compressed_bytes"] < result.report["passes"][-1]["details"]["vanilla_bytes"]


def test_gradient_filter_matches_its_formula(tmp_path: Path) -> None:
    model = convnet()
    rng = np.random.default_rng(2)
    result = rewrite(model, tmp_path, "gf", {"method": "gradient-filter", "patch": 2, "batch_size": BATCH})
    rewrite(model, tmp_path, "vanilla", None)
    feeds = batch(rng, (BATCH, 3, 9, 9), 5)
    nodes = [n for n in model.graph.node if n.op_type == "Conv"]
    names = [t for n in nodes for t in (n.input[0], f"{n.output[0]}_grad")]
    vanilla = run_training_graph(tmp_path / "vanilla", model, feeds, names + GRADS)
    got = run_training_graph(tmp_path / "gf", model, feeds, GRADS)
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in nodes:
        x, dy = vanilla[node.input[0]], vanilla[f"{node.output[0]}_grad"]
        expected = tucker.filter_weight_grad(x, dy, conv_geometry(node, x.shape, shapes[node.input[1]]), 2)
        assert relative(got[f"{node.input[1]}_grad"], expected) < 1e-4, node.name
    assert relative(got["fc.w_grad"], vanilla["fc.w_grad"]) < 1e-6  # linear layers are left alone
    details = result.report["passes"][-1]["details"]
    assert details["skipped"] == [{"node": "fc", "reason": "gradient-filter applies to Conv only"}]


def test_no_backward_node_reads_a_compressed_input(tmp_path: Path) -> None:
    model = convnet()
    rewrite(model, tmp_path, "vanilla", None)
    result = rewrite(model, tmp_path, "asi", {"ranks": [4, 2, 2, 2], "batch_size": BATCH})
    vanilla = onnx.load(str(tmp_path / "vanilla" / "training_model.onnx"))
    rewritten = onnx.load(str(tmp_path / "asi" / "training_model.onnx"))
    for tensor in ("x", "a1", "f"):  # inputs of c0, c2, fc
        assert backward_readers(vanilla, tensor), tensor
        assert backward_readers(rewritten, tensor) == [], tensor
    # c1's input is the ReLU output, which ReluGrad reads: only the conv's own reader is gone
    assert any("c1_Grad" in name for name in backward_readers(vanilla, "a0"))
    assert backward_readers(rewritten, "a0") == ["r0_Grad/ReluGrad_0"]
    layers = {la["node"]: la for la in result.report["passes"][-1]["details"]["layers"]}
    assert [layers[n]["input_freed"] for n in ("c0", "c1", "c2", "fc")] == [True, False, True, True]


@st.composite
def conv_cases(draw: st.DrawFn) -> dict[str, Any]:
    group = draw(st.sampled_from([1, 2, 4]))
    channels = group * draw(st.integers(1, 2))
    out = group * draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), 1)
    pads = [draw(st.integers(0, 1)) for _ in range(4)]
    size = (draw(st.integers(5, 8)), draw(st.integers(5, 8)))
    ranks = [draw(st.integers(1, 3)), draw(st.integers(1, channels)), draw(st.integers(1, size[0])), draw(st.integers(1, size[1]))]
    return {"group": group, "channels": channels, "out": out, "kernel": kernel, "stride": stride, "dilation": dilation,
            "pads": pads, "size": size, "ranks": ranks, "compress_batch": draw(st.booleans()), "center": draw(st.booleans())}


def single_conv(case: dict[str, Any], seed: int) -> onnx.ModelProto:
    """A trainable 1x1 conv (so the compressed conv's input gradient matters) -> the conv under test -> GAP -> Gemm."""
    rng = np.random.default_rng(seed)
    c, o, g = case["channels"], case["out"], case["group"]
    nodes = [
        helper.make_node("Conv", ["x", "pre.w"], ["x1"], name="pre"),
        helper.make_node("Conv", ["x1", "conv.w", "conv.b"], ["y"], name="conv", kernel_shape=list(case["kernel"]),
                         strides=list(case["stride"]), dilations=list(case["dilation"]), pads=case["pads"], group=g),
        helper.make_node("GlobalAveragePool", ["y"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w"], ["logits"], name="fc", transB=1),
    ]
    inits = [_init("pre.w", rng.standard_normal((c, 2, 1, 1))), _init("conv.w", rng.standard_normal((o, c // g, *case["kernel"]))),
             _init("conv.b", rng.standard_normal(o)), _init("fc.w", rng.standard_normal((3, o)))]
    return _model(nodes, inits, ["N", 2, *case["size"]], 3)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=conv_cases())
def test_random_convs_compress_exactly_as_specified(tmp_path: Path, case: dict[str, Any]) -> None:
    """Any shape/stride/padding/dilation/groups: dW = numpy dW of the reconstruction, and dX stays exact
    (the trainable conv below gets vanilla's gradient)."""
    check_conv_case(tmp_path, case)


def test_a_depthwise_conv_whose_network_costs_more_rebuilds_its_input_in_backward(tmp_path: Path) -> None:
    """A depthwise conv with high spatial ranks: contracting the network costs more than rebuilding X~ from the core
    and factors in backward and running onnxruntime's ConvGrad on it, so that is what the graph does; the gradient
    is the same reconstruction's."""
    case = {"group": 8, "channels": 8, "out": 8, "kernel": (3, 3), "stride": (1, 1), "dilation": (1, 1), "pads": [1, 1, 1, 1],
            "size": (12, 12), "ranks": [BATCH, 6, 10, 10], "compress_batch": False, "center": True}
    check_conv_case(tmp_path, case)
    training = onnx.load(str(tmp_path / "asi" / "training_model.onnx"))
    assert any(n.op_type == "ConvGrad" and ".asi.dW" in n.name for n in training.graph.node)


def check_conv_case(tmp_path: Path, case: dict[str, Any]) -> None:
    (h, w), (kh, kw), (dh, _) = case["size"], case["kernel"], case["dilation"]
    if h + case["pads"][0] + case["pads"][2] < (kh - 1) * dh + 1 or w + case["pads"][1] + case["pads"][3] < kw:
        return
    model = single_conv(case, 0)
    rng = np.random.default_rng(3)
    options = {"ranks": case["ranks"], "batch_size": BATCH, "compress_batch": case["compress_batch"], "include": ["conv"],
               "center": case["center"]}
    rewrite(model, tmp_path, "vanilla", None)
    rewrite(model, tmp_path, "asi", options)
    feeds = {**batch(rng, (BATCH, 2, h, w), 3), **factor_feeds(tmp_path / "asi", rng, BATCH)}
    vanilla = run_training_graph(tmp_path / "vanilla", model, feeds, ["x1", "y_grad", "pre.w_grad", "conv.b_grad"])
    got = run_training_graph(tmp_path / "asi", model, feeds, ["conv.w_grad", "pre.w_grad", "conv.b_grad"])
    x = vanilla["x1"]
    approx = approximation(x, feeds, "conv", center=case["center"])
    node = next(n for n in model.graph.node if n.name == "conv")
    expected = tucker.conv_weight_grad(approx, vanilla["y_grad"], conv_geometry(node, x.shape, (case["out"], case["channels"] // case["group"], kh, kw)))
    assert relative(got["conv.w_grad"], expected) < 1e-4
    assert relative(got["pre.w_grad"], vanilla["pre.w_grad"]) < 1e-4
    assert relative(got["conv.b_grad"], vanilla["conv.b_grad"]) < 1e-4
    assert backward_readers(onnx.load(str(tmp_path / "asi" / "training_model.onnx")), "x1") == []


def test_gradient_network_contracts_in_a_cheap_order_with_small_intermediates() -> None:
    """The weight-gradient network of a 5x5 depthwise conv of EfficientNet-Lite0 (7x7 maps, 1152 channels, batch 16,
    ranks (16, 16, 4, 4) with the batch whole): the fixed order used to build a 7.4 M-element intermediate (8x the padded
    input); the chosen order stays within the input and costs about what vanilla's dW does. A 1x1 expand conv costs
    12x less than vanilla. Numerically the pairwise steps equal one einsum of the whole network."""
    calls: list[str] = []
    depthwise = {"b": 16, "g": 1152, "o": 1, "c": 1, "i": 7, "j": 7, "u": 5, "v": 5, "f": 16, "k": 4, "l": 4}
    network = [contract.Operand("dY", "bgoij"), contract.Operand("U1", "gcf"), contract.Operand("W2", "uik"),
               contract.Operand("W3", "vjl"), contract.Operand("S", "bfkl")]
    limit = 16 * 1152 * 11 * 11
    _, macs, largest = contract.contract(network, depthwise, "gocuv", limit, lambda a, b, eq, step: calls.append(eq) or step)
    assert largest <= limit and macs < 1.2 * 16 * 1152 * 49 * 25 and len(calls) == 4
    expand = {"b": 16, "g": 1, "o": 1152, "c": 192, "i": 7, "j": 7, "f": 16, "k": 4, "l": 4}
    network = [contract.Operand("dY", "bgoij"), contract.Operand("U1", "gcf"), contract.Operand("W2", "ik"),
               contract.Operand("W3", "jl"), contract.Operand("S", "bfkl")]
    _, macs, largest = contract.contract(network, expand, "goc", 16 * 1152 * 49, lambda a, b, eq, step: step)
    assert macs * 12 < 16 * 1152 * 192 * 49 and largest <= 16 * 1152 * 49
    rng = np.random.default_rng(0)
    small = {"b": 3, "g": 2, "o": 2, "c": 3, "i": 4, "j": 3, "u": 2, "v": 3, "f": 2, "k": 3, "l": 2}
    network = [contract.Operand(n, t) for n, t in (("dY", "bgoij"), ("U1", "gcf"), ("W2", "uik"), ("W3", "vjl"), ("S", "bfkl"))]
    arrays = {op.name: rng.standard_normal([small[i] for i in op.indices]) for op in network}

    def evaluate(first: str, second: str, equation: str, step: str) -> str:
        arrays[step] = np.einsum(equation, arrays[first], arrays[second])
        return step

    result, _, _ = contract.contract(network, small, "gocuv", 10, evaluate)
    expected = np.einsum("bgoij,gcf,uik,vjl,bfkl->gocuv", *(arrays[op.name] for op in network))
    assert np.allclose(arrays[result], expected)


def test_a_zero_pad_in_front_of_a_conv_is_folded_into_the_compression(tmp_path: Path) -> None:
    """TF-style exports pad with a separate Pad node: ASI compresses the Pad's input (fewer values) with the Pad
    folded into the conv's padding; dW is that of the reconstruction, dX stays exact, neither the padded tensor
    nor its source is read by backward."""
    rng = np.random.default_rng(11)
    nodes = [
        helper.make_node("Conv", ["x", "pre.w"], ["x1"], name="pre"),
        helper.make_node("Constant", [], ["pads"], name="pads", value=numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 0, 2, 1], np.int64))),
        helper.make_node("Pad", ["x1", "pads"], ["xp"], name="pad", mode="constant"),
        helper.make_node("Conv", ["xp", "dw.w", "dw.b"], ["y"], name="dw", group=4, strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["y"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w"], ["logits"], name="fc", transB=1),
    ]
    inits = [_init("pre.w", rng.standard_normal((4, 2, 1, 1))), _init("dw.w", rng.standard_normal((4, 1, 3, 3))),
             _init("dw.b", rng.standard_normal(4)), _init("fc.w", rng.standard_normal((3, 4)))]
    model = _model(nodes, inits, ["N", 2, 7, 8], 3)
    rewrite(model, tmp_path, "vanilla", None)
    result = rewrite(model, tmp_path, "asi", {"ranks": [BATCH, 3, 4, 5], "batch_size": BATCH, "include": ["dw"]})
    layer = result.report["passes"][-1]["details"]["layers"][0]
    assert layer["input_shape"] == [BATCH, 4, 10, 9] and layer["compressed_input"]["shape"] == [BATCH, 4, 7, 8]
    assert layer["compressed_input"]["pads"] == [1, 0, 2, 1] and layer["input_freed"]
    feeds = {**batch(rng, (BATCH, 2, 7, 8), 3), **factor_feeds(tmp_path / "asi", rng, BATCH)}
    vanilla = run_training_graph(tmp_path / "vanilla", model, feeds, ["x1", "y_grad", "pre.w_grad", "dw.b_grad"])
    got = run_training_graph(tmp_path / "asi", model, feeds, ["dw.w_grad", "pre.w_grad", "dw.b_grad"])
    approx = approximation(vanilla["x1"], feeds, "dw")
    geometry = layers_module.ConvGeometry((3, 3), (2, 2), (1, 1), (1, 0, 2, 1), 4)
    assert relative(got["dw.w_grad"], tucker.conv_weight_grad(approx, vanilla["y_grad"], geometry)) < 1e-4
    assert relative(got["pre.w_grad"], vanilla["pre.w_grad"]) < 1e-4 and relative(got["dw.b_grad"], vanilla["dw.b_grad"]) < 1e-4
    training = onnx.load(str(tmp_path / "asi" / "training_model.onnx"))
    assert backward_readers(training, "xp") == [] and backward_readers(training, "x1") == []


def test_matmul_layer_with_sequence_input(tmp_path: Path) -> None:
    """MatMul on a [B, L, I] input: dW from the 3-mode Tucker form."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("ReduceMean", ["h"], ["logits"], name="mean", axes=[1], keepdims=0)]
    model = _model(nodes, [_init("w", rng.standard_normal((6, 4)))], ["N", 5, 6], 4)
    rewrite(model, tmp_path, "vanilla", None)
    rewrite(model, tmp_path, "asi", {"ranks": [3, 2, 3], "batch_size": BATCH, "compress_batch": True})
    feeds = {"x": rng.standard_normal((BATCH, 5, 6)).astype(np.float32), "labels": rng.integers(0, 4, BATCH).astype(np.int64),
             **factor_feeds(tmp_path / "asi", rng, BATCH)}
    vanilla = run_training_graph(tmp_path / "vanilla", model, feeds, ["h_grad"])
    got = run_training_graph(tmp_path / "asi", model, feeds, ["w_grad"])
    approx = approximation(feeds["x"], feeds, "mm", axis=2)
    assert relative(got["w_grad"], tucker.linear_weight_grad(approx, vanilla["h_grad"])) < 1e-4


def test_budgeted_choice_is_the_best_under_the_budget() -> None:
    rng = np.random.default_rng(5)
    options = [[ranks.Candidate(0.5, (1,), int(rng.integers(10, 100)), float(rng.random()), 0.0) for _ in range(4)] for _ in range(4)]
    for budget in (60, 150, 250, 400):
        feasible = [p for p in itertools.product(range(4), repeat=4) if sum(options[i][c].bytes for i, c in enumerate(p)) <= budget]
        if not feasible:
            with pytest.raises(RecipeError, match="memory_budget_bytes"):
                ranks.choose(options, budget)
            continue
        best = min(sum(options[i][c].error for i, c in enumerate(p)) for p in feasible)
        picks = ranks.choose(options, budget)
        assert sum(options[i][c].bytes for i, c in enumerate(picks)) <= budget
        assert sum(options[i][c].error for i, c in enumerate(picks)) == pytest.approx(best)


def toy_data(n: int = 48, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 9, 9)).astype(np.float32)
    y = (x[:, 0, :4].mean(axis=(1, 2)) > 0).astype(np.int64) + 2 * (x[:, 1, :, :4].mean(axis=(1, 2)) > 0).astype(np.int64)
    return {"x": x, "y": y}


def test_memory_budget_selects_ranks_and_reports_them(tmp_path: Path) -> None:
    data = toy_data()
    budget = 2000
    result = rewrite(convnet(), tmp_path, "asi", {"memory_budget_bytes": budget, "batch_size": 8}, calibration=data)
    details = result.report["passes"][-1]["details"]
    chosen = details["rank_selection"]["chosen"]
    assert set(chosen) == {"c0", "c1", "c2", "fc"}
    assert sum(c["bytes"] for c in chosen.values()) <= budget
    for layer in details["layers"]:
        assert layer["ranks"] == chosen[layer["node"]]["ranks"]
        assert layer["compressed_bytes"] == chosen[layer["node"]]["bytes"]
        assert 0 <= layer["relative_gradient_error"] < 1
    with pytest.raises(RecipeError, match="memory_budget_bytes 10 is below"):
        rewrite(convnet(), tmp_path, "tiny", {"memory_budget_bytes": 10, "batch_size": 8}, calibration=data)


def test_compression_ratio_budget_scales_with_the_chosen_layers(tmp_path: Path) -> None:
    """`compression` budgets 1/ratio of whatever layers are chosen, so one recipe holds at any input size."""
    data = toy_data()
    for name, options in (("all", {}), ("last", {"last": 2})):
        details = rewrite(convnet(), tmp_path, name, {"compression": 4, "batch_size": 8, **options}, calibration=data).report["passes"][-1]["details"]
        assert details["rank_selection"]["memory_budget_bytes"] == details["vanilla_bytes"] // 4
        assert details["compressed_bytes"] <= details["vanilla_bytes"] / 4
    with pytest.raises(RecipeError, match=r"compression 100000 is more than these layers allow: at most \d"):
        rewrite(convnet(), tmp_path, "much", {"compression": 100000, "batch_size": 8}, calibration=data)


def test_nothing_to_compress_leaves_the_graph_alone(tmp_path: Path) -> None:
    """A composed recipe whose earlier pass trains no layer of op_types (sparse-update choosing only the classifier)
    or patterns that leave no layer: a report line, the training graph as generated, and training works."""
    for name, options, before in (
        ("patterns", {"ranks": "full", "include": ["nothing*"]}, []),
        ("classifier", {"compression": 10, "op_types": ["Conv"], "batch_size": 8}, [{"name": "trainable", "options": {"layers": "classifier"}}]),
    ):
        result = rewrite(convnet(), tmp_path, name, options, before=before, calibration=toy_data())
        entry = result.report["passes"][-1]
        assert not entry["changed"] and "nothing to compress" in entry["summary"], entry
        assert not any(".asi." in n.name for n in onnx.load(str(tmp_path / name / "training_model.onnx")).graph.node)
        assert result.report["training"]["carried_state"] == []
    fit = edgeplug.Trainer(tmp_path / "classifier", progress=False, host=HOST).fit(toy_data(), epochs=2, batch_size=8)
    assert fit.steps_run == 12


def test_trains_and_resumes_with_the_carried_factors(tmp_path: Path) -> None:
    data = toy_data()
    options = {"energy": 0.7, "batch_size": 8, "compress_batch": True}
    rewrite(convnet(), tmp_path, "once", options, calibration=data)
    rewrite(convnet(), tmp_path, "twice", options, calibration=data)
    straight = edgeplug.Trainer(tmp_path / "once", progress=False, host=HOST).fit(data, epochs=4, batch_size=8)
    losses = [e.train.loss for e in straight.epochs]
    assert losses[-1] < losses[0] * 0.8
    edgeplug.Trainer(tmp_path / "twice", progress=False, host=HOST).fit(data, epochs=2, batch_size=8)
    assert next((tmp_path / "twice" / "checkpoints").glob("step-*/carried_state.safetensors")).is_file()
    trainer = edgeplug.Trainer(tmp_path / "twice", progress=False, host=HOST)
    resumed = trainer.fit(data, epochs=4, batch_size=8)
    assert [e.train.loss for e in resumed.epochs] == pytest.approx(losses, rel=1e-5)
    # evaluation and export: the factor inputs are training-only, the inference model does not take them
    assert trainer.evaluate(data).accuracy is not None
    exported = onnx.load(str(edgeplug.export(tmp_path / "twice", tmp_path / "trained.onnx")))
    assert [value.name for value in exported.graph.input] == ["x"]


def test_composes_with_trainable_and_sparse_update(tmp_path: Path) -> None:
    model = convnet()
    result = rewrite(model, tmp_path, "trainable", {"ranks": [4, 2, 2, 2], "batch_size": BATCH},
                     before=[{"name": "trainable", "options": {"include": ["c2.w", "fc.*"]}}])
    assert [la["node"] for la in result.report["passes"][-1]["details"]["layers"]] == ["c2", "fc"]
    split = rewrite(model, tmp_path, "sparse", {"ranks": [4, 2, 2, 2], "batch_size": BATCH, "op_types": ["Conv"]},
                    before=[{"name": "sparse-update", "options": {"strategy": "last-k", "layers": 2, "batch_size": BATCH,
                                                                  "channel_ratio": 0.5, "classifier": "candidate"}}])
    trained = set(split.report["parameters"]["trainable"])
    layers = split.report["passes"][-1]["details"]["layers"]
    assert layers and all(la["weight"] in trained for la in layers)
    assert all(la["input_freed"] for la in layers)


@pytest.mark.parametrize("options,calibrated,message", [
    ({}, False, "needs exactly one of"),
    ({"memory_budget_bytes": 1000}, False, "calibration"),
    ({"method": "gradient-filter", "ranks": "full"}, False, "only apply to method 'asi'"),
    ({"compression": 20}, False, "calibration"),
    ({"compression": 20, "ranks": "full"}, False, "needs exactly one of"),
])
def test_bad_options_are_recipe_errors(tmp_path: Path, options: dict[str, Any], calibrated: bool, message: str) -> None:
    with pytest.raises(edgeplug.EdgeplugError, match=message):
        rewrite(convnet(), tmp_path, "bad", options, calibration=toy_data() if calibrated else None)


def test_compression_runs_in_forward_so_the_input_can_be_freed(tmp_path: Path) -> None:
    """onnxruntime's own execution order (profiled): every compression node runs before the loss gradient.
    Without the anchor the compression, read only by backward and graph outputs, ran at the end of the step."""
    model = convnet()
    rewrite(model, tmp_path, "asi", {"ranks": [2, 2, 2, 2], "batch_size": BATCH, "compress_batch": True})
    rewrite(model, tmp_path, "gf", {"method": "gradient-filter", "batch_size": BATCH})
    rng = np.random.default_rng(6)
    parameters = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, marker in (("asi", ".asi."), ("gf", ".gf.")):
        training = onnx.load(str(tmp_path / name / "training_model.onnx"))
        options = _ort.inference_runtime().SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(tmp_path / f"profile-{name}")
        session = _ort.inference_runtime().InferenceSession(training.SerializeToString(), options,
                                                                      providers=["CPUExecutionProvider"])
        feeds = {**batch(rng, (BATCH, 3, 9, 9), 5), **factor_feeds(tmp_path / name, rng, BATCH), "lazy_reset_grad": np.array([True])}
        for value in session.get_inputs():
            if value.name in parameters:
                feeds[value.name] = parameters[value.name]
            elif value.name.endswith("_grad.accumulation.buffer"):
                feeds[value.name] = np.zeros_like(parameters[value.name[: -len("_grad.accumulation.buffer")]])
        session.run(None, {value.name: feeds[value.name] for value in session.get_inputs()})
        events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
        order = [e["name"].removesuffix("_kernel_time") for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        seed = min(i for i, n in enumerate(order) if "SoftmaxCrossEntropyLossGrad" in n)
        compression = [i for i, n in enumerate(order) if marker in n and ".dW" not in n and ".shortcut." not in n]
        assert compression and max(compression) < seed, name


def test_factors_are_refreshed_in_the_graph_from_this_steps_input(tmp_path: Path) -> None:
    """Two steps on two batches: the factors the graph outputs are orthonormal, and the second step
    compresses its input with factors refreshed from that input, not with the first step's: its
    weight gradients are closer to vanilla's than those from the carried (one step old) factors,
    which is what the graph computed before the refresh moved into it. Only the batch mode is
    compressed (rank 3 of 8): the mode whose subspace changes completely from batch to batch."""
    model = convnet()
    rewrite(model, tmp_path, "vanilla", None)
    rewrite(model, tmp_path, "asi", {"ranks": [3], "batch_size": 8, "compress_batch": True, "center": False})
    # like real activations: a few patterns (the same in every batch), mixed differently in each sample
    rng = np.random.default_rng(7)
    patterns = rng.standard_normal((3, 3, 9, 9))
    first, second = ({"x": (np.einsum("bj,jchw->bchw", rng.standard_normal((8, 3)), patterns)
                            + 0.05 * rng.standard_normal((8, 3, 9, 9))).astype(np.float32),
                      "labels": rng.integers(0, 5, 8).astype(np.int64)} for _ in range(2))
    fed = factor_feeds(tmp_path / "asi", np.random.default_rng(6), 8)
    carried = run_training_graph(tmp_path / "asi", model, {**first, **fed}, [f"{name}.next" for name in fed])
    for name, factor in carried.items():
        assert factor.shape == fed[name[: -len(".next")]].shape
        assert np.abs(factor.T @ factor - np.eye(factor.shape[1])).max() < 1e-4, name
    stale = {name[: -len(".next")]: factor for name, factor in carried.items()}
    nodes = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    names = [t for n in nodes.values() for t in (n.input[0], f"{n.output[0]}_grad", f"{n.input[1]}_grad")]
    vanilla = run_training_graph(tmp_path / "vanilla", model, second, names)
    got = run_training_graph(tmp_path / "asi", model, {**second, **stale}, [f"{n.input[1]}_grad" for n in nodes.values()])
    refreshed_error, lagged_error = [], []
    for name, node in nodes.items():
        x, dy, exact = vanilla[node.input[0]], vanilla[f"{node.output[0]}_grad"], vanilla[f"{node.input[1]}_grad"]
        factors = [stale.get(f"{name}.asi.U{mode}") for mode in range(4)]
        lagged = tucker.conv_weight_grad(tucker.reconstruct(tucker.compress(x, factors), factors), dy,
                                         conv_geometry(node, x.shape, exact.shape))
        refreshed_error.append(np.linalg.norm(got[f"{node.input[1]}_grad"] - exact) / np.linalg.norm(exact))
        lagged_error.append(np.linalg.norm(lagged - exact) / np.linalg.norm(exact))
    # c0 reads the data itself, whose batch mode has rank 3 (+ noise): refreshed, rank 3 keeps it
    assert refreshed_error[0] < 0.05 and lagged_error[0] > 0.3, (refreshed_error, lagged_error)
    assert sum(refreshed_error) < 0.8 * sum(lagged_error), (refreshed_error, lagged_error)


def test_profile_measures_an_asi_folder(tmp_path: Path) -> None:
    """report.json lists the factor inputs the hook feeds, so `edgeplug profile` can run the training
    model (it feeds arrays of their declared shape); the eval model does not take them."""
    rewrite(convnet(), tmp_path, "asi", {"ranks": [2, 2, 3, 3], "batch_size": 8, "compress_batch": True})
    report = json.loads((tmp_path / "asi" / "report.json").read_text(encoding="utf-8"))
    training_inputs = {v.name for v in onnx.load(str(tmp_path / "asi" / "training_model.onnx")).graph.input}
    factors = {name for name in training_inputs if ".asi.U" in name}
    assert factors and {e["name"] for e in report["training"]["extra_inputs"]} == factors
    assert not any(".asi." in v.name for v in onnx.load(str(tmp_path / "asi" / "eval_model.onnx")).graph.input)
    measured = measure(tmp_path / "asi", batch_size=8, steps=1, warmup=0)
    assert measured.median_step_seconds > 0 and measured.train_peak_rss_bytes > 0


def test_profile_counts_the_compressed_layers_real_costs(tmp_path: Path) -> None:
    """`edgeplug profile`'s static count takes the pass's own numbers (report details.static_costs): the compressed
    layers' backward MACs are the rewritten graph's, their kept tensors are counted instead of their inputs, no
    tensor of the pass is of unknown shape; at another batch size the counts scale."""
    rewrite(convnet(), tmp_path, "vanilla", None)
    for name, options in (("asi", {"ranks": [4, 2, 2, 2], "batch_size": BATCH}), ("gf", {"method": "gradient-filter", "batch_size": BATCH})):
        details = rewrite(convnet(), tmp_path, name, options).report["passes"][-1]["details"]
        profile, vanilla = static_profile(tmp_path / name, BATCH), static_profile(tmp_path / "vanilla", BATCH)
        compressed = {la["node"] for la in details["layers"]}
        by_node = {n.name: n for n in profile.nodes}
        assert sum(by_node[n].backward_macs for n in compressed) == details["backward_macs"] < details["vanilla_backward_macs"]
        assert profile.backward_macs == vanilla.backward_macs - details["vanilla_backward_macs"] + details["backward_macs"]
        assert profile.unknown_shapes == () and profile.retained_activation_bytes < vanilla.retained_activation_bytes
        kept = {t.name for t in profile.retained}
        cores = {name for layer in details["layers"] for name in layer["stored"] if ".U" not in name and not name.endswith(".mean")}
        assert cores <= kept  # the core / pooled input (factors and the mean reach backward through small views)
        assert static_profile(tmp_path / name, 2 * BATCH).backward_macs > profile.backward_macs


def test_factors_are_carried_state_that_any_runtime_keeps(tmp_path: Path) -> None:
    """No Python hook: every factor is declared step-carried state (input U_m, output U_m.next, initial value the
    calibration batch's HOSVD factor; batch-mode factors depend on the batch size), so the device contract does not
    need Python, and the Python trainer carries it through a partial last batch (fed an identity warm start)."""
    data = toy_data(n=44)
    result = rewrite(convnet(), tmp_path, "asi", {"energy": 0.7, "batch_size": 8, "compress_batch": True}, calibration=data)
    report = result.report
    assert not report["device_runtime"]["needs_python"], report["device_runtime"]["needs_python_because"]
    carried = {entry["input"]: entry for entry in report["training"]["carried_state"]}
    training = onnx.load(str(tmp_path / "asi" / "training_model.onnx"))
    assert set(carried) == {v.name for v in training.graph.input if ".asi.U" in v.name} != set()
    assert {o.name for o in training.graph.output} >= {entry["output"] for entry in carried.values()}
    for name, entry in carried.items():
        assert entry["output"] == f"{name}.next"
        assert entry["batch_axis"] == (0 if name.endswith(".U0") else None)
    fit = edgeplug.Trainer(tmp_path / "asi", progress=False, host=HOST).fit(data, epochs=3, batch_size=8)  # 5 x 8 + 4
    assert fit.steps_run == 18 and np.isfinite(fit.epochs[-1].train.loss)
