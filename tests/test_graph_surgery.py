"""Graph surgery through onnx-ir: one extraction, one cleanup, the checks after each pass,
and models with If/Loop bodies or float16 tensors (each test fails on the hand-written surgery)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import classification_data, cnn, mlp, with_subgraph
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import edgeplug
from edgeplug.graph import GraphIndex
from edgeplug.passes import ForwardState, Pass, PassContext, PassReport
from edgeplug.plugin_api import extract, remove_unused
from edgeplug.recipe import recipe_from_dict

CLASSIFIER_ONLY = {"passes": [{"name": "trainable", "options": {"layers": "classifier"}}]}


def full_check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


# -- If / Loop bodies -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["If", "Loop"])
def test_extraction_keeps_producers_read_only_inside_a_body(kind: str) -> None:
    model = with_subgraph(kind)
    pruned = extract(model, ["logits"])
    full_check(pruned)
    assert {"act0", "scale"} <= {node.name for node in pruned.graph.node}
    assert GraphIndex(model).implicit_inputs[{"If": "branch", "Loop": "repeat"}[kind]]


def test_a_model_with_an_if_trains_its_classifier_and_exports(tmp_path: Path) -> None:
    model = with_subgraph("If")
    edgeplug.rewrite(model, recipe_from_dict(CLASSIFIER_ONLY), tmp_path / "out")
    full_check(onnx.load(str(tmp_path / "out" / "forward_model.onnx")))
    data = classification_data([8], 3, n=32)
    edgeplug.Trainer(tmp_path / "out", progress=False).fit(data, epochs=1, batch_size=8)
    exported = onnx.load(str(edgeplug.export(tmp_path / "out", tmp_path / "trained.onnx")))
    full_check(exported)
    from edgeplug.plugin_api import inference_session

    assert inference_session(exported).run(None, {"x": data["x"]})[0].shape == (32, 3)


def test_training_through_an_if_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(edgeplug.NoGradientError, match=r"op If \(node 'branch'\).*fc0"):
        edgeplug.rewrite(with_subgraph("If"), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_loop_is_refused_in_one_line_instead_of_aborting(tmp_path: Path) -> None:
    onnx.save(with_subgraph("Loop"), tmp_path / "loop.onnx")
    (tmp_path / "r.yaml").write_text("passes: [{name: trainable, options: {layers: classifier}}]\n", encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "edgeplug.cli", "rewrite", str(tmp_path / "loop.onnx"), "--recipe",
                          str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")], capture_output=True, text=True, check=False)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.count("\n") == 1 and "op Loop (node 'repeat')" in run.stderr and "unrolled" in run.stderr


# -- float16 ---------------------------------------------------------------------------------


def float16(model: onnx.ModelProto) -> onnx.ModelProto:
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    full_check(model)
    return model


def test_normalize_decomposes_float16_activations_in_float16(tmp_path: Path) -> None:
    """HardSwish's decomposition made float32 scalars: the normalized float16 model was invalid."""
    from edgeplug.normalize.decompose import decompose

    model = float16(mlp(activation="HardSwish"))
    assert decompose(model) == {"HardSwish": 1}
    full_check(model)


def test_a_float16_model_is_refused_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(edgeplug.ModelError, match="'logits' is float16.*convert the model to float32"):
        edgeplug.rewrite(float16(mlp(activation="HardSwish")), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class MixesFloatTypes(Pass):
    """A broken pass: adds a float16 constant to a float32 tensor."""

    name = "mixes-float-types"
    summary = "test pass"

    def rewrite_forward(self, state: ForwardState, context: PassContext) -> ForwardState:
        model = onnx.ModelProto()
        model.CopyFrom(state.model)
        position, node = next((i, n) for i, n in enumerate(model.graph.node) if n.op_type == "Relu")
        model.graph.node.insert(position + 1, helper.make_node("Add", [node.output[0], "half"], ["mixed"], name="mix"))
        model.graph.node.insert(position + 1, helper.make_node(
            "Constant", [], ["half"], name="half", value=numpy_helper.from_array(np.ones(16, np.float16), "half_value")))
        for consumer in model.graph.node:
            if consumer.op_type == "Gemm" and consumer.input[0] == node.output[0]:
                consumer.input[0] = "mixed"
        onnx.checker.check_model(model)  # the check the framework ran before: it accepts the mismatch
        return ForwardState(model, state.trainable)

    def report(self) -> PassReport:
        return PassReport(True, "mixed")


def test_a_pass_that_mixes_float16_and_float32_is_named(tmp_path: Path) -> None:
    host = edgeplug.PluginHost(only={"normalize"})

    class Plugin:
        @edgeplug.hookimpl
        def edgeplug_register_passes(self, register: object) -> None:
            register(MixesFloatTypes)  # type: ignore[operator]

    host.register(Plugin(), name="mixer")
    recipe = recipe_from_dict({"passes": [{"name": "mixes-float-types"}]}, host=host)
    with pytest.raises(edgeplug.PassError, match=r"pass 'mixes-float-types' \(rewrite_forward\): returned an invalid model.*float16"):
        edgeplug.rewrite(mlp(), recipe, tmp_path / "out", host=host)


# -- one extraction, one cleanup -----------------------------------------------------------


@st.composite
def dags(draw: st.DrawFn) -> onnx.ModelProto:
    """x -> random Add/Mul/Relu/MatMul nodes, each reading earlier tensors or initializers; every tensor an output."""
    count = draw(st.integers(2, 12))
    tensors, nodes, inits = ["x"], [], []
    for i in range(count):
        op = draw(st.sampled_from(["Add", "Mul", "Relu", "MatMul"]))
        a = draw(st.sampled_from(tensors))
        if op == "Relu":
            inputs = [a]
        elif op == "MatMul" or draw(st.booleans()):
            inits.append(numpy_helper.from_array(np.full((4, 4) if op == "MatMul" else (4,), i + 1, np.float32), f"w{i}"))
            inputs = [a, f"w{i}"]
        else:
            inputs = [a, draw(st.sampled_from(tensors))]
        nodes.append(helper.make_node(op, inputs, [f"t{i}"], name=f"n{i}"))
        tensors.append(f"t{i}")
    outputs = [helper.make_tensor_value_info(t, TensorProto.FLOAT, ["N", 4]) for t in tensors[1:]]
    graph = helper.make_graph(nodes, "dag", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@settings(max_examples=30, deadline=None)
@given(model=dags(), data=st.data())
def test_extraction_keeps_exactly_what_the_outputs_need(model: onnx.ModelProto, data: st.DataObject) -> None:
    wanted = data.draw(st.lists(st.sampled_from([v.name for v in model.graph.output]), min_size=1, max_size=3, unique=True))
    part = extract(model, wanted)
    full_check(part)
    index = GraphIndex(model)
    assert [n.name for n in part.graph.node] == [n.name for n in model.graph.node if n.name in index.ancestors(wanted)]
    used = {name for node in part.graph.node for name in node.input}
    assert [t.name for t in part.graph.initializer] == [t.name for t in model.graph.initializer if t.name in used]
    assert [v.name for v in part.graph.output] == wanted and part.ir_version == 8
    assert extract(model, wanted).SerializeToString() == part.SerializeToString()  # deterministic
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    from edgeplug.plugin_api import inference_session

    expected = dict(zip([v.name for v in model.graph.output], inference_session(model).run(None, {"x": x}), strict=True))
    for name, value in zip(wanted, inference_session(part).run(None, {"x": x}), strict=True):
        np.testing.assert_array_equal(value, expected[name])


def test_extraction_cuts_between_inner_tensors_and_keeps_local_functions() -> None:
    double = helper.make_function("local", "Double", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                                  [helper.make_opsetid("", 17)])
    unused = helper.make_function("local", "Unused", ["a"], ["b"], [helper.make_node("Neg", ["a"], ["b"])],
                                  [helper.make_opsetid("", 17)])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Double", ["r"], ["d"], name="double", domain="local"),
         helper.make_node("Neg", ["d"], ["y"], name="neg")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        value_info=[helper.make_tensor_value_info("r", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[double, unused])
    model.ir_version = 8
    part = extract(model, ["d"], ["r"])
    full_check(part)
    assert [n.name for n in part.graph.node] == ["double"] and [f.name for f in part.functions] == ["Double"]
    assert [v.name for v in part.graph.input] == ["r"] and part.graph.input[0].type == graph.value_info[0].type
    with pytest.raises(edgeplug.ModelError, match="no tensor named 'nope'"):
        extract(model, ["nope"])
    with pytest.raises(edgeplug.ModelError, match="cannot cut"):
        extract(model, ["y"], [])  # x is needed but not an input of the cut


def test_cleanup_removes_dead_nodes_and_initializers_but_not_what_a_body_reads() -> None:
    model = with_subgraph("If")
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "orphan"))
    model.graph.node.insert(2, helper.make_node("Relu", ["h0"], ["dead"], name="dead"))
    graph = model.graph
    assert remove_unused(model) == 2
    assert model.graph is graph  # the same graph object: editors holding it keep working
    assert "dead" not in {n.name for n in model.graph.node} and "orphan" not in {t.name for t in model.graph.initializer}
    assert {"act0", "scale"} <= {n.name for n in model.graph.node}
    full_check(model)
    assert remove_unused(model) == 0


@pytest.mark.slow
def test_freeze_bn_reads_initializers_without_scanning_them_all(tmp_path: Path) -> None:
    """onnx_edit.tensor_value scanned every initializer per lookup: quadratic in the number of BN layers."""
    from edgeplug_plugins.freeze_bn.freeze_bn_pass import FreezeBatchNormPass

    model = onnx.shape_inference.infer_shapes(cnn(tuple([4] * 1500), 3, image=4))
    instance = FreezeBatchNormPass({"layers": "all"})
    started = time.perf_counter()
    result = instance.rewrite_forward(ForwardState(model, frozenset()), PassContext(tmp_path, "logits", "cross-entropy"))
    assert time.perf_counter() - started < 60
    assert not any(node.op_type == "BatchNormalization" for node in result.model.graph.node)
