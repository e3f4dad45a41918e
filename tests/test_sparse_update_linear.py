"""sparse-update on linear layers over [batch, sequence, features] activations (a transformer's projections):
the Fisher criterion per output feature summed over positions, the column/row split, costs at a sequence length."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from sparse_checks import initializers, reassembled

import edgeplug
from edgeplug.profiling import static_profile
from edgeplug.recipe import recipe_from_dict
from edgeplug_plugins.sparse_update.candidates import find_candidates, model_facts
from edgeplug_plugins.sparse_update.criterion import fisher_potentials

SEQUENCE = 6


def linear_stack(widths: tuple[int, ...] = (5, 8, 6), classes: int = 3, seed: int = 0, head: str = "gemm") -> onnx.ModelProto:
    """x[N, S, F0] (+ mask[N, S]) -> (MatMul W[Fi, Fi+1] -> Add bias -> Tanh)* -> masked mean over S -> classifier.

    The head is a Gemm (transB=1, as torch exports nn.Linear on 2-D inputs) or a MatMul + Add."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes = [helper.make_node("Constant", [], ["axis1"], name="axis1", value=numpy_helper.from_array(np.array([1], np.int64))),
             helper.make_node("Constant", [], ["axis2"], name="axis2", value=numpy_helper.from_array(np.array([2], np.int64))),
             helper.make_node("Cast", ["mask"], ["maskf"], name="mask_cast", to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"], name="mask_unsqueeze")]
    h = "x"
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        inits += [numpy_helper.from_array((rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32), f"l{i}.weight"),
                  numpy_helper.from_array((rng.standard_normal(fan_out) * 0.1).astype(np.float32), f"l{i}.bias")]
        nodes += [helper.make_node("MatMul", [h, f"l{i}.weight"], [f"m{i}"], name=f"l{i}"),
                  helper.make_node("Add", [f"l{i}.bias", f"m{i}"], [f"b{i}"], name=f"l{i}.add"),
                  helper.make_node("Tanh", [f"b{i}"], [f"h{i}"], name=f"l{i}.act")]
        h = f"h{i}"
    nodes += [helper.make_node("Mul", [h, "mask3"], ["masked"], name="pool_mask"),
              helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], name="pool_sum", keepdims=0),
              helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], name="pool_count", keepdims=0),
              helper.make_node("Div", ["summed", "count"], ["pooled"], name="pool_div")]
    w = (rng.standard_normal((classes, widths[-1])) * 0.5).astype(np.float32)
    inits.append(numpy_helper.from_array((rng.standard_normal(classes) * 0.1).astype(np.float32), "fc.bias"))
    if head == "gemm":
        inits.append(numpy_helper.from_array(w, "fc.weight"))
        nodes.append(helper.make_node("Gemm", ["pooled", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    else:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "fc.weight"))
        nodes += [helper.make_node("MatMul", ["pooled", "fc.weight"], ["fc_out"], name="fc"),
                  helper.make_node("Add", ["fc_out", "fc.bias"], ["logits"], name="fc.add")]
    graph = helper.make_graph(nodes, "linear_stack", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", widths[0]]),
        helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def sequence_data(features: int, classes: int, n: int = 16, seed: int = 0, length: int = SEQUENCE) -> dict[str, np.ndarray]:
    """Separable sequences of random lengths, right-padded with large values (which a masked model ignores)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    directions = rng.standard_normal((classes, features))
    x = rng.standard_normal((n, length, features)) * 0.5 + directions[labels][:, None, :]
    lengths = rng.integers(1, length + 1, n)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    x = np.where(mask[..., None] == 1, x, 50.0)
    return {"x": x.astype(np.float32), "mask": mask, "y": labels.astype(np.int64)}


def _recipe(passes_options: dict) -> edgeplug.Recipe:
    return recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.05},
                             "passes": [{"name": "sparse-update", "options": passes_options}]})


def _details(report: dict) -> dict:
    return next(p for p in report["passes"] if p["name"] == "sparse-update")["details"]



def _run(model: onnx.ModelProto, data: dict[str, np.ndarray]) -> np.ndarray:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": data["x"], "mask": data["mask"]})[0]


# -- the criterion ----------------------------------------------------------------------------------

def _numpy_losses(model: onnx.ModelProto, data: dict[str, np.ndarray], scales: dict[str, np.ndarray]) -> np.ndarray:
    """Per-sample cross-entropy of linear_stack(head='gemm') in float64; scales['out:l0'] multiplies layer 0's
    MatMul output per feature, scales['in:l0'] its input."""
    w = {k: v.astype(np.float64) for k, v in initializers(model).items()}
    h, mask = data["x"].astype(np.float64), data["mask"].astype(np.float64)[..., None]
    i = 0
    while f"l{i}.weight" in w:
        h = h * scales.get(f"in:l{i}", 1.0)
        h = np.tanh((h @ w[f"l{i}.weight"]) * scales.get(f"out:l{i}", 1.0) + w[f"l{i}.bias"])
        i += 1
    pooled = (h * mask).sum(axis=1) / mask.sum(axis=1)
    logits = pooled @ w["fc.weight"].T + w["fc.bias"]
    logits = logits - logits.max(axis=1, keepdims=True)
    y = data["y"]
    return -(logits[np.arange(len(y)), y] - np.log(np.exp(logits).sum(axis=1)))


def test_fisher_potentials_per_output_feature_sum_over_positions() -> None:
    """dLoss_n/dscale_f = sum over the sequence of a*g for feature f; padded positions (filled with large
    values here) add nothing; chunks of 3 with the last one padded change nothing."""
    model = linear_stack((4, 5, 3), classes=3, seed=2)
    data = sequence_data(4, 3, n=7, seed=1)
    facts = model_facts(model, "logits", 7, {"sequence": SEQUENCE})
    candidates = find_candidates(facts, frozenset(facts.index.parameters()))
    assert [(c.node, c.kind, c.channels, c.slice_channels) for c in candidates] == [
        ("l0", "linear", 5, 4), ("l1", "linear", 3, 5), ("fc", "linear", 3, 3)]
    assert candidates[0].bias == "l0.bias" and candidates[0].bias_node == "l0.add"
    got = fisher_potentials(facts, candidates, "cross-entropy", data, chunk=3)

    def reference(key: str, features: int) -> np.ndarray:
        eps, result = 1e-6, np.zeros((7, features))
        for f in range(features):
            bump = np.ones(features)
            bump[f] += eps
            up = _numpy_losses(model, data, {key: bump})
            bump[f] -= 2 * eps
            result[:, f] = (up - _numpy_losses(model, data, {key: bump})) / (2 * eps)
        return 0.5 * np.square(result).mean(axis=0)

    np.testing.assert_allclose(got.output[0], reference("out:l0", 5), rtol=2e-3, atol=1e-10)
    np.testing.assert_allclose(got.output[1], reference("out:l1", 3), rtol=2e-3, atol=1e-10)
    np.testing.assert_allclose(got.input[1], reference("in:l1", 5), rtol=2e-3, atol=1e-10)


def test_a_sequence_axis_needs_its_length(tmp_path: Path) -> None:
    model = linear_stack()
    with pytest.raises(edgeplug.RecipeError, match="dims: {sequence: 128}"):
        edgeplug.rewrite(model, _recipe({"strategy": "random", "memory_budget_bytes": 10**6}), tmp_path / "a")
    report = edgeplug.rewrite(model, _recipe({"strategy": "random", "memory_budget_bytes": 10**6, "batch_size": 4,
                                              "dims": {"sequence": 10}}), tmp_path / "b").report
    assert _details(report)["budgets"]["dims"] == {"sequence": 10}
    assert _details(report)["candidates"] == 3


# -- plans over generated MatMul stacks ---------------------------------------------------------------


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: each example rewrites and trains
@given(widths=st.lists(st.integers(3, 9), min_size=2, max_size=4), head=st.sampled_from(["gemm", "matmul"]),
       strategy=st.sampled_from(["tinytrain", "static", "random"]), axis=st.sampled_from(["auto", "input", "output"]),
       budget=st.integers(4_000, 40_000), seed=st.integers(0, 3))
def test_matmul_stack_plans_fit_train_only_the_chosen_columns_and_export_the_function(
        tmp_path_factory: pytest.TempPathFactory, widths: list[int], head: str, strategy: str, axis: str, budget: int, seed: int) -> None:
    model = linear_stack(tuple(widths), classes=3, seed=seed, head=head)
    data = sequence_data(widths[0], 3, n=16, seed=seed)
    out = tmp_path_factory.mktemp("linear")
    options = {"strategy": strategy, "axis": axis, "memory_budget_bytes": budget, "batch_size": 8, "seed": seed, "channel_ratio": 0.5}
    try:
        report = edgeplug.rewrite(model, _recipe(options), out / "a", calibration=data).report
    except edgeplug.RecipeError as error:
        assert "does not cover" in str(error)
        return
    details = _details(report)
    assert details["budgets"]["dims"] == {"sequence": SEQUENCE}  # from the calibration arrays
    counted = static_profile(out / "a", batch_size=8, dims={"sequence": SEQUENCE})
    memory = counted.retained_activation_bytes + counted.gradient_bytes + counted.optimizer_state_bytes
    assert details["predicted"]["backward_memory_bytes"] == memory <= budget
    assert details["predicted"]["backward_macs"] == counted.backward_macs
    training = onnx.load(str(out / "a" / "training_model.onnx"))
    grads = {o[: -len("_grad")] for n in training.graph.node for o in n.output if o.endswith("_grad")}
    trainable = set(report["parameters"]["trainable"])
    forward = onnx.load(str(out / "a" / "forward_model.onnx"))
    assert grads & set(initializers(forward)) == trainable  # gradients for the trainable tensors and nothing else
    np.testing.assert_allclose(_run(forward, data), _run(model, data), rtol=1e-5, atol=1e-5)

    edgeplug.Trainer(out / "a", progress=False).fit(data, epochs=2, batch_size=8)
    edgeplug.export(out / "a", out / "trained.onnx")
    exported = onnx.load(str(out / "trained.onnx"))
    trained, before = initializers(exported), initializers(forward)
    for name, value in before.items():
        if name not in trainable:
            assert np.array_equal(trained[name], value), name  # frozen columns and layers: bit-identical
    assert any(not np.array_equal(trained[name], before[name]) for name in trainable)
    np.testing.assert_allclose(_run(exported, data), _run(reassembled(model, exported, details), data), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("axis", ["input", "output"])
def test_split_columns_or_rows_of_an_encoder_projection(tmp_path: Path, axis: str) -> None:
    """A wide stack forced to train layer l1 in part along each axis: the input axis keeps only the chosen
    input features of l1's input for the weight gradient (a quarter of it), the output axis keeps all of it."""
    model = linear_stack((4, 16, 16, 3), classes=3, seed=1)
    data = sequence_data(4, 3, n=16, seed=1)
    recipe = recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.05}, "passes": [
        {"name": "trainable", "options": {"include": ["l1.*", "fc.*"]}},
        {"name": "sparse-update", "options": {"strategy": "static", "axis": axis, "memory_budget_bytes": 10**6, "batch_size": 8,
                                               "channel_ratio": 0.25, "min_channel_ratio": 0.25, "bias": "none"}}]})
    report = edgeplug.rewrite(model, recipe, tmp_path / "out", calibration=data).report
    layer = next(layer for layer in _details(report)["layers"] if layer["node"] == "l1")
    assert layer["axis"] == axis and len(layer["channels"]) == 4 and layer["weight_axis"] == (0 if axis == "input" else 1)
    counted = static_profile(tmp_path / "out", batch_size=8, dims={"sequence": SEQUENCE})
    full_input = 8 * SEQUENCE * 16 * 4
    kept = {t.name: t.bytes for t in counted.retained}
    if axis == "input":
        assert kept["l1.x_trainable"] == full_input // 4 and "h0" not in kept  # l1's input h0: only the chosen features
    else:
        assert kept["h0"] == full_input


def test_the_toy_bert_trains_encoder_projections_in_part(tmp_path: Path) -> None:
    """On a BERT-style encoder (two int64 inputs, dynamic sequence) the encoder's Linear layers are candidates:
    tinytrain picks output columns of some of them by Fisher potential; the predicted memory is the profiler's
    count of the training graph, the forward function is unchanged."""
    from test_encoder_passes import TINY_BERT, logits, text_data

    data = text_data(24, 16)
    recipe = recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.003}, "passes": [
        {"name": "sparse-update", "options": {"memory_budget_bytes": 200_000, "batch_size": 8}}]})
    report = edgeplug.rewrite(TINY_BERT, recipe, tmp_path / "out", calibration=data).report
    details = _details(report)
    assert details["candidates"] == 13 and details["budgets"]["dims"] == {"sequence": 16}  # 12 projections + the classifier
    encoder = [layer for layer in details["layers"] if layer["node"].startswith("/layer.")]
    assert encoder and all(layer["kind"] == "linear" and layer["axis"] == "output" and layer["channels"] for layer in encoder)
    counted = static_profile(tmp_path / "out", batch_size=8, dims={"sequence": 16})
    memory = counted.retained_activation_bytes + counted.gradient_bytes + counted.optimizer_state_bytes
    # the count follows the runtime's fused Gelu, LayerNorm statistics and attention's scale
    assert details["predicted"]["backward_memory_bytes"] == memory <= 200_000
    assert details["predicted"]["backward_macs"] == counted.backward_macs
    forward = onnx.load(str(tmp_path / "out" / "forward_model.onnx"))
    np.testing.assert_allclose(logits(forward, data), logits(TINY_BERT, data), rtol=1e-4, atol=1e-5)
    fit = edgeplug.Trainer(tmp_path / "out", progress=False, checkpoints=False).fit(data, epochs=2, batch_size=8)
    assert np.isfinite(fit.step_losses).all()
