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


FLEET_SPARSE_RECIPE = (Path(__file__).resolve().parents[1] / "examples" / "digits_fewshot" / "fleet_sparse_recipe.yaml").read_text()
"""The fleet tests' sparse recipe for the digits CNN: a few static channels of some layers travel, BN frozen."""


def two_input_encoder(vocab: int = 24, width: int = 12, hidden: int = 24, classes: int = 3, *, layers: int = 1,
                      seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """A BERT-style encoder with two inputs, token ids and an attention mask (int64 [batch, sequence]):
    embedding Gather -> LayerNorm -> `layers` x (single-head self-attention whose scores the mask biases, residual +
    LayerNorm, Relu feed-forward, residual + LayerNorm) -> masked mean pooling -> Gemm classifier. Its Linear
    layers are MatMul + Add on [batch, sequence, features], as torch exports them; the mask crosses every block."""
    rng = np.random.default_rng(seed)
    inits = [_init("embeddings.weight", rng.standard_normal((vocab, width)) * 0.5),
             _init("ln0.scale", rng.uniform(0.8, 1.2, width)), _init("ln0.bias", rng.uniform(-0.1, 0.1, width)),
             _init("one", np.array(1.0)), _init("big_negative", np.array(-1e4)), _init("tiny", np.array(1e-9)),
             _init("inverse_sqrt_width", np.array(1 / np.sqrt(width))),
             numpy_helper.from_array(np.array([1], np.int64), "axis1"), numpy_helper.from_array(np.array([2], np.int64), "axis2"),
             _init("classifier.weight", rng.standard_normal((width, classes)) / np.sqrt(width)),
             _init("classifier.bias", np.zeros(classes))]
    nodes = [helper.make_node("Gather", ["embeddings.weight", "input_ids"], ["embedded"], name="embeddings"),
             helper.make_node("LayerNormalization", ["embedded", "ln0.scale", "ln0.bias"], ["h0"], name="ln0", axis=-1),
             helper.make_node("Cast", ["attention_mask"], ["mask"], name="mask_cast", to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mask", "axis1"], ["mask_rows"], name="mask_rows"),
             helper.make_node("Sub", ["one", "mask_rows"], ["masked_out"], name="mask_invert"),
             helper.make_node("Mul", ["masked_out", "big_negative"], ["score_bias"], name="mask_bias")]

    def linear(name: str, source: str, fan_in: int, fan_out: int) -> str:
        inits.extend([_init(f"{name}.weight", rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)),
                      _init(f"{name}.bias", rng.standard_normal(fan_out) * 0.05)])
        nodes.extend([helper.make_node("MatMul", [source, f"{name}.weight"], [f"{name}.matmul"], name=f"{name}/MatMul"),
                      helper.make_node("Add", [f"{name}.matmul", f"{name}.bias"], [f"{name}.out"], name=f"{name}/Add")])
        return f"{name}.out"

    def norm(name: str, a: str, b: str) -> str:
        inits.extend([_init(f"{name}.scale", rng.uniform(0.8, 1.2, width)), _init(f"{name}.bias", rng.uniform(-0.1, 0.1, width))])
        nodes.extend([helper.make_node("Add", [a, b], [f"{name}.sum"], name=f"{name}/residual"),
                      helper.make_node("LayerNormalization", [f"{name}.sum", f"{name}.scale", f"{name}.bias"], [f"{name}.out"],
                                       name=name, axis=-1)])
        return f"{name}.out"

    h = "h0"
    for i in range(layers):
        p = f"layer{i}"
        q, k, v = (linear(f"{p}.{n}", h, width, width) for n in ("query", "key", "value"))
        nodes.extend([helper.make_node("Transpose", [k], [f"{p}.key_t"], name=f"{p}/key_t", perm=[0, 2, 1]),
                      helper.make_node("MatMul", [q, f"{p}.key_t"], [f"{p}.scores"], name=f"{p}/scores"),
                      helper.make_node("Mul", [f"{p}.scores", "inverse_sqrt_width"], [f"{p}.scaled"], name=f"{p}/scale"),
                      helper.make_node("Add", [f"{p}.scaled", "score_bias"], [f"{p}.biased"], name=f"{p}/mask"),
                      helper.make_node("Softmax", [f"{p}.biased"], [f"{p}.attention"], name=f"{p}/softmax", axis=-1),
                      helper.make_node("MatMul", [f"{p}.attention", v], [f"{p}.context"], name=f"{p}/context")])
        attended = norm(f"{p}.ln1", linear(f"{p}.output", f"{p}.context", width, width), h)
        up = linear(f"{p}.intermediate", attended, width, hidden)
        nodes.append(helper.make_node("Relu", [up], [f"{p}.relu"], name=f"{p}/relu"))
        h = norm(f"{p}.ln2", linear(f"{p}.down", f"{p}.relu", hidden, width), attended)
    nodes.extend([helper.make_node("Unsqueeze", ["mask", "axis2"], ["mask_tokens"], name="mask_tokens"),
                  helper.make_node("Mul", [h, "mask_tokens"], ["kept"], name="pool_mask"),
                  helper.make_node("ReduceSum", ["kept", "axis1"], ["summed"], name="pool_sum", keepdims=0),
                  helper.make_node("ReduceSum", ["mask_tokens", "axis1"], ["count"], name="pool_count", keepdims=0),
                  helper.make_node("Max", ["count", "tiny"], ["safe_count"], name="pool_safe"),
                  helper.make_node("Div", ["summed", "safe_count"], ["pooled"], name="pool"),
                  helper.make_node("Gemm", ["pooled", "classifier.weight", "classifier.bias"], ["logits"], name="classifier")])
    graph = helper.make_graph(
        nodes, "two_input_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgeplug-tests")
    model.ir_version = 8
    return model


def token_data(n: int = 64, sequence: int = 10, vocab: int = 24, classes: int = 3, *, seed: int = 0,
               shift: int = 0) -> dict[str, np.ndarray]:
    """Right-padded token ids and masks whose class is which third of the vocabulary most tokens come from
    (learnable by the encoder above); `shift` moves every token id up by that much (a drift: other words)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    band = (vocab - 1) // classes
    lengths = rng.integers(max(2, sequence // 3), sequence + 1, size=n)
    ids = np.zeros((n, sequence), np.int64)
    for row, (label, length) in enumerate(zip(labels, lengths)):
        own = rng.integers(1 + label * band, 1 + (label + 1) * band, size=length)
        noise = rng.integers(1, vocab, size=length)
        ids[row, :length] = np.where(rng.random(length) < 0.7, own, noise)
    ids = np.where(ids > 0, (ids - 1 + shift) % (vocab - 1) + 1, 0)
    mask = (np.arange(sequence)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask, "y": labels.astype(np.int64)}
