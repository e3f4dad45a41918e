"""Property tests of the built-in passes (normalize, trainable, freeze-bn) over generated MLPs and CNNs."""

from __future__ import annotations

import collections
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).parent))

import builders

from edgeplug import _ort
from edgeplug.checkpoints import STATE, latest_checkpoint
from edgeplug.exporter import export
from edgeplug.gradients import DECOMPOSABLE, GRADIENT_OPS
from edgeplug.layout import CHECKPOINT, EVAL_MODEL, FORWARD_MODEL, TRAINING_MODEL
from edgeplug.normalize import decompose as decompose_module
from edgeplug.normalize.normalize_pass import NormalizePass
from edgeplug.passes import ForwardState, PassContext, fill_defaults
from edgeplug.pipeline import rewrite
from edgeplug.recipe import recipe_from_dict
from edgeplug.trainer import Trainer

ACTIVATIONS = ["Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSwish", "HardSigmoid", "Softplus", "Elu", "Selu", "Softsign", "PRelu"]
FEATURES, MLP_CLASSES = 6, 3
IMAGE, CNN_CLASSES = 6, 4
SETTINGS: dict[str, Any] = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}


# -- model generation ----------------------------------------------------------------------


def _to_prelu(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """Replace the placeholder activations (act*) by PRelu with a per-channel slope initializer."""
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if not node.name.startswith("act"):
            continue
        source = producers[node.input[0]]
        while source.op_type == "BatchNormalization":
            source = producers[source.input[0]]
        weight = inits[source.input[1]]
        if source.op_type == "Conv":
            shape: tuple[int, ...] = (weight.dims[0], 1, 1)
        else:
            shape = (weight.dims[1],)
        slope = f"{node.name}.slope"
        model.graph.initializer.append(numpy_helper.from_array((0.05 + 0.2 * rng.random(shape)).astype(np.float32), slope))
        node.op_type = "PRelu"
        del node.attribute[:]
        node.input.append(slope)
    return model


@st.composite
def models(draw: st.DrawFn, kinds: tuple[str, ...] = ("mlp", "cnn"), batch_norm: bool | None = None,
           activations: list[str] = ACTIVATIONS) -> tuple[str, onnx.ModelProto]:
    kind = draw(st.sampled_from(kinds))
    activation = draw(st.sampled_from(activations))
    opset = draw(st.integers(13, 21))
    if activation == "HardSwish":
        opset = max(opset, 14)
    batch = draw(st.sampled_from(["N", 1]))
    seed = draw(st.integers(0, 2**16))
    placeholder = "Relu" if activation == "PRelu" else activation
    if kind == "mlp":
        hidden = draw(st.lists(st.integers(2, 10), min_size=1, max_size=3))
        model = builders.mlp(FEATURES, hidden, MLP_CLASSES, activation=placeholder, seed=seed, batch=batch, opset=opset)
    else:
        channels = draw(st.lists(st.integers(2, 6), min_size=1, max_size=2))
        bn = draw(st.booleans()) if batch_norm is None else batch_norm
        model = builders.cnn(channels, CNN_CLASSES, image=IMAGE, batch_norm=bn, activation=placeholder, seed=seed, batch=batch, opset=opset)
    if activation == "PRelu":
        model = _to_prelu(model, seed)
    onnx.checker.check_model(model, full_check=True)
    return kind, model


def input_shape(kind: str) -> tuple[int, ...]:
    return (FEATURES,) if kind == "mlp" else (1, IMAGE, IMAGE)


def classes(kind: str) -> int:
    return MLP_CLASSES if kind == "mlp" else CNN_CLASSES


def run(model: onnx.ModelProto | str | Path, x: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def checkpoint_parameters(artifact_dir: Path) -> dict[str, tuple[np.ndarray, bool]]:
    latest = latest_checkpoint(artifact_dir)
    path = latest / STATE if latest else artifact_dir / CHECKPOINT
    state = _ort.training_api().CheckpointState.load_checkpoint(str(path))
    return {name: (np.array(p.data, copy=True), bool(p.requires_grad)) for name, p in state.parameters}


def normalized(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    instance = NormalizePass(fill_defaults({}, NormalizePass.options_schema))
    context = PassContext(work_dir=Path("/nonexistent"), output_name="logits", loss="cross-entropy")
    state = instance.rewrite_forward(ForwardState(model, frozenset()), context)
    return state.model, dict(instance.report().details)


def recipe(passes: list[dict[str, Any]], lr: float = 0.02) -> Any:
    return recipe_from_dict({"optimizer": {"name": "adamw", "lr": lr}, "passes": passes})


# -- DECOMPOSABLE table ----------------------------------------------------------------------


def test_decomposable_table_matches_normalize_rewrites() -> None:
    assert DECOMPOSABLE == set(decompose_module.REWRITES)


# -- normalize ---------------------------------------------------------------------------------


@settings(max_examples=20, **SETTINGS)
@given(models())
def test_normalize_keeps_model_valid_and_equivalent(case: tuple[str, onnx.ModelProto]) -> None:
    kind, model = case
    original = onnx.ModelProto()
    original.CopyFrom(model)
    result, details = normalized(model)
    assert original == model, "normalize must not modify its input model"
    onnx.checker.check_model(result, full_check=True)

    # Decomposed ops: exactly those the table names, all of them, and only ops with gradients remain.
    expected = collections.Counter(n.op_type for n in original.graph.node if n.op_type in DECOMPOSABLE)
    assert details.get("decomposed", {}) == dict(expected)
    remaining = {n.op_type for n in result.graph.node}
    assert not remaining & DECOMPOSABLE
    assert remaining - {"Constant", "Greater"} <= GRADIENT_OPS

    # The batch axis is symbolic afterwards.
    assert not result.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, *input_shape(kind))) * 2).astype(np.float32)
    fixed_batch = original.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    reference = np.concatenate([run(original, x[i : i + 1]) for i in range(3)]) if fixed_batch else run(original, x)
    np.testing.assert_allclose(run(result, x[:1]), reference[:1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(result, x), reference, rtol=1e-5, atol=1e-5)


# -- trainable ---------------------------------------------------------------------------------


def weight_layer_groups(kind: str, model: onnx.ModelProto) -> list[list[str]]:
    """What the 'trainable' pass documents as weight layers, derived from the builder's naming."""
    names = {t.name for t in model.graph.initializer}
    if kind == "mlp":
        count = sum(1 for n in model.graph.node if n.op_type == "Gemm")
        return [[f"fc{i}.weight", f"fc{i}.bias"] for i in range(count)]
    convs = sum(1 for n in model.graph.node if n.op_type == "Conv")
    groups = []
    for i in range(convs):
        group = [f"conv{i}.weight", f"conv{i}.bias"]
        group += [name for name in (f"bn{i}.scale", f"bn{i}.bias") if name in names]
        groups.append(group)
    return groups + [["fc.weight", "fc.bias"]]


def all_parameters(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer if not t.name.endswith((".mean", ".var"))}


def gradient_is_zero_by_construction(name: str, model: onnx.ModelProto) -> bool:
    """A conv bias right before a batch-statistics BatchNormalization gets an exactly-zero gradient."""
    bns = {n.input[0] for n in model.graph.node if n.op_type == "BatchNormalization"}
    return any(n.op_type == "Conv" and len(n.input) > 2 and n.input[2] == name and n.output[0] in bns for n in model.graph.node)


def is_running_statistic(name: str, model: onnx.ModelProto) -> bool:
    return any(n.op_type == "BatchNormalization" and name in n.input[3:5] for n in model.graph.node)


def train_and_check(kind: str, model: onnx.ModelProto, passes: list[dict[str, Any]], expected: set[str], out: Path) -> None:
    result = rewrite(model, recipe(passes), out, force=True)
    assert set(result.report["parameters"]["trainable"]) == expected
    before = initializers(model)
    data = builders.classification_data(input_shape(kind), classes(kind), n=48, seed=1)
    fit = Trainer(out, progress=False).fit(data, data, epochs=4, batch_size=16)
    after = checkpoint_parameters(out)
    assert set(after) == set(before)
    for name, (value, requires_grad) in after.items():
        assert requires_grad == (name in expected), name
        if name in expected:
            if not gradient_is_zero_by_construction(name, model):
                assert not np.array_equal(value, before[name]), f"trainable {name} did not change"
        elif is_running_statistic(name, model):
            continue  # buffers, not parameters: see test_batch_statistics_drift_without_freeze_bn
        else:
            assert value.dtype == before[name].dtype and value.tobytes() == before[name].tobytes(), f"frozen {name} changed"
    # Training loss, not eval loss: with BatchNormalization on batch statistics (no freeze-bn) the
    # eval model normalises with running statistics, so its loss can rise while training works.
    assert fit.epochs[-1].train.loss < fit.epochs[0].train.loss, "loss did not fall on separable data"


@settings(max_examples=10, **SETTINGS)
@given(case=models(), data=st.data())
def test_trainable_layers_train_exactly_the_chosen_parameters(case: tuple[str, onnx.ModelProto], data: st.DataObject,
                                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    kind, model = case
    groups = weight_layer_groups(kind, model)
    layers = data.draw(st.sampled_from(["all", "classifier", *range(1, len(groups) + 1)]), label="layers")
    if layers == "all":
        expected = all_parameters(model)
    else:
        count = 1 if layers == "classifier" else int(layers)
        expected = {name for group in groups[-count:] for name in group}
    out = tmp_path_factory.mktemp("trainable") / "out"
    train_and_check(kind, model, [{"name": "trainable", "options": {"layers": layers}}], expected, out)


SELECTIONS = [
    ({"include": ["fc.*"]}, {"fc.weight", "fc.bias"}),
    ({"include": ["conv*"], "exclude": ["*.bias"]}, {"conv0.weight", "conv1.weight"}),
    ({"layers": "classifier", "include": ["bn1.*"]}, {"fc.weight", "fc.bias", "bn1.scale", "bn1.bias"}),
    ({"syntax": "regex", "include": [r"^conv\d\.weight$"]}, {"conv0.weight", "conv1.weight"}),
    ({"layers": 2, "exclude": ["bn*"]}, {"conv1.weight", "conv1.bias", "fc.weight", "fc.bias"}),
    ({"syntax": "regex", "layers": "all", "exclude": [r"\.bias$", "^bn0"]}, {"conv0.weight", "conv1.weight", "bn1.scale", "fc.weight"}),
]


@pytest.mark.parametrize("options, expected", SELECTIONS, ids=[str(i) for i in range(len(SELECTIONS))])
def test_trainable_patterns(options: dict[str, Any], expected: set[str], tmp_path: Path) -> None:
    model = builders.cnn((4, 6), CNN_CLASSES, image=IMAGE)
    train_and_check("cnn", model, [{"name": "trainable", "options": options}], expected, tmp_path / "out")


def test_batch_statistics_drift_without_freeze_bn(tmp_path: Path) -> None:
    """Runtime behaviour: BatchNormInternal updates the running statistics of every BN in training,
    frozen layers included, so a classifier-only fine-tune still changes the frozen layers' inference
    outputs unless 'freeze-bn' runs. With freeze-bn no running statistic is left to drift."""
    model = builders.cnn((4, 6), CNN_CLASSES, image=IMAGE)
    data = builders.classification_data(input_shape("cnn"), CNN_CLASSES, n=32, seed=1)
    before = initializers(model)
    rewrite(model, recipe([{"name": "trainable", "options": {"layers": "classifier"}}]), tmp_path / "plain")
    Trainer(tmp_path / "plain", progress=False).fit(data, epochs=1, batch_size=16)
    after = checkpoint_parameters(tmp_path / "plain")
    assert not np.array_equal(after["bn0.mean"][0], before["bn0.mean"])
    assert np.array_equal(after["conv0.weight"][0], before["conv0.weight"])

    rewrite(model, recipe([{"name": "trainable", "options": {"layers": "classifier"}}, {"name": "freeze-bn"}]), tmp_path / "frozen")
    Trainer(tmp_path / "frozen", progress=False).fit(data, epochs=1, batch_size=16)
    after = checkpoint_parameters(tmp_path / "frozen")
    assert not any(name.startswith("bn") for name in after)
    for name in ("conv0.weight", "conv0.bias", "conv1.weight", "conv1.bias"):
        assert after[name][0].tobytes() == before[name].tobytes()


# -- freeze-bn --------------------------------------------------------------------------------


@settings(max_examples=8, **SETTINGS)
@given(case=models(kinds=("cnn",), batch_norm=True), mode=st.sampled_from(["frozen", "all"]))
def test_freeze_bn_keeps_inference_outputs(case: tuple[str, onnx.ModelProto], mode: str,
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    kind, model = case
    out = tmp_path_factory.mktemp("freeze") / "out"
    # 'frozen' folds the BN of frozen layers (everything but the classifier); 'all' keeps trainable affine BN.
    trainable = {"layers": "classifier"} if mode == "frozen" else {"layers": "all"}
    result = rewrite(model, recipe([{"name": "trainable", "options": trainable}, {"name": "freeze-bn", "options": {"layers": mode}}]), out)
    entry = next(p for p in result.report["passes"] if p["name"] == "freeze-bn")
    bn_count = sum(1 for n in model.graph.node if n.op_type == "BatchNormalization")
    key = "folded" if mode == "frozen" else "running_stats_trainable_affine"
    assert len(entry["details"][key]) == bn_count
    forward = onnx.load(str(out / FORWARD_MODEL))
    assert not any(n.op_type == "BatchNormalization" for n in forward.graph.node)
    x = np.random.default_rng(2).standard_normal((3, *input_shape(kind))).astype(np.float32)
    fixed_batch = model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    reference = np.concatenate([run(model, x[i : i + 1]) for i in range(3)]) if fixed_batch else run(model, x)
    np.testing.assert_allclose(run(forward, x), reference, rtol=1e-5, atol=1e-5)


def eval_model_outputs(artifact_dir: Path, x: np.ndarray) -> np.ndarray:
    """Logits of the eval model, run through the on-device training API in eval mode."""
    api = _ort.training_api()
    latest = latest_checkpoint(artifact_dir)
    state = api.CheckpointState.load_checkpoint(str(latest / STATE))
    module = api.Module(str(artifact_dir / TRAINING_MODEL), state, str(artifact_dir / EVAL_MODEL))
    module.eval()
    outputs = dict(zip(module.output_names(), module(x, np.zeros(len(x), dtype=np.int64))))
    return np.asarray(outputs["logits"])


def test_freeze_bn_training_then_export_matches_eval_model(tmp_path: Path) -> None:
    model = builders.cnn((4, 6), CNN_CLASSES, image=IMAGE, seed=3)
    out = tmp_path / "out"
    rewrite(model, recipe([{"name": "trainable", "options": {"layers": "classifier"}}, {"name": "freeze-bn"}]), out)
    data = builders.classification_data(input_shape("cnn"), CNN_CLASSES, n=48, seed=1)
    Trainer(out, progress=False).fit(data, epochs=3, batch_size=16)
    exported = tmp_path / "model.onnx"
    export(out, exported)
    x = data["x"][:10]
    logits = run(exported, x)
    np.testing.assert_allclose(logits, eval_model_outputs(out, x), rtol=1e-5, atol=1e-5)
    # The frozen convs + inference-mode BN of the original model with the trained classifier give the same logits.
    trained = checkpoint_parameters(out)
    patched = onnx.ModelProto()
    patched.CopyFrom(model)
    for tensor in patched.graph.initializer:
        if tensor.name in ("fc.weight", "fc.bias"):
            tensor.CopyFrom(numpy_helper.from_array(trained[tensor.name][0], tensor.name))
    np.testing.assert_allclose(logits, run(patched, x), rtol=1e-5, atol=1e-5)
    assert not np.array_equal(trained["fc.weight"][0], initializers(model)["fc.weight"])
