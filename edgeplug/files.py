"""Input files are regular files of a sane size, checked before they are read.

Opening a FIFO for reading blocks until someone writes to it, and `/dev/zero` never
ends: an edgeplug command pointed at either hung or read until MemoryError. Every
file a user names (model, recipe, data, checkpoint) is stat-ed first, and small
ones are opened without blocking and read with a size limit.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from edgeplug.errors import EdgeplugError

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def kind_of(mode: int) -> str:
    """'a FIFO (named pipe)', 'a folder', ... for a stat mode that is not a regular file."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_regular_file(path: str | Path, what: str, error: type[EdgeplugError] = EdgeplugError) -> Path:
    """`path` (symbolic links followed) is an existing regular file, else `error` naming `what`."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except (OSError, ValueError) as failure:  # a name too long, a NUL byte, a symlink loop, no permission
        raise error(f"cannot read {what} {path}: {getattr(failure, 'strerror', None) or failure}") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} {path} is {kind_of(info.st_mode)}, not a regular file; give the path of a file")
    return path


def read_limited(path: str | Path, what: str, limit: int, error: type[EdgeplugError] = EdgeplugError) -> bytes:
    """The bytes of a small regular file: opened without blocking (a FIFO swapped in after the check
    cannot hang us), refused when larger than `limit` bytes."""
    path = check_regular_file(path, what, error)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as failure:
        raise error(f"cannot read {what} {path}: {failure.strerror}") from None
    with os.fdopen(descriptor, "rb") as stream:
        info = os.fstat(stream.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what} {path} is {kind_of(info.st_mode)}, not a regular file; give the path of a file")
        if info.st_size > limit:
            raise error(f"{what} {path} is {info.st_size:,} bytes, more than the {limit:,} edgeplug reads; "
                        "is it the right file?")
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise error(f"{what} {path} grew past {limit:,} bytes while it was read")
    return data
