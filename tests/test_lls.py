"""The `lls` pass: fixed bases, parameter-free heads, no gradient across blocks, learning, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import classification_data, cnn, mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import edgeplug
import edgeplug_plugins.lls as lls_plugin
from edgeplug.errors import ModelError, RecipeError
from edgeplug.layout import EVAL_MODEL, FORWARD_MODEL, TRAINING_MODEL
from edgeplug.recipe import recipe_from_dict
from edgeplug_plugins.lls.basis import basis
from edgeplug_plugins.lls.heads import pooling_matrix


def lls_host() -> edgeplug.PluginHost:
    host = edgeplug.PluginHost(only={"normalize", "trainable"})
    host.register(lls_plugin, name="lls", version="test")
    return host


def rewrite(model: onnx.ModelProto, out: Path, lr: float = 0.01, **options: object) -> dict:
    host = lls_host()
    recipe = recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": lr},
                               "passes": [{"name": "lls", "options": options}]}, host=host)
    return dict(edgeplug.rewrite(model, recipe, out, host=host).report)


def gradient_parameters(training: onnx.ModelProto) -> set[str]:
    """Initializers of the training graph whose gradient it computes."""
    produced = {out for node in training.graph.node for out in node.output}
    names = {t.name for t in training.graph.initializer} | {v.name for v in training.graph.input}
    return {name for name in names if f"{name}_grad" in produced}


# -- basis ----------------------------------------------------------------------------


@pytest.mark.parametrize("classes,length", [(10, 64), (3, 7), (1, 1)])
def test_bases_follow_the_formulas(classes: int, length: int) -> None:
    f_sine = np.linspace(50, 512, classes)
    f_cos = np.linspace(100, 512, classes)
    sine = basis("sine", classes, length)
    cosine = basis("cosine", classes, length)
    for c in range(classes):
        for t in range(length):
            assert sine[c, t] == pytest.approx(np.sin(f_sine[c] * t), abs=1e-6)
            assert cosine[c, t] == pytest.approx(np.cos(np.pi * f_cos[c] * (t + 0.5) / length), abs=1e-6)
    assert np.array_equal(basis("square", classes, length), np.sign(sine))
    assert set(np.unique(basis("square", classes, length))) <= {-1.0, 0.0, 1.0}
    random = basis("random", classes, length, seed=3)
    assert np.array_equal(random, basis("random", classes, length, seed=3))
    assert not np.array_equal(random, basis("random", classes, length, seed=4))


def test_basis_rows_differ_and_unknown_kind_is_refused() -> None:
    square = basis("square", 10, 256)
    assert len({row.tobytes() for row in square}) == 10
    with pytest.raises(ValueError, match="unknown basis"):
        basis("triangle", 3, 4)


@pytest.mark.parametrize("size,pooled", [(8, 4), (7, 2), (3, 4), (5, 5)])
def test_pooling_matrix_is_adaptive_average_pooling(size: int, pooled: int) -> None:
    x = np.arange(size, dtype=np.float64) ** 2
    expected = [x[(j * size) // pooled: -(-((j + 1) * size) // pooled)].mean() for j in range(pooled)]
    assert np.allclose(x @ pooling_matrix(size, pooled), expected)


def test_heads_project_on_the_formula_basis(tmp_path: Path) -> None:
    rewrite(mlp(8, (16,), 3), tmp_path / "out", basis="cosine")
    evaluation = onnx.load(str(tmp_path / "out/stages/0" / EVAL_MODEL))
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in evaluation.graph.node if n.op_type == "Constant"}
    constants |= {t.name: numpy_helper.to_array(t) for t in evaluation.graph.initializer}
    projection = next(v for k, v in constants.items() if k.startswith("lls0/basis"))
    assert np.allclose(projection, basis("cosine", 3, 16).T)


# -- trainable parameters and gradient isolation --------------------------------------


def test_plain_lls_heads_add_no_trainable_parameters(tmp_path: Path) -> None:
    model = cnn((4, 8), 3, image=8, batch_norm=False)
    original = {t.name for t in model.graph.initializer}
    report = rewrite(model, tmp_path / "out")
    assert set(report["parameters"]["trainable"]) == original
    details = report["passes"][-1]["details"]
    assert details["head_parameters"] == 0 and details["blocks"] == 3
    for stage in report["stages"]:
        training = onnx.load(str(tmp_path / "out" / stage["dir"] / TRAINING_MODEL))
        assert gradient_parameters(training) <= original


@pytest.mark.parametrize("variant,per_head", [("lls-m", 3), ("lls-mxm", 9)])
def test_lls_m_and_mxm_add_per_class_parameters(tmp_path: Path, variant: str, per_head: int) -> None:
    report = rewrite(cnn((4, 8), 3, image=8, batch_norm=False), tmp_path / "out", variant=variant)
    assert report["passes"][-1]["details"]["head_parameters"] == 2 * per_head


def test_no_gradient_path_from_one_block_loss_to_another_blocks_parameters(tmp_path: Path) -> None:
    report = rewrite(cnn((4, 8), 3, image=8, batch_norm=False), tmp_path / "out", variant="lls-mxm")
    seen: set[str] = set()
    for number, stage in enumerate(report["stages"]):
        training = onnx.load(str(tmp_path / "out" / stage["dir"] / TRAINING_MODEL))
        learned = gradient_parameters(training)
        own = {t.name for t in onnx.load(str(tmp_path / "out" / stage["dir"] / FORWARD_MODEL)).graph.initializer}
        assert learned and learned <= own
        assert not learned & seen, f"stage {number} trains parameters of an earlier stage"
        seen |= learned
        # the input handed on by the previous block gets no gradient: the chain is cut there
        produced = {out for node in training.graph.node for out in node.output}
        for name in stage["inputs"]:
            assert f"{name}_grad" not in produced
        # and the only parameters the training graph holds are its own block's (and head's)
        other = {t.name for t in onnx.load(str(tmp_path / "out" / FORWARD_MODEL)).graph.initializer} - own
        held = {t.name for t in training.graph.initializer} | {v.name for v in training.graph.input}
        assert not other & held


# -- learning, export, resume ------------------------------------------------------------


def test_two_block_toy_problem_learns(tmp_path: Path) -> None:
    rewrite(mlp(8, (32,), 3, seed=1), tmp_path / "out", lr=0.02)
    data = classification_data((8,), 3, n=192, seed=2)
    trainer = edgeplug.Trainer(tmp_path / "out", host=lls_host(), progress=False)
    result = trainer.fit(data, data, epochs=8, batch_size=16)
    assert result.initial_eval is not None and result.epochs[-1].eval is not None
    assert result.epochs[-1].eval.loss < 0.6 * result.initial_eval.loss
    assert result.epochs[-1].eval.accuracy is not None and result.epochs[-1].eval.accuracy > 0.9


def test_export_has_no_head_nodes_and_carries_trained_weights(tmp_path: Path) -> None:
    model = cnn((4, 8), 3, image=8, batch_norm=False)
    rewrite(model, tmp_path / "out", variant="lls-m")
    data = classification_data((1, 8, 8), 3, n=64)
    trainer = edgeplug.Trainer(tmp_path / "out", host=lls_host(), progress=False)
    trainer.fit(data, epochs=1, batch_size=16)
    exported = onnx.load(str(edgeplug.export(tmp_path / "out", tmp_path / "trained.onnx")))
    forward = onnx.load(str(tmp_path / "out" / FORWARD_MODEL))
    assert [n.op_type for n in exported.graph.node] == [n.op_type for n in forward.graph.node]
    assert not any(n.name.startswith("lls") or "lls" in "".join(n.output) for n in exported.graph.node)
    assert {t.name for t in exported.graph.initializer} == {t.name for t in forward.graph.initializer}
    changed = [t.name for t in exported.graph.initializer
               if not np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(next(f for f in forward.graph.initializer if f.name == t.name)))]
    assert {"conv0.weight", "conv1.weight", "fc.weight"} <= set(changed)
    # the exported model predicts what the trained stages predict
    runtime = edgeplug._ort.inference_runtime()
    logits = runtime.InferenceSession(str(tmp_path / "trained.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": data["x"]})[0]
    metrics = trainer.evaluate(data)
    assert metrics.accuracy == pytest.approx(float((logits.argmax(1) == data["y"]).mean()))


def test_resume_of_a_staged_run_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    data = classification_data((1, 8, 8), 3, n=48)
    for name in ("straight", "resumed"):
        rewrite(cnn((4, 8), 3, image=8, batch_norm=False), tmp_path / name, variant="lls-mxm")
    edgeplug.Trainer(tmp_path / "straight", host=lls_host(), progress=False).fit(data, epochs=2, batch_size=16)
    first = edgeplug.Trainer(tmp_path / "resumed", host=lls_host(), progress=False, checkpoint_every=2)
    first.fit(data, epochs=1, batch_size=16)
    checkpoint = edgeplug.checkpoints.latest_checkpoint(tmp_path / "resumed")
    assert checkpoint is not None and sorted(p.name for p in (checkpoint / "state").iterdir()) == ["0", "1", "2"]
    again = edgeplug.Trainer(tmp_path / "resumed", host=lls_host(), progress=False)
    result = again.fit(data, epochs=2, batch_size=16)
    assert result.resumed_from_step == 3 and result.steps_run == 3
    a = onnx.load(str(edgeplug.export(tmp_path / "straight", tmp_path / "a.onnx")))
    b = onnx.load(str(edgeplug.export(tmp_path / "resumed", tmp_path / "b.onnx")))
    for x, y in zip(a.graph.initializer, b.graph.initializer, strict=True):
        assert np.array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y)), x.name


# -- options and bad input ----------------------------------------------------------------


def test_named_blocks_cut_where_the_recipe_says(tmp_path: Path) -> None:
    report = rewrite(cnn((4, 8, 8), 3, image=8, batch_norm=False), tmp_path / "out", blocks=["act1"])
    assert [s["passes_on"] for s in report["stages"]] == [["a1"], []]
    assert report["passes"][-1]["details"]["stages"][0]["head"]["features"] == 8 * 4 * 4


def test_bad_input_is_one_clear_error(tmp_path: Path) -> None:
    model = cnn((4, 8), 3, image=8, batch_norm=False)
    with pytest.raises(RecipeError, match="no node named 'nope'"):
        rewrite(model, tmp_path / "a", blocks=["nope"])
    with pytest.raises(RecipeError, match="nothing is left"):
        rewrite(model, tmp_path / "b", blocks=["fc"])
    host = lls_host()
    recipe = recipe_from_dict({"loss": "mse", "passes": [{"name": "lls"}]}, host=host)
    with pytest.raises(RecipeError, match="cross-entropy"):
        edgeplug.rewrite(model, recipe, tmp_path / "c", host=host)
    with pytest.raises(RecipeError, match="variant"):
        recipe_from_dict({"passes": [{"name": "lls", "options": {"variant": "dfa"}}]}, host=host)
    frozen = recipe_from_dict({"passes": [{"name": "trainable", "options": {"layers": "classifier"}}, {"name": "lls"}]}, host=host)
    with pytest.raises(RecipeError, match="no trainable parameter"):
        edgeplug.rewrite(model, frozen, tmp_path / "d", host=host)
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_skip_connections_stay_inside_a_block(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3, n)
             for n, s in (("w0", (8, 8)), ("w1", (8, 8)), ("w2", (8, 3)))]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"], name="mm0"), helper.make_node("Relu", ["h0"], ["r0"], name="act0"),
             helper.make_node("MatMul", ["r0", "w1"], ["h1"], name="mm1"), helper.make_node("Relu", ["h1"], ["r1"], name="act1"),
             helper.make_node("Add", ["r1", "r0"], ["s"], name="skip"), helper.make_node("MatMul", ["s", "w2"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    report = rewrite(model, tmp_path / "auto")  # r1 cannot be a cut: r0 crosses it too, to the Add
    assert [s["passes_on"] for s in report["stages"]] == [["r0"], []]
    with pytest.raises(ModelError, match="skip connection"):
        rewrite(model, tmp_path / "named", blocks=["act1"])


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hidden=st.lists(st.integers(3, 12), min_size=1, max_size=3), classes=st.integers(2, 5),
       variant=st.sampled_from(["lls", "lls-m", "lls-mxm", "local-classifier"]), seed=st.integers(0, 5))
def test_generated_mlps_split_into_one_stage_per_layer_and_train(tmp_path_factory: pytest.TempPathFactory, hidden: list[int],
                                                                  classes: int, variant: str, seed: int) -> None:
    out = tmp_path_factory.mktemp("gen") / "out"
    model = mlp(6, tuple(hidden), classes, seed=seed)
    report = rewrite(model, out, variant=variant)
    assert len(report["stages"]) == len(hidden) + 1
    assert json.loads((out / "stages/0/report.json").read_text())["training"]["output"] == "lls0/logits"
    data = classification_data((6,), classes, n=32, seed=seed)
    result = edgeplug.Trainer(out, host=lls_host(), progress=False, checkpoints=False).fit(data, epochs=1, batch_size=16)
    assert result.steps_run == 2 and np.isfinite(result.epochs[-1].train.loss)


def _pooled_cnn() -> onnx.ModelProto:
    """The bench's HAPT 1D-CNN at width 4: blocks end in MaxPool."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import hapt_model

    return hapt_model.build_cnn(width=4)


@pytest.mark.parametrize("head_input,reads", [("before-pool", "relu"), ("block-output", "pool")])
def test_heads_read_before_the_pool_as_the_reference(tmp_path: Path, head_input: str, reads: str) -> None:
    report = rewrite(_pooled_cnn(), tmp_path / "out", head_input=head_input)
    blocks = [b for b in report["passes"][-1]["details"]["stages"] if b.get("head")]
    assert [b["cut"] for b in blocks] == ["pool0", "pool1", "pool2"]
    assert [b["head_reads"] for b in blocks] == [f"{reads}{i}" for i in range(3)]
    # 4 cells of the 128-sample activation vs of the 64-sample pooled output: same D, other values
    assert blocks[0]["head"]["features"] == 4 * 4


def test_lls_mxm_starts_like_the_reference(tmp_path: Path) -> None:
    rewrite(cnn((4, 8), 3, image=8, batch_norm=False), tmp_path / "out", variant="lls-mxm")
    forward = onnx.load(str(tmp_path / "out/stages/0" / FORWARD_MODEL))
    (mixing,) = [numpy_helper.to_array(t) for t in forward.graph.initializer if "class_mixing" in t.name]
    assert mixing.shape == (3, 3) and not np.allclose(mixing, np.eye(3)) and 0.001 < np.abs(mixing).max() < 0.05


def test_export_carries_the_batch_norm_statistics_the_stages_updated(tmp_path: Path) -> None:
    """Staged export copied only parameters with gradients: the running statistics that each stage's training
    updated were left at their initial values, and the exported model scored below what training reported."""
    model = cnn((4, 8), 3, image=8, batch_norm=True, seed=3)
    rewrite(model, tmp_path / "out", lr=0.02)
    data = classification_data((1, 8, 8), 3, n=96, seed=4)
    data["x"] = data["x"] * 3.0 + 1.5  # far from the statistics the model was built with
    trainer = edgeplug.Trainer(tmp_path / "out", host=lls_host(), progress=False)
    trainer.fit(data, epochs=3, batch_size=16)
    exported = onnx.load(str(edgeplug.export(tmp_path / "out", tmp_path / "trained.onnx")))
    values = {t.name: numpy_helper.to_array(t) for t in exported.graph.initializer}
    initial = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name in ("bn0.mean", "bn0.var", "bn1.mean", "bn1.var"):
        assert not np.array_equal(values[name], initial[name]), f"{name} was not exported"
    runtime = edgeplug._ort.inference_runtime()
    logits = runtime.InferenceSession(str(tmp_path / "trained.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": data["x"]})[0]
    assert trainer.evaluate(data).accuracy == pytest.approx(float((logits.argmax(1) == data["y"]).mean()))
