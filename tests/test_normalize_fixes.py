"""normalize undoes exporter habits: merged initializers, 3-output BN, Transpose without perm,
LayerNormalization without statistics outputs, CastLike, Shape of a weight, opsets newer than
the installed onnx, shapes only the exporter knew. tests/test_exporters.py runs the real exporters' files."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
import builders  # noqa: E402

from edgeplug.errors import ModelError  # noqa: E402
from edgeplug.normalize.exporter_fixes import (  # noqa: E402
    cast_like_to_cast,
    drop_unused_batchnorm_outputs,
    explicit_auto_pads,
    explicit_transpose_perms,
    fold_initializer_shapes,
    layernorm_statistics_outputs,
    materialize_initializer_identities,
    relabel_unknown_opset,
    restore_exporter_dims,
)
from edgeplug.pipeline import rewrite  # noqa: E402
from edgeplug.recipe import recipe_from_dict  # noqa: E402


def _with_identity_statistics() -> onnx.ModelProto:
    model = builders.cnn(channels=(4,), classes=3)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    model.graph.node.insert(0, helper.make_node("Identity", [bn.input[1]], ["var_copy"], name="copy_var"))
    bn.input[4] = "var_copy"
    return model


def test_identity_feeding_statistics_becomes_a_copy() -> None:
    model = _with_identity_statistics()
    assert materialize_initializer_identities(model) == {"var_copy": "bn0.scale"}
    names = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(names["var_copy"], names["bn0.scale"])
    assert "Identity" not in {n.op_type for n in model.graph.node}
    onnx.checker.check_model(model, full_check=True)


def _merged_weights() -> onnx.ModelProto:
    """fc1's weight merged into fc0's by value, the way torch.onnx.export (eval mode) writes it."""
    model = builders.mlp(features=4, hidden=(4,), classes=4)
    weights = {t.name: t for t in model.graph.initializer}
    weights["fc1.weight"].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights["fc0.weight"]), "fc1.weight"))
    model.graph.initializer.remove(weights["fc1.weight"])
    model.graph.node.insert(0, helper.make_node("Identity", ["fc0.weight"], ["fc1.weight"], name="merged"))
    return model


def test_merged_initializers_are_untied() -> None:
    model = _merged_weights()
    assert materialize_initializer_identities(model) == {"fc1.weight": "fc0.weight"}
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(values["fc1.weight"], values["fc0.weight"])
    assert "Identity" not in {n.op_type for n in model.graph.node}


def test_untied_copies_train_apart(tmp_path: Path) -> None:
    result = rewrite(_merged_weights(), recipe_from_dict({}), tmp_path / "out")
    assert {"fc0.weight", "fc1.weight"} <= set(result.report["parameters"]["trainable"])
    normalize = next(p for p in result.report["passes"] if p["name"] == "normalize")
    assert normalize["details"]["identities_materialized"] == 1


def test_shared_parameters_stay_shared() -> None:
    """A parameter PyTorch really shares is one name used twice: nothing to untie."""
    model = builders.mlp(features=4, hidden=(4,), classes=4)
    next(n for n in model.graph.node if n.name == "fc1").input[1] = "fc0.weight"
    assert materialize_initializer_identities(model) == {}


def test_training_mode_batchnorm_gets_one_output() -> None:
    model = builders.cnn(channels=(4,), classes=3)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.output.extend(["running_mean_out", "running_var_out"])
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    assert drop_unused_batchnorm_outputs(model) == 1
    assert list(bn.output) == ["n0"] and not bn.attribute


def test_used_running_statistics_outputs_are_a_clear_error() -> None:
    model = builders.cnn(channels=(4,), classes=3)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.output.extend(["running_mean_out", "running_var_out"])
    model.graph.output.append(helper.make_tensor_value_info("running_mean_out", TensorProto.FLOAT, [4]))
    with pytest.raises(ModelError, match="eval mode"):
        drop_unused_batchnorm_outputs(model)


def test_transpose_gets_its_default_perm() -> None:
    model = builders.mlp(features=4, hidden=(), classes=4)
    node = helper.make_node("Transpose", ["x"], ["xt"], name="t")
    model.graph.node.insert(0, node)
    model.graph.node[1].input[0] = "xt"
    assert explicit_transpose_perms(model) == 1
    assert helper.get_attribute_value(model.graph.node[0].attribute[0]) == [1, 0]


def _layernorm_model(outputs: int = 1) -> onnx.ModelProto:
    model = builders.mlp(features=4, hidden=(8,), classes=3)
    names = ["ln", "ln_mean", "ln_inv_std"][:outputs]
    model.graph.initializer.extend([numpy_helper.from_array(np.ones(8, np.float32), "ln.scale"),
                                    numpy_helper.from_array(np.zeros(8, np.float32), "ln.bias")])
    model.graph.node.insert(2, helper.make_node("LayerNormalization", ["a0", "ln.scale", "ln.bias"], names, name="ln", axis=-1))
    next(n for n in model.graph.node if n.name == "fc1").input[0] = "ln"
    return model


def test_layernorm_gets_its_statistics_outputs() -> None:
    model = _layernorm_model()
    assert layernorm_statistics_outputs(model) == 1
    node = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    assert len(node.output) == 3 and all(node.output)
    onnx.checker.check_model(model, full_check=True)
    assert layernorm_statistics_outputs(_layernorm_model(outputs=3)) == 0


def test_layernorm_model_builds_training_artifacts(tmp_path: Path) -> None:
    """Without the outputs onnxruntime-training stops with 'i < node_->OutputDefs().size()'."""
    result = rewrite(_layernorm_model(), recipe_from_dict({}), tmp_path / "out")
    assert {"ln.scale", "ln.bias"} <= set(result.report["parameters"]["trainable"])


def _cast_like_model(like: str = "like") -> onnx.ModelProto:
    model = builders.mlp(features=4, hidden=(), classes=3)
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "like"))
    model.graph.node.insert(0, helper.make_node("CastLike", ["x", like], ["x_cast"], name="castlike"))
    model.graph.node[1].input[0] = "x_cast"
    return model


def test_cast_like_becomes_cast(tmp_path: Path) -> None:
    model = _cast_like_model()
    assert cast_like_to_cast(model) == 1
    node = model.graph.node[0]
    assert node.op_type == "Cast" and list(node.input) == ["x"]
    assert helper.get_attribute_value(node.attribute[0]) == TensorProto.FLOAT
    rewrite(_cast_like_model(), recipe_from_dict({}), tmp_path / "out")  # CastLike has no gradient; Cast has


def test_cast_like_of_unknown_type_is_a_clear_error() -> None:
    model = _cast_like_model(like="nowhere")
    with pytest.raises(ModelError, match="element type of 'nowhere' is unknown"):
        cast_like_to_cast(model)


def test_opset_newer_than_onnx_knows_is_relabelled() -> None:
    model = builders.mlp(opset=onnx.defs.onnx_opset_version() + 1)
    assert relabel_unknown_opset(model) == (onnx.defs.onnx_opset_version() + 1, onnx.defs.onnx_opset_version())
    assert relabel_unknown_opset(builders.mlp(opset=17)) is None


def test_opset_newer_than_onnx_knows_with_a_new_op_is_refused() -> None:
    model = builders.mlp(hidden=(), opset=23)
    model.graph.node.append(helper.make_node("RMSNormalization", ["logits", "fc0.bias"], ["normed"], name="rms"))
    with pytest.raises(ModelError, match="RMSNormalization do not exist in opset"):
        relabel_unknown_opset(model)


def test_shape_of_a_weight_becomes_a_constant() -> None:
    model = builders.cnn(channels=(4,), classes=3)
    model.graph.node.insert(0, helper.make_node("Shape", ["conv0.weight"], ["w_shape"], name="shape", start=1))
    model.graph.node.insert(1, helper.make_node("ConstantOfShape", ["w_shape"], ["ones"], name="ones",
                                                value=numpy_helper.from_array(np.ones(1, np.float32))))
    model.graph.output.append(helper.make_tensor_value_info("ones", TensorProto.FLOAT, [1, 3, 3]))
    assert fold_initializer_shapes(model) == 1
    node = model.graph.node[0]
    assert node.op_type == "Constant" and not node.input
    np.testing.assert_array_equal(numpy_helper.to_array(node.attribute[0].t), [1, 3, 3])
    onnx.checker.check_model(model, full_check=True)


def test_unknown_dims_are_filled_from_the_exporters_value_info() -> None:
    model = builders.mlp(features=4, hidden=(8,), classes=3)
    inferred = onnx.shape_inference.infer_shapes(model)
    hidden = next(v for v in inferred.graph.value_info if v.name == "h0")
    hint = onnx.ValueInfoProto()
    hint.CopyFrom(hidden)
    for dim in hidden.type.tensor_type.shape.dim:  # what inference gives when it loses track
        dim.Clear()
    hidden.type.tensor_type.shape.dim[1].dim_param = "unk__3"
    stale_rank = helper.make_tensor_value_info("a0", TensorProto.FLOAT, ["N"])  # rank differs: ignored
    assert restore_exporter_dims(inferred, [hint, stale_rank]) == 1
    assert [d.dim_param or d.dim_value for d in hidden.type.tensor_type.shape.dim] == ["N", 8]
    assert restore_exporter_dims(inferred, [hint]) == 0  # nothing unknown any more


def _auto_pad_cnn(mode: str) -> onnx.ModelProto:
    """Conv(stride 2, 3x3, auto_pad) on 8x8 -> global pool -> linear: SAME pads 1 on one side only."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32) * 0.3, "w"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32) * 0.3, "fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", auto_pad=mode, strides=[2, 2], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "fc"], ["logits"], name="fc"),
    ]
    graph = helper.make_graph(nodes, "auto_pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(("mode", "pads"), [("SAME_UPPER", [0, 0, 1, 1]), ("SAME_LOWER", [1, 1, 0, 0]), ("VALID", [0, 0, 0, 0])])
def test_auto_pad_becomes_explicit_pads_with_the_same_outputs(mode: str, pads: list[int]) -> None:
    from edgeplug._ort import inference_runtime

    model = _auto_pad_cnn(mode)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    assert explicit_auto_pads(fixed) == 1
    conv = fixed.graph.node[0]
    attributes = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert "auto_pad" not in attributes and attributes["pads"] == pads
    x = np.random.default_rng(1).standard_normal((3, 2, 8, 8)).astype(np.float32)
    runtime = inference_runtime()
    before, after = (runtime.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                     for m in (model, fixed))
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


def test_conv_with_same_padding_trains_to_the_same_finite_weights_every_time(tmp_path: Path) -> None:
    """onnxruntime-training's ConvGrad ignores auto_pad: before the fix, NaN weights in ~4 of 10 steps."""
    import edgeplug

    onnx.save(_auto_pad_cnn("SAME_UPPER"), tmp_path / "m.onnx")
    rewrite(tmp_path / "m.onnx", recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "sgd", "lr": 0.1}}), tmp_path / "out")
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((32, 2, 8, 8)).astype(np.float32), "labels": rng.integers(0, 3, 32)}
    weights = []
    for _ in range(3):
        trainer = edgeplug.Trainer(tmp_path / "out", checkpoints=False)
        trainer.fit(data, epochs=2, batch_size=4)
        weights.append({name: np.array(p.data) for name, p in trainer._state.parameters})
    assert all(np.isfinite(w).all() for w in weights[0].values())
    for other in weights[1:]:
        for name, value in weights[0].items():
            np.testing.assert_array_equal(other[name], value)
