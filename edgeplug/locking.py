"""One writer per output folder: an exclusive lock, and cleanup of what killed writers left.

`rewrite` and `train` hold `output_lock(folder)` while they write. The lock is a
`fcntl.flock` on a hidden sibling file, `.<name>.lock`, which works whether or not
the folder exists yet (rewrite creates it by renaming a staging folder onto it).
The kernel drops the lock when its holder dies, even by SIGKILL, so a lock is never
stale; the file holds the holder's pid and command line so that the loser's error
can name it. The holder removes the file when it is done; a process that locked a
file that was removed meanwhile notices (inode check) and locks again.

While it holds the lock, a process also removes the staging folders
(`.<name>.partial-*`, `.<name>.old-*`) that an earlier writer killed mid-way
left behind: nobody else may own them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from edgeplug.errors import LockedError, OutputError

STAGING_MARKERS = (".partial-", ".old-")


def real_target(target: str | Path) -> Path:
    """`target` with every symbolic link resolved (the folder itself too, when it is one): two paths to one
    folder, `c1` and a link `c1_link` to it, must share one lock and one set of staging folders."""
    return Path(os.path.realpath(target))


def lock_path(target: Path) -> Path:
    """The lock file of output folder `target`: `.<name>.lock` beside the real folder."""
    target = real_target(target)
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def output_lock(target: str | Path, *, purpose: str = "") -> Iterator[Path]:
    """Hold the exclusive lock of output folder `target`, or raise LockedError naming the holder."""
    target = Path(target)
    path = lock_path(target)
    if not path.parent.is_dir():
        # Nothing can race on a folder that does not exist yet; atomic.py creates it and reports problems.
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            yield path
            return
    descriptor = _acquire(path, target, purpose)
    try:
        remove_stale_staging(target)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(descriptor)


def _acquire(path: Path, target: Path, purpose: str) -> int:
    for _ in range(50):
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise OutputError(f"lock file {path} is a symbolic link; remove it") from None
            raise OutputError(f"cannot create lock file {path}: {error.strerror}") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LockedError(
                    f"{target} is in use by another edgeplug process ({holder or 'holder unknown'}); "
                    "wait for it to finish or stop it, then run this again"
                ) from None
            raise OutputError(f"cannot lock {path}: {error.strerror}") from None
        try:
            same = os.fstat(descriptor).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:  # the file was not removed by its previous holder between our open and our lock
            with contextlib.suppress(OSError):  # the holder's name is a courtesy: a full disk must not leak the lock file
                _write_holder(descriptor, purpose)
            return descriptor
        os.close(descriptor)
        time.sleep(0.001)
    raise OutputError(f"cannot lock {path}: it keeps being replaced")


def _write_holder(descriptor: int, purpose: str) -> None:
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)) or "python"
    text = f"pid {os.getpid()}: {purpose or command}"[:400]
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, text.encode("utf-8", "replace"), 0)


def _read_holder(descriptor: int) -> str:
    try:
        return os.pread(descriptor, 400, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def remove_stale_staging(target: str | Path) -> list[Path]:
    """Remove `.<name>.partial-*` / `.<name>.old-*` beside `target`. Call only while holding its lock."""
    target = real_target(target)
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    for marker in STAGING_MARKERS:
        for path in target.parent.glob(f".{_glob_escape(target.name)}{marker}*"):
            if path.is_symlink() or not path.is_dir():
                with contextlib.suppress(OSError):
                    path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove_stale_staging_in(folder: str | Path) -> list[Path]:
    """Remove every hidden staging entry directly in `folder` (checkpoints/ while training holds the lock)."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir() or folder.is_symlink():
        return removed
    for path in folder.iterdir():
        if path.name.startswith(".") and any(marker in path.name for marker in STAGING_MARKERS):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
            removed.append(path)
    return removed


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)
