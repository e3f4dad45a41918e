"""The pass contract as the framework enforces it: errors name the pass, outputs stay atomic."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from builders import mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

import edgeplug
from edgeplug import ForwardState, Pass, PassContext, PassReport, TrainingModels
from edgeplug.pipeline import RewriteResult, rewrite
from edgeplug.plugins import PluginHost
from edgeplug.recipe import PassSpec, Recipe


def make_pass(name: str, **methods: Callable[..., Any]) -> type[Pass]:
    """A Pass subclass named `name`; `report` defaults to an empty, valid report."""
    methods.setdefault("report", lambda self: PassReport(changed=False, summary="nothing"))
    return type(f"Pass_{name.replace('-', '_')}", (Pass,), {"name": name, "summary": f"test pass {name}", **methods})


def host_with(*passes: type[Pass]) -> PluginHost:
    class Plugin:
        @edgeplug.hookimpl
        def edgeplug_register_passes(self, register: Callable[[type[Pass]], None]) -> None:
            for factory in passes:
                register(factory)

    host = PluginHost(only={"normalize"})
    host.register(Plugin(), name="contract-test", version="9.9")
    return host


def run(tmp_path: Path, *passes: type[Pass], output: str = "out", **options: Any) -> RewriteResult:
    recipe = Recipe(passes=tuple(PassSpec(p.name, options.get(p.name, {})) for p in passes))
    return rewrite(mlp(), recipe, tmp_path / output, host=host_with(*passes))


def assert_nothing_written(tmp_path: Path, output: str = "out") -> None:
    assert not (tmp_path / output).exists()
    assert not list(tmp_path.glob(f".{output}.*")), "a staging folder was left behind"


def fail(self: Pass, *args: Any) -> Any:
    raise ValueError("bad tensor shape")


# -- a pass that raises -----------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["__init__", "rewrite_forward", "rewrite_training", "report"])
def test_a_raising_pass_is_named_with_its_phase_and_nothing_is_written(tmp_path: Path, phase: str) -> None:
    if phase == "__init__":
        broken = make_pass("broken", __init__=fail)
    else:
        broken = make_pass("broken", **{phase: fail})
    with pytest.raises(edgeplug.PassError) as caught:
        run(tmp_path, broken)
    error = caught.value
    assert (error.pass_name, error.phase) == ("broken", phase)
    assert str(error).startswith(f"pass 'broken' ({phase}): raised ValueError: bad tensor shape")
    assert "plugin 'contract-test' 9.9" in str(error)
    assert isinstance(error.__cause__, ValueError)  # kept for --debug
    assert_nothing_written(tmp_path)


def test_a_failed_rewrite_keeps_the_previous_output(tmp_path: Path) -> None:
    previous = tmp_path / "out"
    rewrite(mlp(), None, previous)  # --force replaces only artifact folders
    (previous / "keep.txt").write_text("old artifacts")
    with pytest.raises(edgeplug.PassError):
        recipe = Recipe(passes=(PassSpec("broken", {}),))
        rewrite(mlp(), recipe, previous, force=True, host=host_with(make_pass("broken", rewrite_forward=fail)))
    assert (previous / "keep.txt").read_text() == "old artifacts"
    assert not list(tmp_path.glob(".out.*"))


def test_a_user_error_raised_by_a_pass_keeps_its_type_and_gains_the_pass_name(tmp_path: Path) -> None:
    def refuse(self: Pass, state: ForwardState, context: PassContext) -> ForwardState:
        raise edgeplug.ModelError("the model has no Conv layer")

    with pytest.raises(edgeplug.ModelError, match="^pass 'picky': the model has no Conv layer$"):
        run(tmp_path, make_pass("picky", rewrite_forward=refuse))
    assert_nothing_written(tmp_path)


# -- a pass that returns something invalid ------------------------------------------------------------


def dangling(self: Pass, state: ForwardState, context: PassContext) -> ForwardState:
    model = onnx.ModelProto()
    model.CopyFrom(state.model)
    model.graph.node.append(helper.make_node("Relu", ["no_such_tensor"], ["orphan"], name="orphan"))
    return ForwardState(model, state.trainable)


def wrong_type(self: Pass, state: ForwardState, context: PassContext) -> Any:
    return state.model


def trains_an_input(self: Pass, state: ForwardState, context: PassContext) -> ForwardState:
    return ForwardState(state.model, state.trainable | {"x", "made_up"})


def invalid_training(self: Pass, models: TrainingModels, context: PassContext) -> TrainingModels:
    training = onnx.ModelProto()
    training.CopyFrom(models.training)
    training.graph.node.append(helper.make_node("Relu", ["no_such_tensor"], ["orphan"], name="orphan"))
    return TrainingModels(training, models.eval, models.optimizer)


@pytest.mark.parametrize(
    ("methods", "phase", "message"),
    [
        ({"rewrite_forward": dangling}, "rewrite_forward", "returned an invalid model: invalid ONNX model: "),
        ({"rewrite_forward": wrong_type}, "rewrite_forward", "returned ModelProto, expected ForwardState"),
        ({"rewrite_forward": trains_an_input}, "rewrite_forward", "marked non-parameters as trainable: made_up, x"),
        ({"rewrite_training": invalid_training}, "rewrite_training", "returned an invalid training model: "),
        ({"rewrite_training": lambda self, models, context: None}, "rewrite_training", "returned NoneType, expected TrainingModels"),
        ({"report": lambda self: {"changed": True}}, "report", "returned dict, expected PassReport"),
    ],
    ids=["dangling-input", "forward-wrong-type", "non-parameter-trainable", "invalid-training-model",
         "training-wrong-type", "report-wrong-type"],
)
def test_invalid_results_are_rejected_naming_the_pass(tmp_path: Path, methods: dict[str, Any], phase: str, message: str) -> None:
    with pytest.raises(edgeplug.PassError) as caught:
        run(tmp_path, make_pass("sloppy", **methods))
    assert (caught.value.pass_name, caught.value.phase) == ("sloppy", phase)
    assert str(caught.value).startswith(f"pass 'sloppy' ({phase}): {message}")
    assert_nothing_written(tmp_path)


def test_a_pass_without_report_is_an_error_naming_it(tmp_path: Path) -> None:
    silent = type("Silent", (Pass,), {"name": "silent", "summary": "forgot its report"})
    with pytest.raises(edgeplug.PassError, match=r"^pass 'silent' \(report\): raised NotImplementedError: pass 'silent' does not implement report\(\)"):
        run(tmp_path, silent)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    "details",
    [{"scale": np.float32(0.5)}, {"kept": {"a", "b"}}, {"array": np.arange(3)}, {"path": Path("x")}, {"what": object()}],
    ids=["numpy-scalar", "set", "numpy-array", "path", "object"],
)
def test_report_details_must_be_json_values(tmp_path: Path, details: dict[str, Any]) -> None:
    chatty = make_pass("chatty", report=lambda self: PassReport(changed=True, summary="numbers", details=details))
    with pytest.raises(edgeplug.PassError, match=r"^pass 'chatty' \(report\): details are not JSON values"):
        run(tmp_path, chatty)
    assert_nothing_written(tmp_path)


def test_report_details_reject_nan(tmp_path: Path) -> None:
    odd = make_pass("odd", report=lambda self: PassReport(changed=True, summary="nan", details={"ratio": float("nan")}))
    with pytest.raises(edgeplug.PassError, match="details are not JSON values"):
        run(tmp_path, odd)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(details=st.dictionaries(st.text(min_size=1, max_size=8), JSON, max_size=4))
def test_report_details_reach_report_json_unchanged(tmp_path_factory: pytest.TempPathFactory, details: dict[str, Any]) -> None:
    folder = tmp_path_factory.mktemp("details")
    reporter = make_pass("reporter", report=lambda self: PassReport(changed=False, summary="s", details=details))
    run(folder, reporter)
    entry = json.loads((folder / "out" / "report.json").read_text())["passes"][-1]
    assert (entry["name"], entry["plugin"], entry["version"], entry["details"]) == ("reporter", "contract-test", "9.9", details)
    assert entry["runtime_hooks"] is False


# -- order, options, trainable set, work_dir -----------------------------------------------------------


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.permutations(["first", "second", "third"]))
def test_passes_run_in_recipe_order_in_both_phases(tmp_path_factory: pytest.TempPathFactory, order: list[str]) -> None:
    calls: list[tuple[str, str]] = []

    def recorder(name: str) -> type[Pass]:
        def forward(self: Pass, state: ForwardState, context: PassContext) -> ForwardState:
            calls.append(("rewrite_forward", name))
            return state

        def training(self: Pass, models: TrainingModels, context: PassContext) -> TrainingModels:
            calls.append(("rewrite_training", name))
            return models

        return make_pass(name, rewrite_forward=forward, rewrite_training=training)

    factories = {name: recorder(name) for name in order}
    result = run(tmp_path_factory.mktemp("order"), *(factories[name] for name in order))
    assert calls == [("rewrite_forward", n) for n in order] + [("rewrite_training", n) for n in order]
    assert [entry["name"] for entry in result.report["passes"]] == ["normalize", *order]


def test_options_are_checked_against_the_pass_schema_before_it_is_built(tmp_path: Path) -> None:
    built: list[dict[str, Any]] = []

    def remember(self: Pass, options: dict[str, Any]) -> None:
        built.append(options)
        Pass.__init__(self, options)

    strict = make_pass("strict", __init__=remember)
    strict.options_schema = {"type": "object", "properties": {"rank": {"type": "integer"}}, "additionalProperties": False}
    with pytest.raises(edgeplug.RecipeError, match=r"options of pass 'strict': rank: 'four' is not of type 'integer'"):
        run(tmp_path, strict, strict={"rank": "four"})
    assert built == []
    run(tmp_path, strict, strict={"rank": 4})
    assert built == [{"rank": 4}]


def test_the_trainable_set_a_pass_returns_is_what_trains(tmp_path: Path) -> None:
    def only_last(self: Pass, state: ForwardState, context: PassContext) -> ForwardState:
        return ForwardState(state.model, frozenset({"fc1.weight"}))

    result = run(tmp_path, make_pass("narrow", rewrite_forward=only_last))
    assert result.report["parameters"]["trainable"] == ["fc1.weight"]
    assert result.report["parameters"]["frozen_count"] == 3


def test_a_pass_that_freezes_everything_is_a_recipe_error(tmp_path: Path) -> None:
    freeze_all = make_pass("freeze-all", rewrite_forward=lambda self, state, context: ForwardState(state.model, frozenset()))
    with pytest.raises(edgeplug.RecipeError, match="no parameter is trainable after the passes ran"):
        run(tmp_path, freeze_all)
    assert_nothing_written(tmp_path)


def test_files_a_pass_writes_to_its_work_dir_ship_with_the_artifacts(tmp_path: Path) -> None:
    seen: list[PassContext] = []

    def write_note(self: Pass, state: ForwardState, context: PassContext) -> ForwardState:
        seen.append(context)
        context.work_dir.mkdir(parents=True, exist_ok=True)
        (context.work_dir / "note.json").write_text('{"calibrated": false}')
        return state

    run(tmp_path, make_pass("noter", rewrite_forward=write_note))
    assert json.loads((tmp_path / "out" / "passes" / "noter" / "note.json").read_text()) == {"calibrated": False}
    (context,) = seen
    assert (context.work_dir.name, context.output_name, context.loss, context.calibration) == ("noter", "logits", "cross-entropy", None)
