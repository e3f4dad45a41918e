"""The training sessions' memory setting (recipe `training.memory`, `Trainer(memory=...)`, `train --memory`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from builders import classification_data, cnn

import edgeplug
from edgeplug.cli import main
from edgeplug.errors import EdgeplugError, RecipeError
from edgeplug.recipe import recipe_from_dict

RECIPE = {"loss": "cross-entropy", "optimizer": {"name": "sgd", "lr": 0.05}, "passes": []}


def test_lean_sessions_train_the_same_as_the_arena(tmp_path: Path) -> None:
    """Only where tensors live changes: losses and weights are the same."""
    data = classification_data((1, 8, 8), 3, n=32, seed=4)
    edgeplug.rewrite(cnn((4, 8), 3, image=8), recipe_from_dict(RECIPE), tmp_path / "out")
    losses = {}
    for memory in ("arena", "lean"):
        trainer = edgeplug.Trainer(tmp_path / "out", progress=False, checkpoints=False, memory=memory)
        assert trainer.memory == memory
        losses[memory] = trainer.fit(data, epochs=2, batch_size=8).step_losses
    assert losses["lean"] == losses["arena"]


def test_the_recipe_sets_the_memory_and_the_device_contract_repeats_it(tmp_path: Path) -> None:
    lean = recipe_from_dict({**RECIPE, "training": {"memory": "lean"}})
    assert lean.memory == "lean" and lean.to_dict()["training"] == {"memory": "lean"}
    report = edgeplug.rewrite(cnn((4,), 3, image=8), lean, tmp_path / "lean").report
    assert report["device_runtime"]["training"] == {"memory": "lean", "cpu_mem_arena": False, "mem_reuse": False}
    assert json.loads((tmp_path / "lean" / "recipe.json").read_text())["training"] == {"memory": "lean"}
    assert edgeplug.Trainer(tmp_path / "lean", progress=False).memory == "lean"
    assert edgeplug.Trainer(tmp_path / "lean", progress=False, memory="arena").memory == "arena"
    plain = edgeplug.rewrite(cnn((4,), 3, image=8), recipe_from_dict(RECIPE), tmp_path / "plain").report
    assert plain["device_runtime"]["training"]["memory"] == "arena" and "training" not in recipe_from_dict(RECIPE).to_dict()


def test_a_bad_memory_setting_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RecipeError, match="memory"):
        recipe_from_dict({**RECIPE, "training": {"memory": "tiny"}})
    edgeplug.rewrite(cnn((4,), 3, image=8), recipe_from_dict(RECIPE), tmp_path / "out")
    with pytest.raises(EdgeplugError, match="memory must be one of arena, lean"):
        edgeplug.Trainer(tmp_path / "out", memory="tiny")
    status = main(["train", str(tmp_path / "out"), "--data", str(tmp_path / "none.npz"), "--memory", "tiny"])
    assert status == 2 and "invalid choice" in capsys.readouterr().err
