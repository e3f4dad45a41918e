"""Hand-built ONNX models for tests: small MLPs and CNNs with seeded weights."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def mlp(
    features: int = 8,
    hidden: Sequence[int] = (16,),
    classes: int = 3,
    *,
    activation: str = "Relu",
    seed: int = 0,
    batch: int | str = "N",
    opset: int = 17,
) -> onnx.ModelProto:
    """x[batch, features] -> (Gemm -> activation)* -> Gemm -> logits[batch, classes]."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    previous, width = "x", features
    for i, size in enumerate([*hidden, classes]):
        w, b = f"fc{i}.weight", f"fc{i}.bias"
        inits += [_init(w, rng.standard_normal((width, size)) / np.sqrt(width)), _init(b, rng.standard_normal(size) * 0.01)]
        out = "logits" if i == len(hidden) else f"h{i}"
        nodes.append(helper.make_node("Gemm", [previous, w, b], [out], name=f"fc{i}"))
        if i < len(hidden):
            nodes.append(helper.make_node(activation, [out], [f"a{i}"], name=f"act{i}"))
            out = f"a{i}"
        previous, width = out, size
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgeplug-tests")
    model.ir_version = 8
    return model


def cnn(
    channels: Sequence[int] = (4, 8),
    classes: int = 10,
    *,
    image: int = 8,
    in_channels: int = 1,
    batch_norm: bool = True,
    activation: str = "Relu",
    seed: int = 0,
    batch: int | str = "N",
    opset: int = 17,
) -> onnx.ModelProto:
    """x[batch, in, image, image] -> (Conv [-> BN] -> act)* -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    previous, width = "x", in_channels
    for i, size in enumerate(channels):
        w, b = f"conv{i}.weight", f"conv{i}.bias"
        inits += [_init(w, rng.standard_normal((size, width, 3, 3)) * np.sqrt(2.0 / (width * 9))), _init(b, np.zeros(size))]
        nodes.append(helper.make_node("Conv", [previous, w, b], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        out = f"c{i}"
        if batch_norm:
            names = [f"bn{i}.{p}" for p in ("scale", "bias", "mean", "var")]
            inits += [
                _init(names[0], 1 + 0.1 * rng.standard_normal(size)), _init(names[1], 0.1 * rng.standard_normal(size)),
                _init(names[2], 0.1 * rng.standard_normal(size)), _init(names[3], 1 + 0.1 * rng.random(size)),
            ]
            nodes.append(helper.make_node("BatchNormalization", [out, *names], [f"n{i}"], name=f"bn{i}"))
            out = f"n{i}"
        nodes.append(helper.make_node(activation, [out], [f"a{i}"], name=f"act{i}"))
        previous, width = f"a{i}", size
    nodes += [
        helper.make_node("GlobalAveragePool", [previous], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc"),
    ]
    inits += [_init("fc.weight", rng.standard_normal((width, classes)) / np.sqrt(width)), _init("fc.bias", np.zeros(classes))]
    graph = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, in_channels, image, image])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgeplug-tests")
    model.ir_version = 8
    return model


def classification_data(model_input: Sequence[int], classes: int, n: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Separable synthetic data: class k shifts the input mean by a fixed random direction."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((classes, *model_input)).astype(np.float32)
    labels = rng.integers(0, classes, size=n)
    x = rng.standard_normal((n, *model_input)).astype(np.float32) * 0.5 + directions[labels]
    return {"x": x, "y": labels.astype(np.int64)}


def write_plugin_distribution(site: Path, entry_name: str, module: str, code: str, *, version: str = "1.0") -> None:
    """Write `module`.py and a `*.dist-info` whose `edgeplug` entry point `entry_name` names it.

    Enough for importlib.metadata once `site` is on sys.path or PYTHONPATH; no pip install.
    """
    distribution = f"fake_{module}"
    (site / f"{module}.py").write_text(textwrap.dedent(code), encoding="utf-8")
    info = site / f"{distribution}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[edgeplug]\n{entry_name} = {module}\n", encoding="utf-8")


def with_subgraph(kind: str = "If", *, seed: int = 0, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """x[N,8] -> fc0 -> Relu -> a If/Loop whose body alone reads `scaled` (= a0 * 2, made outside it)
    -> fc1 -> logits[N,3]. Only the body reads `scaled`: its producer must survive pruning."""
    rng = np.random.default_rng(seed)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)

    def init(name: str, array: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(array, dtype=np_dtype), name)

    inits = [init("fc0.weight", rng.standard_normal((8, 16)) / 3), init("fc0.bias", np.zeros(16)),
             init("fc1.weight", rng.standard_normal((16, 3)) / 4), init("fc1.bias", np.zeros(3)), init("two", np.array(2.0))]
    nodes = [helper.make_node("Gemm", ["x", "fc0.weight", "fc0.bias"], ["h0"], name="fc0"),
             helper.make_node("Relu", ["h0"], ["a0"], name="act0"),
             helper.make_node("Mul", ["a0", "two"], ["scaled"], name="scale")]
    body_value = helper.make_tensor_value_info
    if kind == "If":
        then_graph = helper.make_graph([helper.make_node("Identity", ["scaled"], ["then_out"], name="then_id")], "then", [],
                                       [body_value("then_out", dtype, ["N", 16])])
        else_graph = helper.make_graph([helper.make_node("Identity", ["a0"], ["else_out"], name="else_id")], "else", [],
                                       [body_value("else_out", dtype, ["N", 16])])
        nodes += [helper.make_node("Constant", [], ["flag"], name="flag", value=helper.make_tensor("flag_value", TensorProto.BOOL, [], [True])),
                  helper.make_node("If", ["flag"], ["mixed"], name="branch", then_branch=then_graph, else_branch=else_graph)]
    elif kind == "Loop":
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
             helper.make_node("Add", ["carried", "scaled"], ["carried_out"], name="accumulate")],
            "body",
            [body_value("i", TensorProto.INT64, []), body_value("cond_in", TensorProto.BOOL, []), body_value("carried", dtype, ["N", 16])],
            [body_value("cond_out", TensorProto.BOOL, []), body_value("carried_out", dtype, ["N", 16])],
        )
        nodes += [helper.make_node("Constant", [], ["trips"], name="trips", value=helper.make_tensor("trips_value", TensorProto.INT64, [], [2])),
                  helper.make_node("Constant", [], ["go"], name="go", value=helper.make_tensor("go_value", TensorProto.BOOL, [], [True])),
                  helper.make_node("Loop", ["trips", "go", "a0"], ["mixed"], name="repeat", body=body)]
    else:
        raise ValueError(kind)
    nodes.append(helper.make_node("Gemm", ["mixed", "fc1.weight", "fc1.bias"], ["logits"], name="fc1"))
    graph = helper.make_graph(nodes, f"with_{kind.lower()}", [helper.make_tensor_value_info("x", dtype, ["N", 8])],
                              [helper.make_tensor_value_info("logits", dtype, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeplug-tests")
    model.ir_version = 8
    return model


FLEET_SPARSE_RECIPE = """loss: cross-entropy
optimizer: {name: adamw, lr: 0.01}
passes:
  - name: sparse-update
    options: {strategy: static, memory_budget_bytes: 100000, batch_size: 16, channel_ratio: 0.0625, min_channel_ratio: 0.0625}
  - name: freeze-bn
    options: {layers: all}
"""
"""The fleet tests' sparse recipe for the digits CNN: a few static channels of some layers travel, BN frozen."""
