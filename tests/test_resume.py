"""Crash safety: a run interrupted anywhere and resumed reaches the same weights as one never interrupted."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import builders

import edgeplug
from edgeplug import _ort
from edgeplug.checkpoints import (
    LATEST,
    PROGRESS,
    STATE,
    checkpoints_dir,
    latest_checkpoint,
    read_progress,
)
from edgeplug.pipeline import rewrite
from edgeplug.plugins import PluginHost
from edgeplug.recipe import recipe_from_dict
from edgeplug.trainer import Trainer

RECIPE = {"optimizer": {"name": "adamw", "lr": 0.01}}


class SimulatedCrash(Exception):
    pass


class CrashAt:
    """A runtime hook that kills the run right after step `step` updated the weights."""

    def __init__(self, step: int) -> None:
        self.step = step

    @edgeplug.hookimpl
    def edgeplug_after_step(self, step: object, loss: float) -> None:
        if step.step == self.step:  # type: ignore[attr-defined]
            raise SimulatedCrash(f"crash after step {self.step}")


def final_weights(artifacts: Path) -> dict[str, np.ndarray]:
    checkpoint = latest_checkpoint(artifacts)
    assert checkpoint is not None
    state = _ort.training_api().CheckpointState.load_checkpoint(str(checkpoint / STATE))
    return {name: np.array(p.data, copy=True) for name, p in state.parameters if p.requires_grad}


def assert_same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not np.array_equal(a[name], b[name])]
    assert not different, f"weights differ after resume: {different}"


@pytest.fixture(scope="module")
def mlp_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A pristine artifact folder, the data, and the weights of an uninterrupted 3-epoch run."""
    root = tmp_path_factory.mktemp("resume")
    rewrite(builders.mlp(8, (16, 16), 3), recipe_from_dict(RECIPE), root / "pristine")
    data = builders.classification_data((8,), 3, n=60, seed=2)
    shutil.copytree(root / "pristine", root / "reference")
    Trainer(root / "reference", progress=False).fit(data, epochs=3, batch_size=16)
    return root / "pristine", data, final_weights(root / "reference")


@pytest.mark.parametrize("checkpoint_every, crash_step", [(None, 5), (3, 7), (3, 6), (2, 11), (5, 0)])
def test_crash_and_resume_in_process(mlp_setup: tuple[Path, dict[str, np.ndarray], dict[str, np.ndarray]],
                                     tmp_path: Path, checkpoint_every: int | None, crash_step: int) -> None:
    pristine, data, reference = mlp_setup
    artifacts = tmp_path / "artifacts"
    shutil.copytree(pristine, artifacts)
    host = PluginHost()
    host.register(CrashAt(crash_step), name="crash")
    with pytest.raises(edgeplug.PluginError, match="crash after step") as crashed:  # named after its plugin (#24)
        Trainer(artifacts, progress=False, checkpoint_every=checkpoint_every, host=host).fit(data, epochs=3, batch_size=16)
    assert isinstance(crashed.value.__cause__, SimulatedCrash)
    checkpoint = latest_checkpoint(artifacts)
    reached = read_progress(checkpoint)["step"] if checkpoint else 0
    assert reached <= crash_step  # the crashed step itself was never checkpointed
    result = Trainer(artifacts, progress=False, checkpoint_every=checkpoint_every).fit(data, epochs=3, batch_size=16)
    assert result.resumed_from_step == (reached if checkpoint else None)
    assert result.steps_run == 12 - reached  # 60 samples / 16 = 4 steps per epoch, 3 epochs
    assert_same_weights(final_weights(artifacts), reference)


def test_resume_equality_depends_on_optimizer_state(mlp_setup: tuple[Path, dict[str, np.ndarray], dict[str, np.ndarray]],
                                                    tmp_path: Path) -> None:
    """Sensitivity check: the checkpoint carries the AdamW moments and step, and resuming without them diverges.

    So the equality in test_crash_and_resume_in_process proves the optimizer state is restored.
    """
    pristine, data, reference = mlp_setup
    artifacts = tmp_path / "artifacts"
    shutil.copytree(pristine, artifacts)
    Trainer(artifacts, progress=False).fit(data, epochs=1, batch_size=16)
    checkpoint = latest_checkpoint(artifacts)
    assert checkpoint is not None
    with_moments = (checkpoint / STATE).stat().st_size
    assert with_moments > 2 * (artifacts / "checkpoint").stat().st_size  # parameters + first and second moments
    api = _ort.training_api()
    state = api.CheckpointState.load_checkpoint(str(checkpoint / STATE))
    api.CheckpointState.save_checkpoint(state, str(checkpoint / STATE), include_optimizer_state=False)
    assert (checkpoint / STATE).stat().st_size < with_moments
    Trainer(artifacts, progress=False).fit(data, epochs=3, batch_size=16)
    resumed = final_weights(artifacts)
    assert any(not np.array_equal(resumed[name], reference[name]) for name in reference)


def test_half_written_checkpoints_are_ignored(mlp_setup: tuple[Path, dict[str, np.ndarray], dict[str, np.ndarray]],
                                              tmp_path: Path) -> None:
    pristine, data, reference = mlp_setup
    artifacts = tmp_path / "artifacts"
    shutil.copytree(pristine, artifacts)
    Trainer(artifacts, progress=False).fit(data, epochs=2, batch_size=16)
    folder = checkpoints_dir(artifacts)
    good = latest_checkpoint(artifacts)
    assert good is not None and good.name == "step-00000008"
    # A crash while writing step 12: the staging folder, a step folder without trainer.json, one without state.
    staging = folder / ".step-00000012.partial-abc123"
    staging.mkdir()
    (staging / STATE).write_bytes(b"\0" * 10)
    no_progress = folder / "step-00000012"
    no_progress.mkdir()
    (no_progress / STATE).write_bytes(b"garbage")
    no_state = folder / "step-00000011"
    no_state.mkdir()
    (no_state / PROGRESS).write_text('{"epoch": 2, "batch": 3, "step": 11, "history": []}')
    # LATEST names a checkpoint that never completed.
    (folder / LATEST).write_text("step-00000012\n")
    assert latest_checkpoint(artifacts) == good
    # LATEST left stale (older) while a newer complete one exists: the newer one wins.
    (folder / LATEST).write_text("step-00000004\n")
    assert latest_checkpoint(artifacts) == good
    # A LATEST that names garbage.
    (folder / LATEST).write_text("../../etc\n")
    assert latest_checkpoint(artifacts) == good

    result = Trainer(artifacts, progress=False).fit(data, epochs=3, batch_size=16)
    assert result.resumed_from_step == 8 and result.steps_run == 4
    assert_same_weights(final_weights(artifacts), reference)


# -- a real process killed with SIGKILL ---------------------------------------------------------------


KILL_EPOCHS, KILL_BATCH = 3, 32


@pytest.fixture(scope="module")
def big_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("kill")
    model = builders.mlp(64, (256, 256), 10, seed=3)
    onnx.save(model, str(root / "model.onnx"))
    rewrite(model, recipe_from_dict(RECIPE), root / "pristine")
    data = builders.classification_data((64,), 10, n=3200, seed=4)
    np.savez(root / "train.npz", **data)
    return root / "pristine", root / "train.npz", data


def test_sigkill_mid_run_then_resume(big_setup: tuple[Path, Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    pristine, data_path, data = big_setup
    total_steps = KILL_EPOCHS * (len(data["y"]) // KILL_BATCH)

    reference = tmp_path / "reference"
    shutil.copytree(pristine, reference)
    Trainer(reference, progress=False).fit(data, epochs=KILL_EPOCHS, batch_size=KILL_BATCH)

    artifacts = tmp_path / "artifacts"
    shutil.copytree(pristine, artifacts)
    command = [sys.executable, "-m", "edgeplug.cli", "train", str(artifacts), "--data", str(data_path),
               "--epochs", str(KILL_EPOCHS), "--batch-size", str(KILL_BATCH), "--checkpoint-every", "7", "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        folder = checkpoints_dir(artifacts)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if folder.is_dir() and any(folder.glob("step-*")):
                break
            time.sleep(0.002)
        assert process.poll() is None, "the run ended before it could be killed; make it longer"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    checkpoint = latest_checkpoint(artifacts)
    reached = read_progress(checkpoint)["step"] if checkpoint else 0
    assert reached < total_steps, "killed too late"

    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    if checkpoint:
        assert f"resuming from {checkpoint.name}" in result.stdout
    assert f"done: {total_steps - reached} steps" in result.stdout
    assert read_progress(latest_checkpoint(artifacts))["step"] == total_steps
    assert_same_weights(final_weights(artifacts), final_weights(reference))
