"""The `lora` pass: adapters that start as the identity, train alone, merge back exactly, and compose with int8 frozen weights."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import edgeplug
from edgeplug import _ort
from edgeplug.errors import RecipeError
from edgeplug.recipe import recipe_from_dict

lora = importlib.import_module("edgeplug_plugins.lora.adapters")
qcore_frozen = importlib.import_module("edgeplug_plugins.qcore.frozen")

REPO = Path(__file__).resolve().parent.parent
TINY_BERT = REPO / "tests" / "fixtures" / "text" / "tiny_bert.onnx"


# -- generated graphs: stacks of MatMul/Gemm layers on 2-D or sequence inputs -------------------

@st.composite
def layer_stacks(draw: st.DrawFn) -> dict[str, Any]:
    sequence = draw(st.sampled_from([None, 3]))
    widths = draw(st.lists(st.integers(2, 9), min_size=1, max_size=4))
    kinds = [draw(st.sampled_from(["matmul", "matmul+bias", "gemm", "gemm-transB"] if sequence is None else ["matmul", "matmul+bias"]))
             for _ in widths]
    return {"features": draw(st.integers(2, 8)), "widths": widths, "kinds": kinds, "sequence": sequence,
            "classes": draw(st.integers(2, 5)), "activation": draw(st.sampled_from(["Relu", "Tanh", "Identity"])),
            "gemm_alpha": draw(st.sampled_from([1.0, 0.5])), "seed": draw(st.integers(0, 1000))}


def stack_model(case: dict[str, Any]) -> onnx.ModelProto:
    """x [N, (S,) F] -> layers -> (mean over S) -> Gemm classifier -> logits [N, classes]."""
    rng = np.random.default_rng(case["seed"])
    nodes, inits = [], []
    previous, width = "x", case["features"]

    def init(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    for i, (size, kind) in enumerate(zip(case["widths"], case["kinds"], strict=True)):
        out = f"h{i}"
        if kind.startswith("matmul"):
            w = init(f"l{i}.weight", rng.standard_normal((width, size)) / np.sqrt(width))
            nodes.append(helper.make_node("MatMul", [previous, w], [out + ("_mm" if kind == "matmul+bias" else "")], name=f"l{i}"))
            if kind == "matmul+bias":
                nodes.append(helper.make_node("Add", [out + "_mm", init(f"l{i}.bias", rng.standard_normal(size) * 0.1)], [out], name=f"l{i}_bias"))
        else:
            transposed = kind == "gemm-transB"
            w = init(f"l{i}.weight", rng.standard_normal((size, width) if transposed else (width, size)) / np.sqrt(width))
            nodes.append(helper.make_node("Gemm", [previous, w, init(f"l{i}.bias", rng.standard_normal(size) * 0.1)], [out], name=f"l{i}",
                                          transB=int(transposed), alpha=case["gemm_alpha"]))
        nodes.append(helper.make_node(case["activation"], [out], [f"a{i}"], name=f"act{i}"))
        previous, width = f"a{i}", size
    if case["sequence"] is not None:
        nodes.append(helper.make_node("ReduceMean", [previous], ["pooled"], name="pool", axes=[1], keepdims=0))
        previous = "pooled"
    w = init("head.weight", rng.standard_normal((width, case["classes"])) / np.sqrt(width))
    nodes.append(helper.make_node("Gemm", [previous, w, init("head.bias", np.zeros(case["classes"]))], ["logits"], name="head"))
    shape: list[int | str] = ["N", case["features"]] if case["sequence"] is None else ["N", case["sequence"], case["features"]]
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", case["classes"]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = _ort.inference_runtime().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def inputs_for(case: dict[str, Any], n: int = 5) -> np.ndarray:
    shape = (n, case["features"]) if case["sequence"] is None else (n, case["sequence"], case["features"])
    return np.random.default_rng(case["seed"] + 1).standard_normal(shape).astype(np.float32)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=layer_stacks(), rank=st.integers(1, 6), alpha=st.sampled_from([1.0, 8.0, 16.0]))
def test_adapters_start_as_the_identity_and_merge_back_exactly(case: dict[str, Any], rank: int, alpha: float) -> None:
    model = stack_model(case)
    x = inputs_for(case)
    targets, _ = lora.candidates(model, "logits")
    assert [t.node for t in targets] == [*(f"l{i}" for i in range(len(case["widths"]))), "head"]
    chosen, _ = lora.choose(targets, include=[], exclude=[], last=None, classifier=targets[-1], adapt_classifier=False)
    adapted, adapters = lora.insert(model, chosen, rank=rank, alpha=alpha, seed=case["seed"])
    onnx.checker.check_model(adapted, full_check=True)
    # B = 0: the adapted model computes what the model computed
    np.testing.assert_array_equal(run(adapted, x), run(model, x))
    for adapter, target in zip(adapters, chosen, strict=True):
        r = min(rank, target.in_features, target.out_features)
        shapes = {t.name: tuple(t.dims) for t in adapted.graph.initializer}
        assert shapes[adapter.a] == (target.in_features, r) and shapes[adapter.b] == (r, target.out_features)
    # "trained" adapters: the merged model computes what the adapted one computes, without a branch left
    rng = np.random.default_rng(case["seed"] + 2)
    for tensor in adapted.graph.initializer:
        if tensor.name.endswith(".lora_B") or tensor.name.endswith(".lora_A"):
            tensor.CopyFrom(numpy_helper.from_array(rng.standard_normal(tuple(tensor.dims)).astype(np.float32) * 0.3, tensor.name))
    merged, changes = lora.merge(adapted, adapters)
    onnx.checker.check_model(merged, full_check=True)
    np.testing.assert_allclose(run(merged, x), run(adapted, x), rtol=1e-4, atol=1e-4)
    assert not any("lora" in n.name for n in merged.graph.node) and not any("lora" in t.name for t in merged.graph.initializer)
    assert [n.op_type for n in merged.graph.node] == [n.op_type for n in model.graph.node]
    assert set(changes) == {a.weight for a in adapters}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=layer_stacks(), last=st.integers(1, 3))
def test_only_adapters_and_the_head_train_and_int8_bases_merge_exactly(case: dict[str, Any], last: int) -> None:
    """QLoRA-style: after quantize-frozen the adapted weights are DequantizeLinear outputs; merging computes them in float."""
    model = stack_model(case)
    x = inputs_for(case)
    targets, _ = lora.candidates(model, "logits")
    chosen, skipped = lora.choose(targets, include=[], exclude=[], last=last, classifier=targets[-1], adapt_classifier=False)
    assert len(chosen) == min(last, len(targets) - 1) and "head" in skipped
    adapted, adapters = lora.insert(model, chosen, rank=2, alpha=4.0, seed=0)
    parameters = {t.name for t in model.graph.initializer}
    head = lora.classifier_parameters(model, targets[-1])
    assert head == {"head.weight", "head.bias"}
    trainable = lora.trainable_after(parameters, adapters, classifier=head, classifier_mode="train", freeze_others=True)
    assert trainable == {n for a in adapters for n in (a.a, a.b)} | head
    quantized = qcore_frozen.quantize_frozen(adapted, trainable, bits=8, op_types=["Conv", "Gemm", "MatMul"], exclude=[])
    assert {q.weight for q in quantized.quantized} >= {a.weight for a in adapters}
    assert not {q.weight for q in quantized.quantized} & trainable
    rng = np.random.default_rng(3)
    model_q = quantized.model
    for tensor in model_q.graph.initializer:
        if tensor.name.endswith(".lora_B"):
            tensor.CopyFrom(numpy_helper.from_array(rng.standard_normal(tuple(tensor.dims)).astype(np.float32) * 0.3, tensor.name))
    merged, _ = lora.merge(model_q, adapters)
    onnx.checker.check_model(merged, full_check=True)
    np.testing.assert_allclose(run(merged, x), run(model_q, x), rtol=1e-4, atol=1e-4)
    adapted_weights = {a.weight for a in adapters}
    floats = {t.name for t in merged.graph.initializer if t.data_type == TensorProto.FLOAT}
    assert adapted_weights <= floats  # merged weights are float again; the other frozen weights stay int8
    assert sum(n.op_type == "DequantizeLinear" for n in merged.graph.node) == len(quantized.quantized) - len(adapters)


def test_shared_and_activation_weights_are_not_adapted() -> None:
    """A weight read by two layers stays without adapter (a merge would change both); MatMul of two activations is no layer."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="first"), helper.make_node("MatMul", ["a", "w"], ["b"], name="second"),
             helper.make_node("MatMul", ["a", "b"], ["c"], name="outer")]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    targets, skipped = lora.candidates(model, "c")
    assert targets == [] and "shared by 2 nodes" in skipped["first"] and "outer" not in skipped


def rewrite(tmp: Path, passes: list[dict[str, Any]], data: dict[str, np.ndarray]) -> dict[str, Any]:
    recipe = {"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.01}, "passes": [{"name": "new-head"}, *passes]}
    edgeplug.rewrite(TINY_BERT, recipe_from_dict(recipe), tmp, force=True, calibration=data)
    import json

    return json.loads((tmp / "report.json").read_text())


def text_data(n: int = 24, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 11, n)
    mask = (np.arange(10)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, 128, (n, 10)) * mask
    return {"input_ids": ids, "attention_mask": mask, "y": (ids[:, 1] % 3).astype(np.int64)}


@pytest.mark.parametrize("quantize", [False, True])
def test_tiny_bert_trains_adapters_and_exports_them_merged(tmp_path: Path, quantize: bool) -> None:
    data = text_data()
    passes: list[dict[str, Any]] = [{"name": "lora", "options": {"rank": 4, "alpha": 8, "last": 6}}]
    if quantize:
        passes.append({"name": "quantize-frozen"})
    report = rewrite(tmp_path / "out", passes, data)
    entry = next(p for p in report["passes"] if p["name"] == "lora")
    assert entry["rewrites_export"] and entry["details"]["adapted_layers"] == 6
    trainable = set(report["parameters"]["trainable"])
    assert trainable == {n for a in entry["details"]["adapters"] for n in (a["a"], a["b"])} | {"classifier.weight", "classifier.bias"}
    trainer = edgeplug.Trainer(tmp_path / "out", progress=False)
    before = trainer.evaluate(data).loss
    trainer.fit(data, epochs=4, batch_size=8)
    evaluated = trainer.evaluate(data)
    assert evaluated.loss < before
    exported = edgeplug.export(tmp_path / "out", tmp_path / "model.onnx")
    model = onnx.load(str(exported))
    assert not any("lora" in n.name for n in model.graph.node)
    session = _ort.inference_runtime().InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]})[0]
    shifted = logits - logits.max(1, keepdims=True)
    loss = float(-(shifted - np.log(np.exp(shifted).sum(1, keepdims=True)))[np.arange(len(data["y"])), data["y"]].mean())
    assert loss == pytest.approx(evaluated.loss, abs=1e-4)


def test_merge_none_keeps_the_branches(tmp_path: Path) -> None:
    data = text_data()
    rewrite(tmp_path / "out", [{"name": "lora", "options": {"last": 2, "merge": "none"}}], data)
    edgeplug.Trainer(tmp_path / "out", progress=False).fit(data, epochs=1, batch_size=12)
    model = onnx.load(str(edgeplug.export(tmp_path / "out", tmp_path / "model.onnx")))
    assert sum(n.name.endswith("/lora/add") for n in model.graph.node) == 2


@pytest.mark.parametrize("options, message", [
    ({"include": ["nothing*"]}, "no layer to adapt"),
    ({"include": ["/classifier/*"]}, "no layer to adapt"),
])
def test_options_that_leave_nothing_are_recipe_errors(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        rewrite(tmp_path / "out", [{"name": "lora", "options": options}], text_data())
