"""Outputs appear whole or not at all: build in a temporary sibling, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from edgeplug.errors import OutputError


def _check_parent_writable(target: Path) -> Path:
    # the folder the name lives in, not where a symbolic link called `target` points: a link named LATEST
    # pointing at /dev/zero is replaced, never written through
    parent = Path(os.path.abspath(target)).parent.resolve()
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"cannot write {target}: {parent} is a file, not a folder; choose another output path")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create folder {parent}: {error.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write to {parent}: permission denied; choose another output path")
    return parent


@contextlib.contextmanager
def atomic_directory(target: Path, *, overwrite: bool = False, replaceable: Callable[[Path], bool] | None = None,
                     replaceable_kind: str = "") -> Iterator[Path]:
    """Yield a temporary folder that replaces `target` only if the block succeeds.

    `target` is made absolute first: `.` or `sub/..` have no usable name of their own.
    With `overwrite`, an existing non-empty `target` is replaced only if `replaceable(target)`
    says so (when given): `--force` must not delete a folder of someone else's files.
    """
    target = Path(os.path.abspath(target))
    if target.parent == target:
        raise OutputError(f"cannot write {target}: it is the root of the file system; choose a folder below it")
    empty = target.is_dir() and not any(target.iterdir())
    if target.exists() and not overwrite and not empty:
        raise OutputError(f"{target} already exists; to replace it pass --force (force=True in Python)")
    if (target.exists() or target.is_symlink()) and overwrite and replaceable is not None and not empty and not replaceable(target):
        raise OutputError(f"{target} exists and is not {replaceable_kind}; --force replaces only {replaceable_kind}, "
                          "never other files: move it away or choose another output path")
    parent = _check_parent_writable(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=parent))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        yield staging
        _fsync_tree(staging)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            os.replace(target, retired / "old")
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path in the same folder that is renamed onto `target` on success."""
    target = Path(target)
    if target.is_dir() and not target.is_symlink():  # a rename cannot replace a folder with a file
        raise OutputError(f"cannot write {target}: a folder of that name is in the way; remove it or choose another path")
    parent = _check_parent_writable(target)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=parent)
    os.close(handle)
    staging = Path(name)
    os.chmod(staging, 0o666 & ~_umask())
    try:
        yield staging
        with open(staging, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(staging, target)
    finally:
        if staging.exists():
            staging.unlink()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_text(target: Path, text: str) -> None:
    """Write a small text file atomically."""
    with atomic_file(target) as staging:
        staging.write_text(text, encoding="utf-8")


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as stream:
                os.fsync(stream.fileno())


def write_bytes(target: Path, data: bytes) -> None:
    """Write a file atomically."""
    with atomic_file(target) as staging:
        staging.write_bytes(data)
