"""The public Python API: names stay callable, resume refuses a different seed."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from builders import classification_data, mlp

import edgeplug


def test_public_functions_stay_functions_after_their_modules_load(tmp_path: Path) -> None:
    import edgeplug.exporter
    import edgeplug.pipeline  # noqa: F401

    for round_ in range(2):
        out = tmp_path / f"out{round_}"
        edgeplug.rewrite(mlp(), None, out)
        edgeplug.Trainer(out, progress=False).fit(classification_data([8], 3, n=16), epochs=1, batch_size=8)
        edgeplug.export(out, tmp_path / f"m{round_}.onnx")
        assert onnx.load(str(tmp_path / f"m{round_}.onnx")).graph.output[0].name == "logits"
    assert edgeplug.rewrite is edgeplug.pipeline.rewrite and edgeplug.export is edgeplug.exporter.export
    assert edgeplug.Trainer is edgeplug.trainer.Trainer and edgeplug.inspect_model is edgeplug.inspection.inspect_model


def test_resume_with_another_seed_is_refused(tmp_path: Path) -> None:
    edgeplug.rewrite(mlp(), None, tmp_path / "out")
    data = classification_data([8], 3, n=32)
    edgeplug.Trainer(tmp_path / "out", seed=1, progress=False).fit(data, epochs=1, batch_size=8)
    with pytest.raises(edgeplug.EdgeplugError, match="seed 1"):
        edgeplug.Trainer(tmp_path / "out", seed=2, progress=False).fit(data, epochs=2, batch_size=8)


def test_normalize_is_a_core_stage_that_runs_whatever_plugins_load(tmp_path: Path) -> None:
    host = edgeplug.PluginHost(only={"trainable"})
    assert host.get_pass("normalize").plugin == "edgeplug"
    report = edgeplug.rewrite(mlp(), None, tmp_path / "out", host=host).report
    assert [entry["name"] for entry in report["passes"]] == ["normalize"]
    recipe = edgeplug.Recipe(passes=(edgeplug.recipe.PassSpec("trainable", {"layers": "classifier"}),
                                     edgeplug.recipe.PassSpec("normalize", {"decompose": True, "dynamic_batch": True,
                                                                             "infer_shapes": True})))
    with pytest.raises(edgeplug.RecipeError, match="normalize runs first"):
        edgeplug.rewrite(mlp(), recipe, tmp_path / "late", host=host)


def test_normalize_cannot_be_blocked(plugin_env: pytest.MonkeyPatch) -> None:
    plugin_env.setenv("EDGEPLUG_BLOCK_PLUGINS", "normalize")
    with pytest.raises(edgeplug.PluginError, match="a stage of the core that every rewrite runs"):
        edgeplug.PluginHost()
