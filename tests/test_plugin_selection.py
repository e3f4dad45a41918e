"""Which plugins load (EDGEPLUG_PLUGINS, EDGEPLUG_BLOCK_PLUGINS), which pass names are reserved, and
the per-pass preconditions checked before any pass runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from builders import cnn
from test_plugins import pass_plugin

import edgeplug
from edgeplug.plugins import BLOCK_PLUGINS_VARIABLE, ONLY_PLUGINS_VARIABLE, built_in_pass_names
from edgeplug.recipe import recipe_from_dict


def test_built_in_pass_names_are_pass_names_not_plugin_names() -> None:
    names = built_in_pass_names()
    assert {"quantize-frozen", "qcore", "normalize", "trainable"} <= names


def test_a_plugin_cannot_take_the_name_of_a_second_pass_of_a_built_in_plugin(fake_plugin) -> None:
    fake_plugin("squatter", pass_plugin("quantize-frozen"))
    with pytest.raises(edgeplug.PluginError, match="plugin 'squatter' registers a pass named 'quantize-frozen', the name of a built-in pass"):
        edgeplug.PluginHost(only={"squatter"}).passes()


def test_blocked_plugins_are_not_loaded(fake_plugin, plugin_env: pytest.MonkeyPatch) -> None:
    module = fake_plugin("noisy", pass_plugin("noisy-pass"))
    plugin_env.setenv(BLOCK_PLUGINS_VARIABLE, "noisy, qcore")
    passes = edgeplug.PluginHost().passes()
    assert "noisy-pass" not in passes and "qcore" not in passes and "quantize-frozen" not in passes
    assert "trainable" in passes
    import sys

    assert module not in sys.modules  # a blocked plugin is not even imported


def test_blocking_an_unknown_plugin_names_the_installed_ones(plugin_env: pytest.MonkeyPatch) -> None:
    plugin_env.setenv(BLOCK_PLUGINS_VARIABLE, "nope")
    with pytest.raises(edgeplug.PluginError, match=f"{BLOCK_PLUGINS_VARIABLE} names plugins that are not installed: nope.*trainable"):
        edgeplug.PluginHost()


def test_arguments_replace_both_variables(plugin_env: pytest.MonkeyPatch) -> None:
    plugin_env.setenv(BLOCK_PLUGINS_VARIABLE, "trainable")
    plugin_env.setenv(ONLY_PLUGINS_VARIABLE, "qcore")
    assert "trainable" in edgeplug.PluginHost(only={"trainable"}).passes()
    assert "trainable" not in edgeplug.PluginHost(block={"trainable"}).passes()


def test_lls_not_last_is_refused_before_any_pass_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeplug_plugins.lls.lls_pass import LocalLearningPass

    def never(*args: object) -> None:
        raise AssertionError("a pass ran although the recipe cannot work")

    monkeypatch.setattr(LocalLearningPass, "rewrite_forward", never)
    recipe = recipe_from_dict({"passes": [{"name": "lls"}, {"name": "freeze-bn"}]})
    with pytest.raises(edgeplug.RecipeError, match="pass .lls.: lls splits the model into training stages, so it must be the last pass; move 'freeze-bn' before it"):
        edgeplug.rewrite(cnn((4, 8), 3, image=8), recipe, tmp_path / "out")
    recipe = recipe_from_dict({"loss": "mse", "passes": [{"name": "lls"}]})
    with pytest.raises(edgeplug.RecipeError, match="set 'loss: cross-entropy'"):
        edgeplug.rewrite(cnn((4, 8), 3, image=8), recipe, tmp_path / "out")
