"""The sparse-update pass: Fisher criterion, budgets, the channel split, frozen weights after training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from builders import classification_data, cnn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from sparse_checks import initializers, reassembled

import edgeplug
from edgeplug.profiling import static_profile
from edgeplug.recipe import recipe_from_dict
from edgeplug_plugins.sparse_update.candidates import find_candidates, model_facts
from edgeplug_plugins.sparse_update.criterion import fisher_potentials

IMAGE = 6


def _recipe(**options: object) -> edgeplug.Recipe:
    return recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.05},
                             "passes": [{"name": "sparse-update", "options": options}]})


def _details(report: dict) -> dict:
    return next(p for p in report["passes"] if p["name"] == "sparse-update")["details"]



def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def depthwise_cnn(seed: int = 0) -> onnx.ModelProto:
    """x[N,3,6,6] -> Conv1x1(8) -> Relu -> depthwise Conv3x3 -> Relu -> Conv1x1(6) -> GAP -> Gemm(4)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("pw.weight", rng.standard_normal((8, 3, 1, 1))), ("pw.bias", rng.standard_normal(8) * 0.1),
        ("dw.weight", rng.standard_normal((8, 1, 3, 3)) * 0.5), ("dw.bias", rng.standard_normal(8) * 0.1),
        ("pj.weight", rng.standard_normal((6, 8, 1, 1)) * 0.4), ("pj.bias", rng.standard_normal(6) * 0.1),
        ("fc.weight", rng.standard_normal((4, 6)) * 0.5), ("fc.bias", np.zeros(4)))]
    nodes = [
        helper.make_node("Conv", ["x", "pw.weight", "pw.bias"], ["c0"], name="pw"),
        helper.make_node("Relu", ["c0"], ["a0"], name="act0"),
        helper.make_node("Conv", ["a0", "dw.weight", "dw.bias"], ["c1"], name="dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a1"], name="act1"),
        helper.make_node("Conv", ["a1", "pj.weight", "pj.bias"], ["c2"], name="pj"),
        helper.make_node("GlobalAveragePool", ["c2"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, IMAGE, IMAGE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


# -- the criterion ----------------------------------------------------------------------------------

def _numpy_cnn_losses(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, scale: dict[tuple[str, int], float]) -> np.ndarray:
    """Per-sample cross-entropy of builders.cnn(batch_norm=False, activation='Tanh') in float64; `scale` multiplies
    channel c of a layer's output ('out', node) or of its input ('in', node) by a factor."""
    w = {k: v.astype(np.float64) for k, v in initializers(model).items()}
    h = x.astype(np.float64)
    layer = 0
    while f"conv{layer}.weight" in w:
        h = h * scale.get((f"in:conv{layer}",), np.ones((1, h.shape[1], 1, 1)))
        weight, bias = w[f"conv{layer}.weight"], w[f"conv{layer}.bias"]
        padded = np.pad(h, ((0, 0), (0, 0), (1, 1), (1, 1)))
        patches = np.stack([padded[:, :, i:i + h.shape[2], j:j + h.shape[3]] for i in range(3) for j in range(3)], axis=-1)
        h = np.einsum("nchwk,ock->nohw", patches, weight.reshape(weight.shape[0], weight.shape[1], 9)) + bias[None, :, None, None]
        h = np.tanh(h * scale.get((f"out:conv{layer}",), np.ones((1, h.shape[1], 1, 1))))
        layer += 1
    logits = h.mean(axis=(2, 3)) @ w["fc.weight"] + w["fc.bias"]
    logits = logits * scale.get(("out:fc",), np.ones((1, logits.shape[1])))
    logits = logits - logits.max(axis=1, keepdims=True)
    return -(logits[np.arange(len(y)), y] - np.log(np.exp(logits).sum(axis=1)))


def test_fisher_potentials_match_a_numpy_reference() -> None:
    model = cnn(channels=(3, 4), classes=3, image=4, batch_norm=False, activation="Tanh", seed=3)
    data = classification_data((1, 4, 4), 3, n=5, seed=1)
    facts = model_facts(model, "logits", 5)
    candidates = find_candidates(facts, frozenset(facts.index.parameters()))
    got = fisher_potentials(facts, candidates, "cross-entropy", data, chunk=2)  # 3 chunks, last padded

    def reference(key: str, channels: int, rank: int) -> np.ndarray:
        # per-sample sum_d a*g = d loss_n / d (channel scale), by central differences in float64
        eps, result = 1e-5, np.zeros((5, channels))
        for c in range(channels):
            bump = np.ones((1, channels) + (1,) * (rank - 2))
            bump[0, c] += eps
            up = _numpy_cnn_losses(model, data["x"], data["y"], {(key,): bump})
            bump[0, c] -= 2 * eps
            down = _numpy_cnn_losses(model, data["x"], data["y"], {(key,): bump})
            result[:, c] = (up - down) / (2 * eps)
        return 0.5 * np.square(result).mean(axis=0)

    by_node = {c.node: c.position for c in candidates}
    np.testing.assert_allclose(got.output[by_node["conv0"]], reference("out:conv0", 3, 4), rtol=2e-3, atol=1e-9)
    np.testing.assert_allclose(got.output[by_node["conv1"]], reference("out:conv1", 4, 4), rtol=2e-3, atol=1e-9)
    np.testing.assert_allclose(got.input[by_node["conv1"]], reference("in:conv1", 3, 4), rtol=2e-3, atol=1e-9)
    # linear head: a = logits, g = softmax - onehot, exactly
    w = initializers(model)
    session_model = onnx.ModelProto()
    session_model.CopyFrom(model)
    logits = _run(session_model, data["x"]).astype(np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    g = p - np.eye(3)[data["y"]]
    np.testing.assert_allclose(got.output[by_node["fc"]], 0.5 * np.square(logits * g).mean(axis=0), rtol=1e-4)
    assert w  # the model kept its weights


@pytest.mark.parametrize("kind", ["cnn", "depthwise"])
def test_probing_only_later_layers_runs_the_prefix_as_inference_and_changes_nothing(kind: str) -> None:
    """Probing the later layers cuts the model: the prefix runs as plain inference (with the depthwise
    layer, probed at its output only, inside it), only the tail is differentiated, and the potentials
    are those of the whole-model probe (with other chunk sizes, too)."""
    if kind == "cnn":
        model, shape = cnn(channels=(3, 4, 4), classes=3, image=4, batch_norm=False, activation="Tanh", seed=5), (1, 4, 4)
    else:
        model, shape = depthwise_cnn(seed=2), (3, IMAGE, IMAGE)
    data = classification_data(shape, 3, n=7, seed=2)
    facts = model_facts(model, "logits", 7)
    candidates = find_candidates(facts, frozenset(facts.index.parameters()))
    later = candidates[2:] if kind == "cnn" else candidates[1:]
    whole = fisher_potentials(facts, candidates, "cross-entropy", data, chunk=7)
    part = fisher_potentials(facts, later, "cross-entropy", data, chunk=3)  # 3 chunks of 3, two rows padded
    assert whole.prefix_nodes == 0 < part.prefix_nodes and part.tail_nodes < whole.tail_nodes
    if kind == "depthwise":
        assert part.prefix_nodes == 3  # pw, its Relu and dw itself run as inference
    assert set(part.output) == {c.position for c in later}
    assert set(part.input) == {c.position for c in later if c.probes_input}  # convs and the linear head
    for position in part.output:
        np.testing.assert_allclose(part.output[position], whole.output[position], rtol=1e-4, atol=1e-12)
    for position in part.input:
        np.testing.assert_allclose(part.input[position], whole.input[position], rtol=1e-4, atol=1e-12)


def test_tinytrain_needs_calibration_data(tmp_path: Path) -> None:
    with pytest.raises(edgeplug.RecipeError, match="calibration-data"):
        edgeplug.rewrite(cnn(), _recipe(memory_budget_bytes=10**6), tmp_path / "out")
    with pytest.raises(edgeplug.RecipeError, match="needs a budget"):
        edgeplug.rewrite(cnn(), _recipe(strategy="static"), tmp_path / "out")
    with pytest.raises(edgeplug.RecipeError, match="does not cover"):
        edgeplug.rewrite(cnn(), _recipe(strategy="static", memory_budget_bytes=100), tmp_path / "out")


# -- budgets and the training graph -----------------------------------------------------------------

@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(channels=st.lists(st.integers(2, 8), min_size=1, max_size=3), strategy=st.sampled_from(["tinytrain", "static", "random"]),
       budget=st.integers(15_000, 120_000), macs=st.one_of(st.none(), st.integers(40_000, 400_000)), seed=st.integers(0, 3))
def test_selection_respects_the_budget_and_only_chosen_channels_get_gradients(
        tmp_path_factory: pytest.TempPathFactory, channels: list[int], strategy: str, budget: int, macs: int | None, seed: int) -> None:
    model = cnn(channels=tuple(channels), image=IMAGE, batch_norm=False, seed=seed)
    data = classification_data((1, IMAGE, IMAGE), 10, n=12, seed=seed)
    options = {"strategy": strategy, "memory_budget_bytes": budget, "batch_size": 8, "seed": seed}
    if macs is not None:
        options["backward_macs_budget"] = macs
    out = tmp_path_factory.mktemp("sparse")
    try:
        report = edgeplug.rewrite(model, _recipe(**options), out / "a", calibration=data).report
    except edgeplug.RecipeError as error:
        assert "does not cover" in str(error)  # the budget is below the classifier alone
        return
    details = _details(report)
    counted = static_profile(out / "a", batch_size=8)
    memory = counted.retained_activation_bytes + counted.gradient_bytes + counted.optimizer_state_bytes
    assert details["predicted"]["backward_memory_bytes"] == memory <= budget
    assert details["predicted"]["backward_macs"] == counted.backward_macs
    if macs is not None:
        assert counted.backward_macs <= macs
    training = onnx.load(str(out / "a" / "training_model.onnx"))
    grads = {o[: -len("_grad")] for n in training.graph.node for o in n.output if o.endswith("_grad")}
    trainable = set(report["parameters"]["trainable"])
    params = set(initializers(onnx.load(str(out / "a" / "forward_model.onnx"))))
    assert grads & params == trainable  # gradients exist for the trainable tensors and nothing else
    for layer in details["layers"]:
        if layer["channels"] is not None:
            assert len(layer["channels"]) < layer["channels_total"]
            assert f"{layer['weight']}.sparse_trainable" in trainable
            assert f"{layer['weight']}.sparse_frozen" not in trainable


# -- training leaves frozen channels alone; export is an equivalent model -----------------------------


@pytest.mark.parametrize("model_kind, options", [
    ("cnn", {"strategy": "tinytrain", "criterion": "paper", "memory_budget_bytes": 60_000}),
    ("cnn", {"strategy": "tinytrain", "criterion": "paper", "memory_budget_bytes": 200_000, "axis": "output", "channel_ratio": 0.5}),
    ("depthwise", {"strategy": "static", "memory_budget_bytes": 40_000, "channel_ratio": 0.5, "classifier": "candidate", "layers": 2}),
])
def test_frozen_weights_stay_bit_identical_and_export_matches(tmp_path: Path, model_kind: str, options: dict) -> None:
    model = cnn(channels=(4, 8), image=IMAGE, batch_norm=False) if model_kind == "cnn" else depthwise_cnn()
    shape = (1, IMAGE, IMAGE) if model_kind == "cnn" else (3, IMAGE, IMAGE)
    classes = 10 if model_kind == "cnn" else 4
    data = classification_data(shape, classes, n=24)
    out = tmp_path / "out"
    report = edgeplug.rewrite(model, _recipe(batch_size=8, **options), out, calibration=data).report
    details = _details(report)
    assert any(layer["channels"] is not None for layer in details["layers"]), details["layers"]
    forward = onnx.load(str(out / "forward_model.onnx"))
    np.testing.assert_allclose(_run(forward, data["x"]), _run(model, data["x"]), rtol=1e-5, atol=1e-5)

    edgeplug.Trainer(out, progress=False).fit(data, epochs=2, batch_size=8)
    edgeplug.export(out, tmp_path / "trained.onnx")
    exported = onnx.load(str(tmp_path / "trained.onnx"))
    trained, before = initializers(exported), initializers(forward)
    trainable = set(report["parameters"]["trainable"])
    for name, value in before.items():
        if name in trainable:
            assert not np.array_equal(trained[name], value), name
        else:
            assert np.array_equal(trained[name], value), name  # frozen: bit-identical
    rebuilt = reassembled(model, exported, details)
    np.testing.assert_allclose(_run(exported, data["x"]), _run(rebuilt, data["x"]), rtol=1e-4, atol=1e-5)


def test_last_k_and_bias_path(tmp_path: Path) -> None:
    model = cnn(channels=(4, 8, 8), image=IMAGE, batch_norm=False)
    report = edgeplug.rewrite(model, _recipe(strategy="last-k", layers=2, batch_size=8), tmp_path / "a").report
    details = _details(report)
    assert [layer["node"] for layer in details["layers"]] == ["conv2", "fc"]
    assert set(report["parameters"]["trainable"]) == {"conv2.weight", "conv2.bias", "fc.weight", "fc.bias"}
    data = classification_data((1, IMAGE, IMAGE), 10, n=16)
    report = edgeplug.rewrite(model, _recipe(memory_budget_bytes=50_000, batch_size=8, layers=2), tmp_path / "b", calibration=data).report
    details = _details(report)
    earliest = min(int(layer["node"][-1]) if layer["node"].startswith("conv") else 9 for layer in details["layers"])
    # every conv after the earliest updated one trains its bias (moved to an Add), none before
    assert details["bias_only"] == [f"conv{i}" for i in range(earliest + 1, 3) if f"conv{i}" not in [layer["node"] for layer in details["layers"]]]


def test_last_k_with_a_budget_takes_the_most_last_layers_that_fit(tmp_path: Path) -> None:
    model = mbconv(blocks=2, width=4, seed=1)
    facts = model_facts(model, "logits", 8)
    candidates = find_candidates(facts, frozenset(facts.index.parameters()))
    chosen = {}
    for budget in (20_000, 60_000, 400_000):
        report = edgeplug.rewrite(model, _recipe(strategy="last-k", memory_budget_bytes=budget, batch_size=8), tmp_path / str(budget)).report
        details = _details(report)
        assert details["predicted"]["backward_memory_bytes"] <= budget
        chosen[budget] = [layer["node"] for layer in details["layers"]]
        assert chosen[budget] == [c.node for c in candidates[-len(chosen[budget]):]]  # a contiguous tail
    assert 1 <= len(chosen[20_000]) < len(chosen[60_000]) < len(chosen[400_000])
    with pytest.raises(edgeplug.RecipeError, match="does not cover"):
        edgeplug.rewrite(model, _recipe(strategy="last-k", memory_budget_bytes=100, batch_size=8), tmp_path / "none")


@pytest.mark.parametrize("axis", ["input", "output"])
def test_a_frozen_bias_survives_the_split(tmp_path: Path, axis: str) -> None:
    """Biases frozen by an earlier pass are not candidates, yet the split layer must keep adding them."""
    model = cnn(channels=(4, 8), image=IMAGE, batch_norm=False)
    rng = np.random.default_rng(1)
    for tensor in model.graph.initializer:
        if tensor.name.endswith("bias"):
            tensor.CopyFrom(numpy_helper.from_array(rng.standard_normal(tuple(tensor.dims)).astype(np.float32) * 5, tensor.name))
    data = classification_data((1, IMAGE, IMAGE), 10, n=16)
    recipe = recipe_from_dict({"passes": [
        {"name": "trainable", "options": {"exclude": ["*bias"]}},
        {"name": "sparse-update", "options": {"strategy": "static", "memory_budget_bytes": 200_000, "batch_size": 8,
                                               "axis": axis, "channel_ratio": 0.5, "bias": "none"}},
    ]})
    report = edgeplug.rewrite(model, recipe, tmp_path / "out", calibration=data).report
    assert any(layer["channels"] is not None for layer in _details(report)["layers"])
    assert not any(name.endswith("bias") for name in report["parameters"]["trainable"])
    forward = onnx.load(str(tmp_path / "out" / "forward_model.onnx"))
    np.testing.assert_allclose(_run(forward, data["x"]), _run(model, data["x"]), rtol=1e-5, atol=1e-4)


# -- TinyTrain's defaults and the lean frozen path -----------------------------------------------------

def mbconv(blocks: int = 2, width: int = 4, expand: int = 3, classes: int = 5, seed: int = 0, image: int = IMAGE) -> onnx.ModelProto:
    """x[N,3,S,S] -> stem 3x3 -> (1x1 expand -> Clip(0,6) -> depthwise 3x3 -> Clip -> 1x1 project (+ x))* -> 1x1 head
    -> Clip -> GAP -> Gemm: the layer pattern of MobileNetV2/EfficientNet-Lite."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def weight(name: str, shape: tuple[int, ...]) -> str:
        fan_in = int(np.prod(shape[1:]))
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name))
        inits.append(numpy_helper.from_array((rng.standard_normal(shape[0]) * 0.1).astype(np.float32), name.replace("weight", "bias")))
        return name

    inits += [numpy_helper.from_array(np.array(0.0, np.float32), "zero"), numpy_helper.from_array(np.array(6.0, np.float32), "six")]
    nodes.append(helper.make_node("Conv", ["x", weight("stem.weight", (width, 3, 3, 3)), "stem.bias"], ["s"], name="stem", pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Clip", ["s", "zero", "six"], ["h0"], name="stem_act"))
    previous = "h0"
    for b in range(blocks):
        wide = width * expand
        nodes += [
            helper.make_node("Conv", [previous, weight(f"b{b}.expand.weight", (wide, width, 1, 1)), f"b{b}.expand.bias"], [f"b{b}e"], name=f"b{b}.expand"),
            helper.make_node("Clip", [f"b{b}e", "zero", "six"], [f"b{b}ea"], name=f"b{b}.act0"),
            helper.make_node("Conv", [f"b{b}ea", weight(f"b{b}.dw.weight", (wide, 1, 3, 3)), f"b{b}.dw.bias"], [f"b{b}d"], name=f"b{b}.dw",
                             group=wide, pads=[1, 1, 1, 1]),
            helper.make_node("Clip", [f"b{b}d", "zero", "six"], [f"b{b}da"], name=f"b{b}.act1"),
            helper.make_node("Conv", [f"b{b}da", weight(f"b{b}.project.weight", (width, wide, 1, 1)), f"b{b}.project.bias"], [f"b{b}p"],
                             name=f"b{b}.project"),
            helper.make_node("Add", [f"b{b}p", previous], [f"b{b}out"], name=f"b{b}.add"),
        ]
        previous = f"b{b}out"
    nodes += [
        helper.make_node("Conv", [previous, weight("head.weight", (2 * width, width, 1, 1)), "head.bias"], ["hd"], name="head"),
        helper.make_node("Clip", ["hd", "zero", "six"], ["hda"], name="head_act"),
        helper.make_node("GlobalAveragePool", ["hda"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", weight("fc.weight", (classes, 2 * width)), "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "mbconv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, image, image])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_tinytrain_defaults_follow_the_paper(tmp_path: Path) -> None:
    """Output channels ranked by their own Fisher potential; layers in descending score until the next one
    does not fit (Algorithm 1), each with its top channel_ratio share; no input probes are built."""
    model = mbconv(blocks=3, width=8, seed=4)
    data = classification_data((3, IMAGE, IMAGE), 5, n=20, seed=4)
    report = edgeplug.rewrite(model, _recipe(memory_budget_bytes=60_000, batch_size=8), tmp_path / "out",  # the defaults
                              calibration=data).report
    details = _details(report)
    assert details["criterion"] == "paper" and details["loop"] == "paper" and details["probe"]["input_probes"] is False
    facts = model_facts(model, "logits", 8)
    candidates = find_candidates(facts, frozenset(facts.index.parameters()))
    by_node = {c.node: c for c in candidates}
    potentials = fisher_potentials(facts, candidates, "cross-entropy", data, chunk=16, input_probes=False)
    chosen = [layer for layer in details["layers"] if layer["node"] != "fc"]
    assert chosen, details
    for layer in chosen:
        c = by_node[layer["node"]]
        assert layer["axis"] == ("input" if c.kind == "depthwise" else "output")
        assert layer["ratio"] == pytest.approx(0.25, abs=1 / c.channels)
        top = np.argsort(-potentials.output[c.position], kind="stable")[: len(layer["channels"])]
        assert sorted(layer["channels"]) == sorted(int(i) for i in top)
    ranked = [entry["node"] for entry in details["score_ranking"] if entry["node"] != "fc"]
    assert [layer["node"] for layer in sorted(chosen, key=lambda layer: -layer["score"])] == ranked[: len(chosen)]


@pytest.mark.parametrize("criterion", ["paper", "budget"])
def test_the_lean_probe_chooses_the_same_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, criterion: str) -> None:
    """What keeps the selection's peak low (the probe's frozen weights fed as inputs instead of living in its
    graph and checkpoint; the support set probed in chunks of 4, the default, instead of whole) changes
    no choice: the same layers and channels, potentials equal to float rounding."""
    from edgeplug_plugins.sparse_update import probe_cut

    model = mbconv(blocks=3, width=8, seed=4)
    data = classification_data((3, IMAGE, IMAGE), 5, n=20, seed=4)
    plans = {}
    for lean in (True, False):
        # lifted: every float initializer of the tail (the builders' weights are small); kept: none of them
        monkeypatch.setattr(probe_cut, "LIFT_MIN_VALUES", 1 if lean else 2**62)
        options = {"memory_budget_bytes": 60_000, "batch_size": 16, "criterion": criterion}
        if not lean:
            options["calibration_batch"] = 16  # two chunks of 10, the old default's
        details = _details(edgeplug.rewrite(model, _recipe(**options), tmp_path / str(lean), calibration=data).report)
        plans[lean] = details
    lean, whole = plans[True], plans[False]
    assert [(x["node"], x["axis"], x["channels"]) for x in lean["layers"]] == [(x["node"], x["axis"], x["channels"]) for x in whole["layers"]]
    assert lean["bias_only"] == whole["bias_only"] and lean["trainable"] == whole["trainable"]
    for a, b in zip(lean["layers"], whole["layers"], strict=True):
        assert a["potential"] == pytest.approx(b["potential"], rel=1e-5)


def test_the_lean_frozen_path_keeps_no_input_for_frozen_pointwise_convs(tmp_path: Path) -> None:
    """Training the stem only: the frozen 1x1 convs after it become MatMuls whose input gradient keeps
    nothing; values are unchanged and the prediction equals the profiler's count, with and without."""
    model = mbconv(blocks=2, width=4, seed=1)
    data = classification_data((3, IMAGE, IMAGE), 5, n=16, seed=1)
    retained = {}
    for lean in (False, True):
        options = {"strategy": "random", "memory_budget_bytes": 10**7, "batch_size": 8, "layers": 2, "lean_backward": lean,
                   "classifier": "full", "seed": 0}
        recipe = recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.01}, "passes": [
            {"name": "trainable", "options": {"include": ["stem.*", "fc.*"]}},
            {"name": "sparse-update", "options": options}]})
        out = tmp_path / f"lean-{lean}"
        report = edgeplug.rewrite(model, recipe, out, calibration=data).report
        details = _details(report)
        counted = static_profile(out, batch_size=8)
        assert details["predicted"]["backward_memory_bytes"] == counted.retained_activation_bytes + counted.gradient_bytes + counted.optimizer_state_bytes
        retained[lean] = {t.name for t in counted.retained}
        forward = onnx.load(str(out / "forward_model.onnx"))
        np.testing.assert_allclose(_run(forward, data["x"]), _run(model, data["x"]), rtol=1e-5, atol=1e-5)
        ops = {n.op_type for n in forward.graph.node}
        assert ("MatMul" in ops) is lean
    assert {"b0e", "b1e", "hd"} <= retained[False] & retained[True]  # Clip keeps its input either way
    assert {"b0out", "b1out", "b0da", "b1da"} <= retained[False]  # the 1x1 convs' inputs, kept by ConvGrad
    assert not {"b0out", "b1out", "b0da", "b1da"} & retained[True]


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blocks=st.integers(1, 3), strategy=st.sampled_from(["tinytrain", "static", "random"]), axis=st.sampled_from(["auto", "input"]),
       budget=st.integers(20_000, 200_000), seed=st.integers(0, 3))
def test_mbconv_plans_are_counted_exactly_and_keep_the_function(
        tmp_path_factory: pytest.TempPathFactory, blocks: int, strategy: str, axis: str, budget: int, seed: int) -> None:
    model = mbconv(blocks=blocks, width=4, seed=seed)
    data = classification_data((3, IMAGE, IMAGE), 5, n=12, seed=seed)
    out = tmp_path_factory.mktemp("mb") / "a"
    options = {"strategy": strategy, "axis": axis, "memory_budget_bytes": budget, "batch_size": 8, "seed": seed}
    try:
        report = edgeplug.rewrite(model, _recipe(**options), out, calibration=data).report
    except edgeplug.RecipeError as error:
        assert "does not cover" in str(error)
        return
    details = _details(report)
    counted = static_profile(out, batch_size=8)
    memory = counted.retained_activation_bytes + counted.gradient_bytes + counted.optimizer_state_bytes
    assert details["predicted"]["backward_memory_bytes"] == memory <= budget
    forward = onnx.load(str(out / "forward_model.onnx"))
    np.testing.assert_allclose(_run(forward, data["x"]), _run(model, data["x"]), rtol=1e-4, atol=1e-5)
    result = edgeplug.Trainer(out, progress=False, checkpoints=False).fit(data, epochs=1, batch_size=8)
    assert result.steps_run == 2
