"""The `new-head` pass: a classifier of another width, initialised from the support set or without data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import builders
import numpy as np
import onnx
import onnxruntime
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import edgeplug
from edgeplug.cli import main
from edgeplug.exporter import export
from edgeplug.recipe import recipe_from_dict
from edgeplug.trainer import Trainer
from edgeplug_plugins.new_head import inits
from edgeplug_plugins.new_head.locate import find_head

SETTINGS: dict[str, Any] = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}
FEATURES = 6


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def headed_model(head: str, hidden: int, old_classes: int, *, seed: int = 0, image: int = 5) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """A small backbone (Gemm+Relu, or Conv+Relu) ending in one of the head forms new-head must handle."""
    rng = np.random.default_rng(seed)
    inits_: list[onnx.TensorProto] = []
    if head.startswith("conv"):
        shape: tuple[int, ...] = (2, image, image)
        nodes = [helper.make_node("Conv", ["x", "c.weight", "c.bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", ["c"], ["h"], name="act")]
        inits_ += [_init("c.weight", rng.standard_normal((hidden, 2, 3, 3)) * 0.5), _init("c.bias", rng.standard_normal(hidden) * 0.1)]
    else:
        shape = (FEATURES,)
        nodes = [helper.make_node("Gemm", ["x", "b.weight", "b.bias"], ["b"], name="body", transB=1),
                 helper.make_node("Relu", ["b"], ["h"], name="act")]
        inits_ += [_init("b.weight", rng.standard_normal((hidden, FEATURES)) * 0.5), _init("b.bias", rng.standard_normal(hidden) * 0.1)]
    w = rng.standard_normal((old_classes, hidden)) * 0.3
    b = rng.standard_normal(old_classes) * 0.1
    if head == "gemm-transB":
        nodes.append(helper.make_node("Gemm", ["h", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1, alpha=0.5))
        inits_ += [_init("fc.weight", w), _init("fc.bias", b)]
    elif head == "gemm":
        nodes.append(helper.make_node("Gemm", ["h", "fc.weight"], ["logits"], name="fc"))
        inits_ += [_init("fc.weight", w.T)]
    elif head == "matmul-add":
        nodes += [helper.make_node("MatMul", ["h", "fc.weight"], ["m"], name="fc"),
                  helper.make_node("Add", ["m", "fc.bias"], ["d"], name="fc_bias"),
                  helper.make_node("Identity", ["d"], ["logits"], name="identity")]
        inits_ += [_init("fc.weight", w.T), _init("fc.bias", b)]
    elif head == "matmul":
        nodes += [helper.make_node("MatMul", ["h", "fc.weight"], ["m"], name="fc"),
                  helper.make_node("Reshape", ["m", "target"], ["logits"], name="reshape")]
        inits_ += [_init("fc.weight", w.T), numpy_helper.from_array(np.array([-1, old_classes], dtype=np.int64), "target")]
    elif head == "conv1x1-pool":  # SqueezeNet/MobileNetV3 style: 1x1 Conv, then pooling and flattening
        nodes += [helper.make_node("Conv", ["h", "fc.weight", "fc.bias"], ["k"], name="fc"),
                  helper.make_node("GlobalAveragePool", ["k"], ["p"], name="pool"),
                  helper.make_node("Flatten", ["p"], ["logits"], name="flatten")]
        inits_ += [_init("fc.weight", w.reshape(old_classes, hidden, 1, 1)), _init("fc.bias", b)]
    elif head == "conv-pool-gemm":
        nodes += [helper.make_node("GlobalAveragePool", ["h"], ["p"], name="pool"),
                  helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
                  helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1)]
        inits_ += [_init("fc.weight", w), _init("fc.bias", b)]
    else:
        raise ValueError(head)
    graph = helper.make_graph(nodes, "headed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", old_classes])], inits_)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model, shape


HEADS = ["gemm-transB", "gemm", "matmul-add", "matmul", "conv1x1-pool", "conv-pool-gemm"]


def run(model: onnx.ModelProto | Path, x: np.ndarray, output: str | None = None) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.asarray(session.run([output] if output else None, {"x": x})[0])


def features_of(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The penultimate features as new-head defines them, computed independently: the tensor 'h', spatially averaged."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, None))
    h = run(probe, x, "h").astype(np.float64)
    return h.reshape(h.shape[0], h.shape[1], -1).mean(axis=2) if h.ndim > 2 else h


def recipe(options: dict[str, Any], *, loss: str = "cross-entropy", lr: float = 0.01, extra: list[dict[str, Any]] = ()) -> Any:
    return recipe_from_dict({"loss": loss, "optimizer": {"name": "adamw", "lr": lr},
                             "passes": [{"name": "new-head", "options": options}, *extra]})


def new_head_details(report: Any) -> dict[str, Any]:
    return next(p for p in report["passes"] if p["name"] == "new-head")["details"]


# -- the property test over generated graphs ------------------------------------------------


@settings(max_examples=24, **SETTINGS)
@given(head=st.sampled_from(HEADS), hidden=st.integers(3, 9), old_classes=st.integers(2, 7), classes=st.integers(2, 6),
       init=st.sampled_from(["prototypes", "linear-probe", "random", "zeros"]), seed=st.integers(0, 2**16))
def test_new_head_keeps_the_model_valid_gives_classes_logits_and_trains(
        head: str, hidden: int, old_classes: int, classes: int, init: str, seed: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    model, shape = headed_model(head, hidden, old_classes, seed=seed)
    original = onnx.ModelProto()
    original.CopyFrom(model)
    data = builders.classification_data(shape, classes, n=6 * classes, seed=seed)
    data["y"] = np.arange(len(data["y"])) % classes  # every class present
    out = tmp_path_factory.mktemp("new-head") / "out"
    result = edgeplug.rewrite(model, recipe({"init": init, "classes": classes}), out, calibration=data)
    assert original == model, "new-head must not modify its input model"
    details = new_head_details(result.report)
    assert (details["old_classes"], details["classes"], details["in_features"]) == (old_classes, classes, hidden)
    assert result.report["training"]["output_shape"][-1] == classes

    # The forward model: valid, `classes` logits, the features before the head untouched, and the
    # logits exactly the promised linear function of them.
    forward = onnx.load(str(out / "forward_model.onnx"))
    onnx.checker.check_model(forward, full_check=True)
    x = data["x"]
    logits = run(forward, x)
    assert logits.shape == (len(x), classes)
    features = features_of(model, x)
    np.testing.assert_allclose(features_of(forward, x), features, rtol=1e-5, atol=1e-6)
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in forward.graph.initializer}
    assert weights[details["weight"]].size == classes * hidden and weights[details["bias"]].shape == (classes,)
    if init == "zeros":
        assert not logits.any()
    else:
        assert np.ptp(logits) > 0
    if init in ("prototypes", "linear-probe"):
        accuracy = float((logits.argmax(axis=1) == data["y"]).mean())
        assert accuracy == pytest.approx(details["support_accuracy"], abs=1.5 / len(x))  # float32 vs float64 ties
    if init == "prototypes":
        centred = features - features.mean(axis=0)
        radius = np.linalg.norm(centred, axis=1).mean()
        if radius > 1e-3:
            # a centred feature of mean norm pointing at its prototype scores exactly `scale`
            expected = inits.prototypes(features, data["y"], classes, 10.0)
            np.testing.assert_allclose(logits, features @ expected.weight.T + expected.bias, rtol=1e-4, atol=1e-4)

    # It trains: the new head's parameters are trainable and change; the loss stays finite.
    fit = Trainer(out, progress=False).fit(data, epochs=2, batch_size=8)
    assert all(np.isfinite(e.train.loss) for e in fit.epochs)
    exported = export(out, out.parent / "trained.onnx")
    trained = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(exported)).graph.initializer}
    assert not np.array_equal(trained[details["weight"]].astype(np.float64), weights[details["weight"]])
    assert run(exported, x[:3]).shape == (3, classes)


# -- initialisations --------------------------------------------------------------------------


def test_prototypes_are_a_cosine_classifier_on_centred_features() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 12)) * 3
    labels = np.repeat(np.arange(4), 5)
    features = centres[labels] + rng.standard_normal((20, 12)) + 5.0  # a shared offset, like post-ReLU features
    head = inits.prototypes(features, labels, 4, scale=10.0)
    logits = features @ head.weight.T + head.bias
    assert (logits.argmax(axis=1) == labels).all()
    centred = features - features.mean(axis=0)
    radius = np.linalg.norm(centred, axis=1).mean()
    # each row has norm scale / radius: a centred feature of norm `radius` on the prototype scores `scale`
    np.testing.assert_allclose(np.linalg.norm(head.weight, axis=1), 10.0 / radius)
    unit_rows = head.weight * radius / 10.0
    np.testing.assert_allclose(logits, 10.0 * centred @ unit_rows.T / radius, rtol=1e-9)
    # the bias is only the centring
    np.testing.assert_allclose(head.bias, -head.weight @ features.mean(axis=0))


def test_linear_probe_matches_scikit_learn_logistic_regression() -> None:
    linear_model = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 15)
    features = rng.standard_normal((45, 8)) + rng.standard_normal((3, 8))[labels]
    features = (features - features.mean(axis=0)) / features.std(axis=0)  # already standardised: same objective
    l2 = 0.05
    ours = inits.linear_probe(features, labels, 3, l2, max_steps=20000, tolerance=1e-9)
    # scikit-learn minimises |w|^2/2 + C * sum(CE): C = 1 / (l2 * n) gives our mean CE + l2/2 |w|^2
    reference = linear_model.LogisticRegression(C=1.0 / (l2 * len(labels)), tol=1e-10, max_iter=10000).fit(features, labels)
    np.testing.assert_allclose(_softmax(features @ ours.weight.T + ours.bias), reference.predict_proba(features), atol=2e-4)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_linear_probe_ignores_constant_features() -> None:
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(2), 10)
    features = np.concatenate([rng.standard_normal((20, 3)) + labels[:, None] * 2, np.full((20, 2), 7.0)], axis=1)
    head = inits.linear_probe(features, labels, 2, 0.01)
    assert np.isfinite(head.weight).all() and not head.weight[:, 3:].any()
    assert head.details["probe_train_accuracy"] == 1.0


def test_random_init_is_seeded_like_torch_linear() -> None:
    a, b, c = inits.random(5, 100, 3), inits.random(5, 100, 3), inits.random(5, 100, 4)
    assert np.array_equal(a.weight, b.weight) and not np.array_equal(a.weight, c.weight)
    assert np.abs(a.weight).max() <= 0.1 and np.abs(a.bias).max() <= 0.1


# -- the pipeline: names, trainable set, CLI ----------------------------------------------------


def test_old_names_are_kept_and_the_head_trains_after_a_classifier_only_selection(tmp_path: Path) -> None:
    model = builders.cnn((4, 6), 10, image=6)
    data = builders.classification_data((1, 6, 6), 3, n=30)
    extra = [{"name": "trainable", "options": {"layers": "classifier"}}, {"name": "freeze-bn"}]
    result = edgeplug.rewrite(model, recipe({}, extra=extra), tmp_path / "out", calibration=data)
    assert result.report["parameters"]["trainable"] == ["fc.bias", "fc.weight"]
    details = new_head_details(result.report)
    assert (details["weight"], details["bias"], details["classes"]) == ("fc.weight", "fc.bias", 3)  # classes from the labels
    assert details["samples_per_class"] == [int((data["y"] == c).sum()) for c in range(3)]
    # new-head after 'trainable' keeps a frozen head frozen, and vice versa
    frozen = recipe_from_dict({"passes": [{"name": "trainable", "options": {"layers": 2}},
                                          {"name": "new-head", "options": {"classes": 3, "init": "zeros"}}]})
    result = edgeplug.rewrite(model, frozen, tmp_path / "out2")
    assert {"fc.weight", "fc.bias"} <= set(result.report["parameters"]["trainable"])


def test_a_shared_weight_gets_a_fresh_name(tmp_path: Path) -> None:
    model, _ = headed_model("gemm-transB", 4, 4)
    # the head's weight also feeds a second output: it must survive unchanged
    model.graph.node.append(helper.make_node("Gemm", ["h", "fc.weight"], ["other"], name="other", transB=1))
    model.graph.output.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, ["N", 4]))
    head = find_head(model, "logits")
    assert head.node.name == "fc"
    result = edgeplug.rewrite(model, recipe({"classes": 2, "init": "zeros"}), tmp_path / "out")
    details = new_head_details(result.report)
    assert details["weight"] != "fc.weight" and details["bias"] == "fc.bias"


@pytest.mark.parametrize("options, loss, calibration, message", [
    ({}, "cross-entropy", False, "init 'prototypes' needs the labelled support set"),
    ({"init": "linear-probe", "classes": 3}, "mse", True, "needs the cross-entropy loss"),
    ({"init": "random"}, "cross-entropy", False, "give the number of classes"),
    ({"classes": 5}, "cross-entropy", True, "has none of class 3, 4 (of 5)"),
    ({"classes": 2}, "cross-entropy", True, "holds label 2 but the model has 2 outputs (labels 0..1)"),
    ({"node": "nope"}, "cross-entropy", True, "has no node named 'nope'"),
    ({"node": "act0", "init": "zeros", "classes": 2}, "cross-entropy", True, "Relu 'act0' is not a Gemm, MatMul or Conv"),
])
def test_bad_options_and_data_are_one_line_errors(options: dict[str, Any], loss: str, calibration: bool, message: str,
                                                   tmp_path: Path) -> None:
    model = builders.mlp(FEATURES, (8,), 4)
    data = builders.classification_data((FEATURES,), 3, n=30)
    with pytest.raises(edgeplug.EdgeplugError) as error:
        edgeplug.rewrite(model, recipe(options, loss=loss), tmp_path / "out", calibration=data if calibration else None)
    assert message in str(error.value) and str(error.value).startswith("pass 'new-head': ")
    assert not (tmp_path / "out").exists()


def test_an_output_after_softmax_is_not_a_head(tmp_path: Path) -> None:
    model = builders.mlp(FEATURES, (8,), 4)
    model.graph.node[-1].output[0] = "raw"
    model.graph.node.append(helper.make_node("Softmax", ["raw"], ["logits"], name="softmax"))
    with pytest.raises(edgeplug.ModelError, match=r"comes from Softmax 'softmax' \(fed by Gemm 'fc1'\).*option 'node'"):
        edgeplug.rewrite(model, recipe({"classes": 2, "init": "zeros"}), tmp_path / "out")
    # naming the head explicitly works, and the Softmax follows the new width
    result = edgeplug.rewrite(model, recipe({"classes": 2, "init": "zeros", "node": "fc1"}), tmp_path / "out")
    assert result.report["training"]["output_shape"] == ["N", 2]


def test_cli_rewrite_train_export_gives_n_logits_whose_accuracy_matches_the_last_evaluation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = builders.cnn((4, 6), 10, image=6)
    onnx.save(model, tmp_path / "model.onnx")
    support = builders.classification_data((1, 6, 6), 4, n=40, seed=0)
    query = {key: array[40:] for key, array in builders.classification_data((1, 6, 6), 4, n=100, seed=0).items()}  # same classes
    np.savez(tmp_path / "support.npz", **support)
    np.savez(tmp_path / "query.npz", **query)
    (tmp_path / "recipe.yaml").write_text("optimizer: {lr: 0.01}\npasses:\n  - {name: new-head, options: {init: linear-probe}}\n"
                                          "  - {name: freeze-bn}\n")
    assert main(["rewrite", str(tmp_path / "model.onnx"), "--recipe", str(tmp_path / "recipe.yaml"),
                 "--calibration-data", str(tmp_path / "support.npz"), "-o", str(tmp_path / "out")]) == 0
    assert "Gemm 'fc': 10 -> 4 classes (6 features), init linear-probe from 40 support samples" in capsys.readouterr().out
    assert main(["train", str(tmp_path / "out"), "--data", str(tmp_path / "support.npz"), "--eval", str(tmp_path / "query.npz"),
                 "--epochs", "3", "--batch-size", "8", "--no-progress"]) == 0
    last = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 3/3")][0]
    reported = float(last.split("eval_acc ")[1].split()[0])
    assert main(["export", str(tmp_path / "out"), "-o", str(tmp_path / "trained.onnx")]) == 0
    logits = run(tmp_path / "trained.onnx", query["x"])
    assert logits.shape == (len(query["y"]), 4)
    assert round(float((logits.argmax(axis=1) == query["y"]).mean()), 3) == reported
