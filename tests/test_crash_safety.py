"""Crash safety and the folder lock (issue #24, items 7-8).

Dropout reproducible and resumable, a damaged newest checkpoint falls back to the
previous one, `-o .` and `--force` on folders that are not ours, a full disk, and
one lock per real folder whatever path names it.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import classification_data, mlp
from onnx import helper, numpy_helper
from test_resume import CrashAt, SimulatedCrash, assert_same_weights, final_weights

import edgeplug
import edgeplug.locking
from edgeplug.checkpoints import PROGRESS, STATE, checkpoints_dir, latest_checkpoint
from edgeplug.cli import main
from edgeplug.locking import lock_path
from edgeplug.pipeline import rewrite
from edgeplug.plugins import PluginHost
from edgeplug.recipe import recipe_from_dict
from edgeplug.trainer import Trainer

PREFIX = "edgeplug: error: "
RECIPE = recipe_from_dict({"optimizer": {"name": "adamw", "lr": 0.01}})


def command(*args: object) -> list[str]:
    return [sys.executable, "-m", "edgeplug.cli", *map(str, args)]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def one_error_line(stderr: str, *names: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and "Traceback" not in stderr, stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


# -- 7a. models with random ops -----------------------------------------------------------------------


def with_random_op(op: str) -> onnx.ModelProto:
    """mlp(8, (32,), 3) with Dropout(ratio 0.5, training) after the hidden activation, or x * RandomUniformLike(x)."""
    model = mlp(8, (32,), 3)
    graph = model.graph
    if op == "Dropout":
        graph.initializer.extend([numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
                                  numpy_helper.from_array(np.array(True), "training_mode")])
        position = next(i for i, n in enumerate(graph.node) if n.name == "act0") + 1
        graph.node.insert(position, helper.make_node("Dropout", ["a0", "ratio", "training_mode"], ["d0", "mask"], name="drop"))
        next(n for n in graph.node if n.name == "fc1").input[0] = "d0"
    else:
        graph.node.insert(0, helper.make_node(op, ["x"], ["noise"], name="noise"))
        graph.node.insert(1, helper.make_node("Mul", ["x", "noise"], ["noisy"], name="noisy"))
        next(n for n in graph.node if n.name == "fc0").input[0] = "noisy"
    return model


@pytest.fixture(scope="module")
def dropout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("dropout")
    rewrite(with_random_op("Dropout"), RECIPE, root / "pristine")
    return root / "pristine", classification_data((8,), 3, n=48, seed=5)


def trained(pristine: Path, folder: Path, data: dict[str, np.ndarray], seed: int, **fit: object) -> dict[str, np.ndarray]:
    shutil.copytree(pristine, folder)
    Trainer(folder, seed=seed, progress=False).fit(data, epochs=2, batch_size=8, **fit)  # type: ignore[arg-type]
    return final_weights(folder)


def test_dropout_runs_with_the_same_seed_are_bit_identical(dropout: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    """Two runs with --seed 5 differed by up to 0.37: the runtime's dropout generator was never seeded."""
    pristine, data = dropout
    first = trained(pristine, tmp_path / "a", data, 5)
    assert_same_weights(trained(pristine, tmp_path / "b", data, 5), first)
    other = trained(pristine, tmp_path / "c", data, 6)
    assert any(not np.array_equal(first[name], other[name]) for name in first), "the seed changes nothing"


@pytest.mark.parametrize("crash_step", [3, 8])
def test_dropout_training_resumed_after_a_crash_is_bit_identical(dropout: tuple[Path, dict[str, np.ndarray]], tmp_path: Path,
                                                                 crash_step: int) -> None:
    """Kill/resume was identical 0 of 3 times (max difference 0.44): dropout masks now depend on (seed, step) only."""
    pristine, data = dropout
    reference = trained(pristine, tmp_path / "reference", data, 5)
    folder = tmp_path / "crashed"
    shutil.copytree(pristine, folder)
    host = PluginHost()
    host.register(CrashAt(crash_step), name="crash")
    with pytest.raises(edgeplug.PluginError, match="plugin 'crash'") as crashed:
        Trainer(folder, seed=5, progress=False, host=host, checkpoint_every=2).fit(data, epochs=2, batch_size=8)
    assert isinstance(crashed.value.__cause__, SimulatedCrash)
    Trainer(folder, seed=5, progress=False).fit(data, epochs=2, batch_size=8)
    assert_same_weights(final_weights(folder), reference)


def test_other_random_ops_repeat_from_the_start_and_resume_says_it_cannot_be_identical(tmp_path: Path) -> None:
    """RandomUniformLike keeps a generator the runtime neither reseeds nor checkpoints: fresh runs with one seed
    agree, a resumed run says it will differ."""
    rewrite(with_random_op("RandomUniformLike"), RECIPE, tmp_path / "pristine")
    data = classification_data((8,), 3, n=48, seed=5)
    first = trained(tmp_path / "pristine", tmp_path / "a", data, 5)
    assert_same_weights(trained(tmp_path / "pristine", tmp_path / "b", data, 5), first)
    said: list[str] = []
    Trainer(tmp_path / "a", seed=5, progress=False, echo=said.append).fit(data, epochs=3, batch_size=8)
    assert any("RandomUniformLike" in line and "not bit-identical" in line for line in said), said


# -- 7b. a damaged newest checkpoint --------------------------------------------------------------------


@pytest.fixture
def two_checkpoints(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray], list[Path]]:
    rewrite(mlp(), RECIPE, tmp_path / "out")
    data = classification_data((8,), 3, n=32, seed=1)
    Trainer(tmp_path / "out", progress=False, checkpoint_every=3).fit(data, epochs=1, batch_size=8)
    Trainer(tmp_path / "out", progress=False).fit(data, epochs=2, batch_size=8)
    checkpoints = sorted(checkpoints_dir(tmp_path / "out").glob("step-*"))
    assert len(checkpoints) == 2
    return tmp_path / "out", data, checkpoints


@pytest.mark.parametrize("damage", ["truncated-state", "empty-state", "truncated-progress"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(two_checkpoints: tuple[Path, dict[str, np.ndarray], list[Path]],
                                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                    damage: str) -> None:
    """A truncated newest checkpoint made train exit 1."""
    out, data, (older, newest) = two_checkpoints
    target = newest / (PROGRESS if damage == "truncated-progress" else STATE)
    content = target.read_bytes()
    target.write_bytes(b"" if damage == "empty-state" else content[: len(content) // 2])
    np.savez(tmp_path / "d.npz", **data)
    code = main(["train", str(out), "--data", str(tmp_path / "d.npz"), "--epochs", "3", "--batch-size", "8", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"{newest.name} is damaged" in captured.out and f"resuming from {older.name}" in captured.out, captured.out
    assert latest_checkpoint(out) is not None and latest_checkpoint(out).name > newest.name  # type: ignore[union-attr]


def test_every_checkpoint_damaged_is_a_user_error(two_checkpoints: tuple[Path, dict[str, np.ndarray], list[Path]],
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, data, checkpoints = two_checkpoints
    for checkpoint in checkpoints:
        (checkpoint / STATE).write_bytes(b"\0" * 10)
    np.savez(tmp_path / "d.npz", **data)
    code = main(["train", str(out), "--data", str(tmp_path / "d.npz"), "--epochs", "3", "--batch-size", "8", "--no-progress"])
    assert code == 2
    one_error_line(capsys.readouterr().err, "damaged", "--restart")


# -- 7c. rewrite -o . --force, and --force on folders that are not ours ----------------------------------------


def test_rewrite_into_the_current_folder_with_force(tmp_path: Path) -> None:
    """`rewrite -o . --force` exited 1 and left `..old-*` behind."""
    onnx.save(mlp(), str(tmp_path / "m.onnx"))
    rewrite(tmp_path / "m.onnx", None, tmp_path / "out")
    before = (tmp_path / "out" / "report.json").read_text()
    result = subprocess.run(command("rewrite", tmp_path / "m.onnx", "-o", ".", "--force"), cwd=tmp_path / "out", env=env(),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out"]
    assert (tmp_path / "out" / "report.json").read_text() != before  # replaced (a new creation time at least)
    assert not list((tmp_path / "out").glob(".*"))


@pytest.mark.parametrize("kind", ["folder", "file", "folder-with-a-fake-report"])
def test_force_refuses_to_replace_what_is_not_an_artifact_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    """`rewrite -o v --force` on a folder of other files silently deleted them."""
    onnx.save(mlp(), str(tmp_path / "m.onnx"))
    victim = tmp_path / "v"
    if kind == "file":
        victim.write_text("precious")
    else:
        victim.mkdir()
        (victim / "thesis.tex").write_text("precious")
        if kind == "folder-with-a-fake-report":
            (victim / "report.json").write_text('{"title": "quarterly report"}')
    code = main(["rewrite", str(tmp_path / "m.onnx"), "-o", str(victim), "--force"])
    assert code == 2
    one_error_line(capsys.readouterr().err, "not an edgeplug artifact folder", str(victim))
    assert (victim.read_text() if kind == "file" else (victim / "thesis.tex").read_text()) == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "v"]


def test_force_replaces_an_artifact_folder_and_an_empty_one(tmp_path: Path) -> None:
    rewrite(mlp(), None, tmp_path / "out")
    rewrite(mlp(), None, tmp_path / "out", force=True)
    (tmp_path / "empty").mkdir()
    rewrite(mlp(), None, tmp_path / "empty", force=True)
    assert (tmp_path / "empty" / "report.json").is_file()


# -- 7d. a full disk ----------------------------------------------------------------------------------


def _unshare_works() -> bool:
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt && umount /mnt"],
                           capture_output=True, timeout=30, check=False) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -rm` to mount a small tmpfs (a full disk)")


def on_small_disk(tmp_path: Path, size: str, script: str) -> subprocess.CompletedProcess[str]:
    """Run `script` (sh) with tmp_path/disk a tmpfs of `size` in a private mount namespace."""
    disk = tmp_path / "disk"
    disk.mkdir(exist_ok=True)
    wrapped = f"mount -t tmpfs -o size={size} tmpfs {disk} && cd {tmp_path} && {script}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", wrapped], env=env(), capture_output=True, text=True, timeout=300,
                          check=False)


@needs_tmpfs
@pytest.mark.parametrize("size", ["8k", "28k"])
def test_rewrite_on_a_full_disk_is_a_user_error_and_leaves_nothing(tmp_path: Path, size: str) -> None:
    """Disk full exited 1 'internal error' (or blamed onnxruntime) and once left a lock file."""
    onnx.save(mlp(), str(tmp_path / "m.onnx"))
    python = sys.executable
    result = on_small_disk(tmp_path, size, f"{python} -m edgeplug.cli rewrite m.onnx -o disk/out; echo \"rc=$?\"; ls -A disk")
    code = int(result.stdout.split("rc=")[1].split()[0])
    assert code == 2, result.stdout + result.stderr
    one_error_line(result.stderr, "no space left")
    assert result.stdout.split("rc=")[1].split()[1:] == [], f"left behind: {result.stdout}"


@needs_tmpfs
def test_train_on_a_full_disk_is_a_user_error_and_leaves_no_lock_or_staging(tmp_path: Path) -> None:
    rewrite(mlp(), None, tmp_path / "out")
    np.savez(tmp_path / "d.npz", **classification_data((8,), 3, n=32))
    python = sys.executable
    train = f"{python} -m edgeplug.cli train disk/out --data d.npz --epochs 3 --batch-size 8 --no-progress"
    pages = sum(-(-p.stat().st_size // 4096) for p in (tmp_path / "out").rglob("*") if p.is_file())
    room = (pages + 2) * 4  # KiB: the folder fits, a checkpoint does not
    result = on_small_disk(tmp_path, f"{room}k", f"cp -r out disk/out && {train}; echo \"rc=$?\"; ls -A disk disk/out/checkpoints")
    code = int(result.stdout.split("rc=")[1].split()[0])
    assert code == 2, result.stdout + result.stderr
    one_error_line(result.stderr, "no space left")
    listing = result.stdout.split("rc=")[1]
    assert ".lock" not in listing and ".partial-" not in listing, listing


def test_a_lock_whose_holder_cannot_be_written_is_not_left_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(edgeplug.locking.os, "pwrite", full)
    with edgeplug.locking.output_lock(tmp_path / "out"):
        pass
    assert list(tmp_path.iterdir()) == []


# -- 8. one lock per real folder ----------------------------------------------------------------------------


def test_a_symlink_and_its_folder_share_one_lock(tmp_path: Path) -> None:
    (tmp_path / "c1").mkdir()
    (tmp_path / "c1_link").symlink_to(tmp_path / "c1")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "parent_link").symlink_to(tmp_path)
    assert lock_path(tmp_path / "c1_link") == lock_path(tmp_path / "c1") == lock_path(tmp_path / "elsewhere" / "parent_link" / "c1")
    with edgeplug.locking.output_lock(tmp_path / "c1"), pytest.raises(edgeplug.LockedError):
        with edgeplug.locking.output_lock(tmp_path / "c1_link"):
            pass


def test_train_through_a_symlink_is_refused_while_the_folder_trains(tmp_path: Path) -> None:
    """`train c1` and `train c1_link` both ran; the second removed the first's checkpoint staging and it died."""
    onnx.save(mlp(64, (256, 256), 10, seed=3), str(tmp_path / "m.onnx"))
    rewrite(tmp_path / "m.onnx", RECIPE, tmp_path / "c1")
    (tmp_path / "c1_link").symlink_to(tmp_path / "c1")
    np.savez(tmp_path / "d.npz", **classification_data((64,), 10, n=3200, seed=4))
    first = subprocess.Popen(command("train", tmp_path / "c1", "--data", tmp_path / "d.npz", "--epochs", "50", "--batch-size", "8",
                                     "--no-progress"), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        deadline = time.monotonic() + 120
        while not (lock_path(tmp_path / "c1").exists() and f"pid {first.pid}" in lock_path(tmp_path / "c1").read_text()):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        for args in (("train", tmp_path / "c1_link", "--data", tmp_path / "d.npz"),
                     ("rewrite", tmp_path / "m.onnx", "-o", tmp_path / "c1_link", "--force")):
            loser = subprocess.run(command(*args), env=env(), capture_output=True, text=True, timeout=120, check=False)
            assert loser.returncode == 2, loser.stderr
            one_error_line(loser.stderr, f"in use by another edgeplug process (pid {first.pid}")
        assert first.poll() is None, "the first trainer died"
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    assert (tmp_path / "c1_link").is_symlink()


def test_rewrite_force_through_a_symlink_replaces_the_real_folder(tmp_path: Path) -> None:
    rewrite(mlp(), None, tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    rewrite(mlp(8, (4,), 3), None, tmp_path / "link", force=True)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    import json

    assert json.loads((tmp_path / "real" / "report.json").read_text())["parameters"]["total_values"] == 8 * 4 + 4 + 4 * 3 + 3


@pytest.mark.parametrize("pointee", ["outside-file", "dev-null"])
def test_a_latest_pointer_that_is_a_symlink_is_replaced_not_written_through(tmp_path: Path, pointee: str) -> None:
    """Found by the fuzz suite: LATEST linked to /dev/zero made train write its staging file into /dev."""
    rewrite(mlp(), None, tmp_path / "out")
    data = classification_data((8,), 3, n=16)
    Trainer(tmp_path / "out", progress=False).fit(data, epochs=1, batch_size=8)
    target = tmp_path / "elsewhere.txt" if pointee == "outside-file" else Path("/dev/null")
    if pointee == "outside-file":
        target.write_text("keep me")
    latest = checkpoints_dir(tmp_path / "out") / "LATEST"
    latest.unlink()
    latest.symlink_to(target)
    Trainer(tmp_path / "out", progress=False).fit(data, epochs=2, batch_size=8)
    assert not latest.is_symlink() and latest.read_text().strip() == latest_checkpoint(tmp_path / "out").name  # type: ignore[union-attr]
    if pointee == "outside-file":
        assert target.read_text() == "keep me"
    assert not list(Path("/dev").glob(".LATEST.partial-*"))


def test_a_folder_where_edgeplug_writes_a_file_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found by the fuzz suite: a folder named checkpoints/LATEST made train exit 1 (IsADirectoryError)."""
    rewrite(mlp(), None, tmp_path / "out")
    np.savez(tmp_path / "d.npz", **classification_data((8,), 3, n=16))
    (checkpoints_dir(tmp_path / "out") / "LATEST").mkdir(parents=True)
    code = main(["train", str(tmp_path / "out"), "--data", str(tmp_path / "d.npz"), "--batch-size", "8", "--no-progress"])
    assert code == 2
    one_error_line(capsys.readouterr().err, "LATEST", "folder")
    (tmp_path / "e.onnx").mkdir()
    assert main(["export", str(tmp_path / "out"), "-o", str(tmp_path / "e.onnx")]) == 2
    one_error_line(capsys.readouterr().err, "e.onnx", "folder")
