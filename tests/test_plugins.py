"""Plugin discovery and loading: real and fake entry points, EDGEPLUG_PLUGINS, tracing, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import classification_data, cnn, mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import edgeplug
from edgeplug.plugins import PluginHost, default_host

pytestmark = pytest.mark.usefixtures("plugin_env")

BUILT_IN = {"normalize", "trainable", "freeze-bn"}

PASS_PLUGIN = """
import edgeplug

class FakePass(edgeplug.Pass):
    name = {pass_name!r}
    summary = "a pass from a fake distribution"

    def report(self):
        return edgeplug.PassReport(changed=False, summary="nothing")

@edgeplug.hookimpl
def edgeplug_register_passes(register):
    register(FakePass)
"""


def pass_plugin(pass_name: str) -> str:
    return PASS_PLUGIN.format(pass_name=pass_name)


# -- EDGEPLUG_PLUGINS and loading errors (fake distributions) ---------------------------------


def test_fake_distribution_is_discovered_with_its_version(fake_plugin) -> None:
    fake_plugin("alpha", pass_plugin("alpha-pass"), version="2.0.1")
    info = PluginHost().get_pass("alpha-pass")
    assert (info.plugin, info.version, info.summary) == ("alpha", "2.0.1", "a pass from a fake distribution")


def test_only_named_plugins_load(fake_plugin, plugin_env) -> None:
    alpha = fake_plugin("alpha", pass_plugin("alpha-pass"))
    beta = fake_plugin("beta", pass_plugin("beta-pass"))
    plugin_env.setenv("EDGEPLUG_PLUGINS", " alpha , trainable,")
    host = default_host()
    assert host.plugin_names() == ["alpha", "trainable"]
    assert sorted(host.passes()) == ["alpha-pass", "normalize", "trainable"]  # normalize: the core's stage
    assert alpha in sys.modules and beta not in sys.modules  # an unnamed plugin is not even imported


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chosen=st.sets(st.sampled_from(["alpha", "beta", "gamma", "trainable"]), min_size=1),
       separator=st.sampled_from([",", ", ", " ,", ",,"]))
def test_only_variable_selects_exactly_the_named_subset(fake_plugin, plugin_env, chosen, separator) -> None:
    for name in ("alpha", "beta", "gamma"):
        if not _has_entry_point(name):
            fake_plugin(name, pass_plugin(f"{name}-pass"))
    plugin_env.setenv("EDGEPLUG_PLUGINS", separator.join(sorted(chosen)))
    host = PluginHost()
    assert host.plugin_names() == sorted(chosen)
    assert set(host.passes()) == {n if n == "trainable" else f"{n}-pass" for n in chosen} | {"normalize"}


def _has_entry_point(name: str) -> bool:
    import importlib.metadata

    return any(e.name == name for e in importlib.metadata.entry_points(group="edgeplug"))


def test_naming_an_uninstalled_plugin_is_a_clear_error(plugin_env) -> None:
    plugin_env.setenv("EDGEPLUG_PLUGINS", "trainable,no-such-plugin")
    with pytest.raises(edgeplug.PluginError, match="EDGEPLUG_PLUGINS names plugins that are not installed: no-such-plugin") as caught:
        default_host()
    assert "trainable" in str(caught.value)  # lists what is installed


def test_a_plugin_whose_import_raises_is_named(fake_plugin, plugin_env) -> None:
    module = fake_plugin("broken", "raise RuntimeError('missing native library')\n")
    plugin_env.setenv("EDGEPLUG_PLUGINS", "broken")
    with pytest.raises(edgeplug.PluginError) as caught:
        PluginHost()
    message = str(caught.value)
    assert "plugin 'broken'" in message and module in message
    assert "failed to import: RuntimeError: missing native library" in message


def test_duplicate_pass_names_name_both_plugins(fake_plugin) -> None:
    fake_plugin("first", pass_plugin("same-name"))
    fake_plugin("second", pass_plugin("same-name"))
    host = PluginHost(only={"first", "second"})
    with pytest.raises(edgeplug.PluginError, match="pass 'same-name' is registered twice, by plugins 'first' and 'second'"):
        host.passes()


@pytest.mark.parametrize(
    ("registered", "expected"),
    [
        ("object", "not a subclass of edgeplug.Pass"),
        ("lambda options: None", "not a subclass of edgeplug.Pass"),
        ("edgeplug.PassReport", "not a subclass of edgeplug.Pass"),
        ("type('Nameless', (edgeplug.Pass,), {'summary': 'x'})", "registered Nameless without a name or summary"),
        ("type('Quiet', (edgeplug.Pass,), {'name': 'quiet'})", "registered Quiet without a name or summary"),
    ],
)
def test_registering_a_non_pass_is_an_error(fake_plugin, registered: str, expected: str) -> None:
    fake_plugin("odd", f"import edgeplug\n\n@edgeplug.hookimpl\ndef edgeplug_register_passes(register):\n    register({registered})\n")
    with pytest.raises(edgeplug.PluginError, match=f"plugin 'odd' {expected}" if "without" in expected else expected) as caught:
        PluginHost(only={"odd"}).passes()
    assert "'odd'" in str(caught.value)


def test_a_plugin_failing_while_registering_is_named(fake_plugin) -> None:
    fake_plugin("flaky", "import edgeplug\n\n@edgeplug.hookimpl\ndef edgeplug_register_passes(register):\n    {}['key']\n")
    with pytest.raises(edgeplug.PluginError, match="plugin 'flaky' failed while registering passes: KeyError"):
        PluginHost(only={"flaky"}).passes()


def test_a_hookimpl_with_unknown_arguments_is_rejected_at_load(fake_plugin) -> None:
    fake_plugin("typo", "import edgeplug\n\n@edgeplug.hookimpl\ndef edgeplug_after_step(step, loss, epoch_loss):\n    pass\n")
    with pytest.raises(edgeplug.PluginError, match="plugin 'typo' is invalid"):
        PluginHost(only={"typo"})


def test_unknown_pass_lists_the_registered_ones() -> None:
    host = PluginHost(only={"trainable"})
    with pytest.raises(edgeplug.PluginError, match=r"no pass named 'nope' is registered \(registered: normalize, trainable\); see 'edgeplug passes'"):
        host.get_pass("nope")


def test_trace_variable_writes_every_hook_call_to_stderr(plugin_env, capsys) -> None:
    plugin_env.setenv("EDGEPLUG_TRACE_HOOKS", "1")
    host = PluginHost(only={"trainable"})
    host.after_step(step=None, loss=0.5)
    trace = capsys.readouterr().err
    assert "[edgeplug hooks]   edgeplug_after_step" in trace
    assert "loss: 0.5" in trace and "finish edgeplug_after_step" in trace


def test_no_trace_without_the_variable(capsys) -> None:
    PluginHost(only={"trainable"}).passes()
    assert "[edgeplug hooks]" not in capsys.readouterr().err


def test_built_in_plugins_register_through_entry_points() -> None:
    passes = PluginHost().passes()
    assert BUILT_IN <= set(passes)
    for name in BUILT_IN:
        plugin = "edgeplug" if name == "normalize" else name  # normalize is the core's own stage
        assert (passes[name].plugin, passes[name].version) == (plugin, edgeplug.__version__)


def test_reset_default_host_rereads_the_environment(plugin_env) -> None:
    plugin_env.setenv("EDGEPLUG_PLUGINS", "trainable")
    assert default_host().plugin_names() == ["trainable"]
    assert default_host() is default_host()
    plugin_env.setenv("EDGEPLUG_PLUGINS", "freeze-bn")
    assert default_host().plugin_names() == ["trainable"]  # cached until reset
    edgeplug.plugins.reset_default_host()
    assert default_host().plugin_names() == ["freeze-bn"]


# -- the example plugin, installed for real with pip -----------------------------------------------


_RUN_COMMANDS = """
import shlex, sys
from edgeplug.cli import main
for command in sys.argv[1:]:
    if main(shlex.split(command)) != 0:
        sys.exit(f"failed: edgeplug {command}")
"""


def _cli(site: Path, *commands: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run edgeplug commands in one fresh interpreter (one import of onnxruntime) that sees only `site`."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("EDGEPLUG_PLUGINS", None)
    result = subprocess.run([sys.executable, "-c", _RUN_COMMANDS, *commands], env=env, cwd=cwd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{commands} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_installed_example_plugin_is_listed_by_the_cli(bitfit_site: Path, tmp_path: Path) -> None:
    listed = {row["name"]: row for row in json.loads(_cli(bitfit_site, "passes --json", cwd=tmp_path).stdout)}
    assert listed["bitfit"]["plugin"] == "bitfit"
    assert listed["bitfit"]["version"] == "0.1.0"
    assert BUILT_IN <= set(listed)


def test_installed_example_plugin_trains_only_biases(bitfit_site: Path, tmp_path: Path) -> None:
    model = mlp(features=8, hidden=(16,), classes=3)
    onnx.save(model, tmp_path / "model.onnx")
    np.savez(tmp_path / "train.npz", **classification_data([8], 3, n=64))
    (tmp_path / "recipe.yaml").write_text(
        "version: 1\nloss: cross-entropy\noptimizer: {name: adamw, lr: 0.05}\n"
        "passes:\n  - name: bitfit\n    options: {ema_decay: 0.5}\n", encoding="utf-8")
    _cli(bitfit_site, "rewrite model.onnx --recipe recipe.yaml -o out", "train out --data train.npz --epochs 2 --no-progress",
         "export out -o trained.onnx", cwd=tmp_path)

    entry = next(p for p in json.loads((tmp_path / "out" / "report.json").read_text())["passes"] if p["name"] == "bitfit")
    assert (entry["plugin"], entry["version"], entry["runtime_hooks"]) == ("bitfit", "0.1.0", True)
    assert entry["details"]["trainable"] == ["fc0.bias", "fc1.bias"]
    assert (entry["details"]["trainable_values"], entry["details"]["total_values"]) == (16 + 3, 8 * 16 + 16 + 16 * 3 + 3)

    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "trained.onnx")).graph.initializer}
    assert set(after) == set(before)
    for name, original in before.items():
        if name.endswith(".bias"):
            assert not np.array_equal(original, after[name]), f"{name} did not train"
        else:
            assert original.tobytes() == after[name].tobytes(), f"{name} changed but is frozen"

    ema = json.loads((tmp_path / "out" / "passes" / "bitfit" / "loss_ema.json").read_text())
    assert ema["steps"] == 4 and np.isfinite(ema["loss_ema"])  # 2 epochs x 64 samples / batch 32
    latest = (tmp_path / "out" / "checkpoints" / "LATEST").read_text().strip()
    assert json.loads((tmp_path / "out" / "checkpoints" / latest / "hooks" / "bitfit.json").read_text()) == ema


@pytest.fixture
def bitfit(bitfit_site: Path, plugin_env: pytest.MonkeyPatch):
    """The installed example plugin's pass class, imported in this process from the pip target."""
    plugin_env.syspath_prepend(str(bitfit_site))
    host = PluginHost(only={"bitfit", "normalize"})
    yield host.get_pass("bitfit")
    for name in [m for m in sys.modules if m.startswith("edgeplug_bitfit")]:
        del sys.modules[name]


def test_installed_example_plugin_loads_in_process(bitfit, bitfit_site: Path) -> None:
    assert (bitfit.name, bitfit.plugin, bitfit.version) == ("bitfit", "bitfit", "0.1.0")
    assert Path(sys.modules[bitfit.factory.__module__].__file__).is_relative_to(bitfit_site)
    assert bitfit.factory.options_schema["properties"]["ema_decay"]["default"] == 0.9


def _select(bitfit, model: onnx.ModelProto, options: dict | None = None) -> set[str]:
    from edgeplug.graph import GraphIndex
    from edgeplug.passes import fill_defaults

    instance = bitfit.factory(fill_defaults(options or {}, bitfit.factory.options_schema))
    context = edgeplug.PassContext(work_dir=Path("unused"), output_name="logits", loss="cross-entropy")
    state = edgeplug.ForwardState(model, frozenset(GraphIndex(model).parameters()))
    chosen = instance.rewrite_forward(state, context).trainable
    details = json.loads(json.dumps(dict(instance.report().details)))
    assert details["trainable"] == sorted(chosen)
    return set(chosen)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hidden=st.lists(st.integers(1, 6), max_size=3), classes=st.integers(1, 4))
def test_example_plugin_finds_every_gemm_bias(bitfit, hidden: list[int], classes: int) -> None:
    assert _select(bitfit, mlp(features=3, hidden=hidden, classes=classes)) == {f"fc{i}.bias" for i in range(len(hidden) + 1)}


def test_example_plugin_finds_conv_and_matmul_add_biases_but_not_batch_norm(bitfit) -> None:
    assert _select(bitfit, cnn(channels=(2, 3), classes=4)) == {"conv0.bias", "conv1.bias", "fc.bias"}
    weight = numpy_helper.from_array(np.ones((3, 2), np.float32), "w")
    bias = numpy_helper.from_array(np.zeros(2, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"], name="mm"), helper.make_node("Add", ["b", "xw"], ["logits"], name="add")],
        "matmul_add", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], [weight, bias],
    )
    assert _select(bitfit, helper.make_model(graph)) == {"b"}


def test_example_plugin_include_patterns_replace_the_default(bitfit) -> None:
    assert _select(bitfit, mlp(hidden=(4, 4)), {"include": ["fc2.*", "fc0.weight"]}) == {"fc2.weight", "fc2.bias", "fc0.weight"}
    with pytest.raises(edgeplug.RecipeError, match="no parameter matches the include patterns"):
        _select(bitfit, mlp(), {"include": ["nothing*"]})


def test_example_plugin_options_are_validated_against_its_schema(bitfit) -> None:
    from edgeplug.recipe import recipe_from_dict

    host = PluginHost(only={"bitfit", "normalize"})
    recipe = recipe_from_dict({"version": 1, "passes": [{"name": "bitfit"}]}, host=host)
    assert dict(recipe.passes[0].options) == {"ema_decay": 0.9}
    with pytest.raises(edgeplug.RecipeError, match=r"passes\[0\]\.options\.ema_decay"):
        recipe_from_dict({"version": 1, "passes": [{"name": "bitfit", "options": {"ema_decay": 1.5}}]}, host=host)
    with pytest.raises(edgeplug.RecipeError, match="passes\\[0\\]\\.options"):
        recipe_from_dict({"version": 1, "passes": [{"name": "bitfit", "options": {"biases": []}}]}, host=host)
