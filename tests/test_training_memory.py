"""The training sessions' memory setting (recipe `training.memory`, `Trainer(memory=...)`, `train --memory`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from builders import classification_data, cnn

import edgeplug
from edgeplug.cli import main
from edgeplug.errors import EdgeplugError, RecipeError
from edgeplug.memory_settings import DEFAULT_MEMORY, MEMORY_SETTINGS, SessionSwitches, recipe_memory, switches
from edgeplug.recipe import recipe_from_dict
from edgeplug.trainer import session_options

RECIPE = {"loss": "cross-entropy", "optimizer": {"name": "sgd", "lr": 0.05}, "passes": []}


def test_every_memory_setting_trains_the_same(tmp_path: Path) -> None:
    """Only where tensors live changes: losses and weights are the same."""
    data = classification_data((1, 8, 8), 3, n=32, seed=4)
    edgeplug.rewrite(cnn((4, 8), 3, image=8), recipe_from_dict(RECIPE), tmp_path / "out")
    losses, weights = {}, {}
    for memory in MEMORY_SETTINGS:
        trainer = edgeplug.Trainer(tmp_path / "out", progress=False, checkpoints=False, memory=memory)
        assert trainer.memory == memory
        losses[memory] = trainer.fit(data, epochs=2, batch_size=8).step_losses
        weights[memory] = trainer.parameters()
    for memory in MEMORY_SETTINGS:
        assert losses[memory] == losses["arena"]
        assert all(np.array_equal(weights[memory][name], value) for name, value in weights["arena"].items())


def test_the_default_is_compact_and_each_setting_names_its_session_switches() -> None:
    """compact = arena without planned reuse; a runtime reads the switches from the device contract."""
    assert recipe_from_dict(RECIPE).memory == DEFAULT_MEMORY == "compact"
    assert recipe_memory({}) == recipe_memory({"training": {}}) == "compact"
    assert switches("compact") == SessionSwitches(cpu_mem_arena=True, mem_reuse=False)
    assert switches("arena") == SessionSwitches(cpu_mem_arena=True, mem_reuse=True)
    assert switches("lean") == SessionSwitches(cpu_mem_arena=False, mem_reuse=False)
    assert session_options(None, "arena") is None  # onnxruntime's own defaults
    compact = session_options(None, "compact")
    assert compact.enable_cpu_mem_arena and not compact.enable_mem_reuse


def test_the_recipe_sets_the_memory_and_the_device_contract_repeats_it(tmp_path: Path) -> None:
    lean = recipe_from_dict({**RECIPE, "training": {"memory": "lean"}})
    assert lean.memory == "lean" and lean.to_dict()["training"] == {"memory": "lean"}
    report = edgeplug.rewrite(cnn((4,), 3, image=8), lean, tmp_path / "lean").report
    assert report["device_runtime"]["training"] == {"memory": "lean", "cpu_mem_arena": False, "mem_reuse": False}
    assert json.loads((tmp_path / "lean" / "recipe.json").read_text())["training"] == {"memory": "lean"}
    assert edgeplug.Trainer(tmp_path / "lean", progress=False).memory == "lean"
    assert edgeplug.Trainer(tmp_path / "lean", progress=False, memory="arena").memory == "arena"
    plain = edgeplug.rewrite(cnn((4,), 3, image=8), recipe_from_dict(RECIPE), tmp_path / "plain").report
    assert plain["device_runtime"]["training"] == {"memory": "compact", "cpu_mem_arena": True, "mem_reuse": False}
    assert "training" not in recipe_from_dict(RECIPE).to_dict()
    arena = recipe_from_dict({**RECIPE, "training": {"memory": "arena"}})
    assert arena.to_dict()["training"] == {"memory": "arena"}


def test_a_bad_memory_setting_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RecipeError, match="memory"):
        recipe_from_dict({**RECIPE, "training": {"memory": "tiny"}})
    edgeplug.rewrite(cnn((4,), 3, image=8), recipe_from_dict(RECIPE), tmp_path / "out")
    with pytest.raises(EdgeplugError, match="memory must be one of compact, arena, lean"):
        edgeplug.Trainer(tmp_path / "out", memory="tiny")
    status = main(["train", str(tmp_path / "out"), "--data", str(tmp_path / "none.npz"), "--memory", "tiny"])
    assert status == 2 and "invalid choice" in capsys.readouterr().err
