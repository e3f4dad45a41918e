"""Concurrent use and killed writers: one writer per output folder, stale staging cleaned, SIGKILL anywhere.

Real processes throughout. CI kills a handful of times; `EDGEPLUG_LONG_FUZZ=1` (and
`EDGEPLUG_KILLS=N`) kills many times.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import classification_data, mlp, write_plugin_distribution
from test_resume import assert_same_weights, final_weights

import edgeplug
from edgeplug.checkpoints import checkpoints_dir, latest_checkpoint, read_progress
from edgeplug.locking import lock_path, output_lock, remove_stale_staging
from edgeplug.pipeline import rewrite
from edgeplug.recipe import recipe_from_dict
from edgeplug.trainer import Trainer

LONG = os.environ.get("EDGEPLUG_LONG_FUZZ") == "1"
KILLS = int(os.environ.get("EDGEPLUG_KILLS", "40" if LONG else "3"))
PREFIX = "edgeplug: error: "
ARTIFACT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", "forward_model.onnx",
                  "recipe.json", "report.json")


def command(*args: object) -> list[str]:
    return [sys.executable, "-m", "edgeplug.cli", *map(str, args)]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", **extra}


def wait_for(predicate, process: subprocess.Popen[bytes], seconds: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not predicate():
        assert process.poll() is None, "the process ended before the test could act"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=60)


def assert_complete(folder: Path) -> None:
    for name in ARTIFACT_FILES:
        assert (folder / name).is_file(), f"{folder} lacks {name}"
    json.loads((folder / "report.json").read_text())


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("concurrency")
    onnx.save(mlp(64, (256, 256), 10, seed=3), str(root / "model.onnx"))
    data = classification_data((64,), 10, n=3200, seed=4)
    np.savez(root / "train.npz", **data)
    rewrite(root / "model.onnx", recipe_from_dict({"optimizer": {"name": "adamw", "lr": 0.01}}), root / "pristine")
    # A plugin whose pass waits for a file to appear, so a rewrite can be held inside its lock.
    site = root / "site"
    site.mkdir()
    write_plugin_distribution(site, "waiter", "edgeplug_waiter", ("""
        import os, time
        from pathlib import Path
        import edgeplug

        class Waiter(edgeplug.Pass):
            name = "waiter"
            summary = "waits for $WAITER_GO"

            def rewrite_forward(self, state, context):
                Path(os.environ["WAITER_READY"]).write_text(str(os.getpid()))
                while not Path(os.environ["WAITER_GO"]).exists():
                    time.sleep(0.01)
                return state

            def report(self):
                return edgeplug.PassReport(False, "waited")

        @edgeplug.hookimpl
        def edgeplug_register_passes(register):
            register(Waiter)
    """))
    (root / "waiter.yaml").write_text("passes:\n  - name: waiter\n")
    return {"root": root, "model": root / "model.onnx", "data": root / "train.npz", "pristine": root / "pristine", "site": site,
            "waiter": root / "waiter.yaml"}


@pytest.fixture
def held_rewrite(setup: dict[str, Path], tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A real `edgeplug rewrite -o tmp/out` process stopped inside its pass, holding the lock."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    process = subprocess.Popen(command("rewrite", setup["model"], "--recipe", setup["waiter"], "-o", tmp_path / "out"),
                               env=env(PYTHONPATH=str(setup["site"]), WAITER_READY=str(ready), WAITER_GO=str(go)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(ready.exists, process)
        yield process, go
    finally:
        go.touch()
        stop(process)
        if process.stderr:
            process.stderr.close()


def test_a_second_rewrite_of_the_same_folder_is_refused_naming_the_first(setup: dict[str, Path], tmp_path: Path,
                                                                           held_rewrite: tuple[subprocess.Popen[bytes], Path]) -> None:
    first, go = held_rewrite
    staging = list(tmp_path.glob(".out.partial-*"))
    assert len(staging) == 1
    for args in (("rewrite", setup["model"], "-o", tmp_path / "out"), ("rewrite", setup["model"], "-o", tmp_path / "out", "--force")):
        loser = subprocess.run(command(*args), env=env(), capture_output=True, text=True, timeout=120, check=False)
        assert loser.returncode == 2, loser.stderr
        (line,) = loser.stderr.strip().splitlines()
        assert line.startswith(PREFIX + f"{tmp_path / 'out'} is in use by another edgeplug process (pid {first.pid}: edgeplug rewrite")
    assert list(tmp_path.glob(".out.partial-*")) == staging  # the loser did not touch the winner's staging folder
    go.touch()
    assert first.wait(timeout=120) == 0
    assert_complete(tmp_path / "out")
    assert not lock_path(tmp_path / "out").exists()


def test_train_and_rewrite_exclude_each_other(setup: dict[str, Path], tmp_path: Path) -> None:
    artifacts = tmp_path / "out"
    shutil.copytree(setup["pristine"], artifacts)
    trainer = subprocess.Popen(command("train", artifacts, "--data", setup["data"], "--epochs", "50", "--batch-size", "8",
                                       "--no-progress"), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: lock_path(artifacts).exists() and f"pid {trainer.pid}" in lock_path(artifacts).read_text(), trainer)
        for args in (("train", artifacts, "--data", setup["data"]), ("rewrite", setup["model"], "-o", artifacts, "--force")):
            loser = subprocess.run(command(*args), env=env(), capture_output=True, text=True, timeout=120, check=False)
            assert loser.returncode == 2 and f"in use by another edgeplug process (pid {trainer.pid}" in loser.stderr, loser.stderr
        with pytest.raises(edgeplug.LockedError, match=str(trainer.pid)):
            Trainer(artifacts, progress=False).fit(setup["data"], epochs=1, batch_size=8)
        assert_complete(artifacts)  # the --force rewrite did not replace the folder under the trainer
    finally:
        os.kill(trainer.pid, signal.SIGKILL)
        stop(trainer)
    # The kernel released the dead trainer's lock: the next run takes it and resumes.
    result = Trainer(artifacts, progress=False).fit(setup["data"], epochs=1, batch_size=8)
    with np.load(setup["data"]) as arrays:
        steps_per_epoch = -(-len(arrays["y"]) // 8)
    # it resumed where the killed trainer's last checkpoint left off (or started over without one) and ran
    # exactly the steps that were left of epoch 1
    assert result.steps_run == max(0, steps_per_epoch - (result.resumed_from_step or 0))
    assert result.epochs or result.steps_run == 0


def test_stale_staging_left_by_a_killed_writer_is_removed_by_the_next_one(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(setup["pristine"], out)
    for name in (".out.partial-abc123", ".out.old-def456", ".other.partial-keep"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "training_model.onnx").write_bytes(b"half")
    (tmp_path / ".out.partial-file").write_bytes(b"x")
    folder = checkpoints_dir(out)
    folder.mkdir()
    (folder / ".step-00000007.partial-xyz").mkdir()
    (folder / ".LATEST.partial-q1w2").write_text("step-")
    Trainer(out, progress=False).fit(classification_data((64,), 10, n=64), epochs=1, batch_size=32)
    assert sorted(p.name for p in folder.iterdir()) == ["LATEST", "step-00000002"]
    rewrite(setup["model"], None, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-keep", "out"]  # another folder's are not ours


def test_lock_is_exclusive_within_and_across_processes_and_released(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with output_lock(target, purpose="holder") as path:
        assert path.read_text() == f"pid {os.getpid()}: holder"
        with pytest.raises(edgeplug.OutputError, match=rf"in use by another edgeplug process \(pid {os.getpid()}: holder\)"), \
                output_lock(target):
            pass
        code = f"from edgeplug.locking import output_lock\nwith output_lock({str(target)!r}): pass"
        probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
        assert probe.returncode == 1 and "in use by another edgeplug process" in probe.stderr
    assert not path.exists()
    with output_lock(target):
        pass
    assert remove_stale_staging(tmp_path / "missing" / "x") == []


# -- SIGKILL at random points ----------------------------------------------------------------------------


def test_killed_rewrite_leaves_no_partial_folder_and_the_next_run_cleans_up(setup: dict[str, Path], tmp_path: Path) -> None:
    rng = random.Random(1234 if not LONG else None)
    out = tmp_path / "out"
    kills = max(2, KILLS // 4) if not LONG else KILLS
    for _attempt in range(kills):
        process = subprocess.Popen(command("rewrite", setup["model"], "-o", out, "--force"), env=env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 3.0))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        if out.exists():  # published whole (this attempt or an earlier one), never half
            assert_complete(out)
    result = subprocess.run(command("rewrite", setup["model"], "-o", out, "--force"), env=env(), capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert_complete(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # staging of the killed runs removed, lock file gone


def test_training_killed_at_random_points_resumes_to_the_same_weights(setup: dict[str, Path], tmp_path: Path) -> None:
    epochs, batch = 2, 32
    data = dict(np.load(setup["data"]))
    reference = tmp_path / "reference"
    shutil.copytree(setup["pristine"], reference)
    Trainer(reference, progress=False).fit(data, epochs=epochs, batch_size=batch)
    total = epochs * (len(data["y"]) // batch)

    artifacts = tmp_path / "artifacts"
    shutil.copytree(setup["pristine"], artifacts)
    train = command("train", artifacts, "--data", setup["data"], "--epochs", epochs, "--batch-size", batch,
                    "--checkpoint-every", 3, "--no-progress")
    rng = random.Random(99 if not LONG else None)
    kills = 0
    for _ in range(KILLS * 3):
        if kills == KILLS:
            break
        process = subprocess.Popen(train, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Wait until training has started (the lock is taken after the data is checked), then a random while.
        try:
            wait_for(lambda: lock_path(artifacts).exists(), process, 120)
        except AssertionError:
            if process.wait(timeout=60) == 0:
                break
            raise
        time.sleep(rng.uniform(0.0, 0.6))
        process.send_signal(signal.SIGKILL)
        code = process.wait(timeout=60)
        if process.stderr:
            process.stderr.close()
        if code == 0:
            break
        assert code == -signal.SIGKILL
        kills += 1
        checkpoint = latest_checkpoint(artifacts)
        if checkpoint is not None:
            read_progress(checkpoint)  # the newest complete checkpoint is readable
    result = subprocess.run(train, env=env(), capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert read_progress(latest_checkpoint(artifacts))["step"] == total
    assert_same_weights(final_weights(artifacts), final_weights(reference))
    assert [p.name for p in checkpoints_dir(artifacts).iterdir() if p.name.startswith(".")] == []
    print(f"killed {kills} times")
