"""Training checkpoints: written whole or not at all, found again after a crash.

Layout: ``out/checkpoints/step-00000042/`` holds ``state`` (onnxruntime-training
checkpoint with optimizer state), ``trainer.json`` (where in the data the run
was), ``carried_state.safetensors`` (step-carried state, when the folder has any)
and ``hooks/`` (state of pass runtime hooks). ``out/checkpoints/LATEST``
names the newest complete one. In a staged folder ``state`` is a folder with one
onnxruntime-training checkpoint per stage (``state/0``, ``state/1``, ...).

Runtimes that cannot save onnxruntime checkpoints (the JavaScript runtime) write
``training_state.safetensors`` instead of ``state``: parameters and optimizer state
of every artifact set (docs/device-runtime.md), and name themselves in
``trainer.json`` (``"runtime": "node"``). `edgeplug export` reads both.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgeplug import tensorfile
from edgeplug.atomic import atomic_directory, write_text
from edgeplug.errors import OutputError

FOLDER = "checkpoints"
LATEST = "LATEST"
STATE = "state"
PROGRESS = "trainer.json"
HOOKS = "hooks"
DEVICE_STATE = "training_state.safetensors"
"""Parameters and optimizer state written by a runtime without onnxruntime checkpoint saving."""
_NAME = re.compile(r"step-\d{8,}")


def checkpoints_dir(artifact_dir: Path) -> Path:
    return Path(artifact_dir) / FOLDER


def write_checkpoint(
    artifact_dir: Path,
    step: int,
    progress: dict[str, Any],
    save_state: Callable[[Path], None],
    save_hooks: Callable[[Path], None],
    keep: int = 2,
    replace_all: bool = False,
) -> Path:
    """Write checkpoint `step` atomically, point LATEST at it, prune old ones.

    With `replace_all`, the whole checkpoints folder is rebuilt beside the old one and
    swapped in: the old checkpoints stay until the new one is complete.
    """
    folder = checkpoints_dir(artifact_dir)
    if folder.is_symlink() or (folder.exists() and not folder.resolve().is_relative_to(Path(artifact_dir).resolve())):
        raise OutputError(f"{folder} is a symbolic link; checkpoints are written only inside the artifact folder: remove it")
    name = f"step-{step:08d}"

    def fill(stage: Path) -> None:
        save_state(stage / STATE)
        (stage / HOOKS).mkdir()
        save_hooks(stage / HOOKS)
        (stage / PROGRESS).write_text(json.dumps(progress, indent=2) + "\n", encoding="utf-8")

    if replace_all:
        with atomic_directory(folder, overwrite=True) as staging:
            (staging / name).mkdir()
            fill(staging / name)
            (staging / LATEST).write_text(name + "\n", encoding="utf-8")
        return folder / name
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    with atomic_directory(target, overwrite=True) as stage:
        fill(stage)
    write_text(folder / LATEST, target.name + "\n")
    for old in sorted(folder.glob("step-*"))[:-keep] if keep > 0 else []:
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(artifact_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None. Survives a LATEST left stale by a crash."""
    folder = checkpoints_dir(artifact_dir)
    if not folder.is_dir():
        return None
    pointer = folder / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        candidate = folder / name
        if _NAME.fullmatch(name) and _complete(candidate):
            newer = [p for p in sorted(folder.glob("step-*")) if p.name > candidate.name and _complete(p)]
            return newer[-1] if newer else candidate
    complete = [p for p in sorted(folder.glob("step-*")) if _complete(p)]
    return complete[-1] if complete else None


def complete_checkpoints(artifact_dir: Path) -> list[Path]:
    """Every complete checkpoint, newest first (the order a resume tries them in)."""
    folder = checkpoints_dir(artifact_dir)
    if not folder.is_dir() or folder.is_symlink():
        return []
    return [p for p in sorted(folder.glob("step-*"), reverse=True) if _NAME.fullmatch(p.name) and _complete(p)]


def state_file(checkpoint: Path, stage: int | None = None) -> Path:
    """The onnxruntime-training checkpoint inside a checkpoint folder; `stage` for staged folders."""
    return checkpoint / STATE if stage is None else checkpoint / STATE / str(stage)


def read_progress(checkpoint: Path) -> dict[str, Any]:
    progress: dict[str, Any] = json.loads((checkpoint / PROGRESS).read_text(encoding="utf-8"))
    return progress


def checkpoint_runtime(checkpoint: Path) -> str:
    """Which runtime wrote a checkpoint: "python" (onnxruntime checkpoint in `state`) or e.g. "node"."""
    if (checkpoint / STATE).exists():
        return "python"
    return str(read_progress(checkpoint).get("runtime") or "node")


def device_parameters(path: Path, artifact_set: int, *, updated: bool = True) -> dict[str, np.ndarray]:
    """The parameters a runtime without onnxruntime checkpoints saved for artifact set `artifact_set`:
    from `path`, a training_state.safetensors file or the checkpoint folder holding it. With `updated`,
    also the frozen parameters training overwrote in place (batch-norm running statistics)."""
    tensors, _ = tensorfile.load(path / DEVICE_STATE if path.is_dir() else path)
    prefixes = (f"{artifact_set}:param:", f"{artifact_set}:updated:") if updated else (f"{artifact_set}:param:",)
    return {key.split(":", 2)[2]: value for key, value in tensors.items() if key.startswith(prefixes)}


def _complete(path: Path) -> bool:
    """A checkpoint folder with its progress file and its state: a regular file, or a folder of them
    (staged), or the training_state file of a runtime without onnxruntime checkpoints. A FIFO or
    device in their place would block or never end the read."""
    state = path / STATE
    if path.is_symlink() or not path.is_dir() or not (path / PROGRESS).is_file():
        return False
    if not state.exists() and not state.is_symlink():
        return (path / DEVICE_STATE).is_file() and not (path / DEVICE_STATE).is_symlink()
    if state.is_dir() and not state.is_symlink():
        return all(part.is_file() for part in state.iterdir())
    return state.is_file()
