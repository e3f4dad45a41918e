"""Error types. Every user-facing failure is an EdgeplugError: the CLI prints its
message on one line and exits with status 2, without a traceback."""

from __future__ import annotations

import errno
import re


class EdgeplugError(Exception):
    """A problem the user can fix (bad model, recipe, data or path)."""

    exit_code = 2


class SetupError(EdgeplugError):
    """The installed runtime cannot serve edgeplug (missing, or several builds at once)."""


class ModelError(EdgeplugError):
    """The ONNX model cannot be read, is invalid, or cannot be trained as asked."""


class RecipeError(EdgeplugError):
    """The recipe does not match its schema or names something that does not exist."""


class DataError(EdgeplugError):
    """Training or evaluation data does not match the model."""


class OutputError(EdgeplugError):
    """An output path cannot be written."""


class LockedError(OutputError):
    """Another process is writing the same output folder; the message names it."""


class ResourceError(EdgeplugError):
    """The estimated memory of a run exceeds the budget given with --max-memory."""


class PluginError(EdgeplugError):
    """A plugin failed to load or broke its contract; the message names the plugin."""


class PassError(PluginError):
    """A pass raised or returned an invalid model; the message names the pass and phase."""

    def __init__(self, pass_name: str, phase: str, reason: str) -> None:
        super().__init__(f"pass '{pass_name}' ({phase}): {reason}")
        self.pass_name = pass_name
        self.phase = phase


class NoGradientError(ModelError):
    """An op on the path from a trainable parameter to the loss has no gradient in onnxruntime-training."""


class DiskFullError(OutputError):
    """The disk (or quota, or file size limit) ran out while edgeplug wrote; nothing partial is published."""

    def __init__(self, detail: str = "") -> None:
        where = f" ({detail})" if detail else ""
        super().__init__(f"no space left on the device{where}: free some space and run the same command again "
                         "(nothing partial was published; train resumes from its last complete checkpoint)")


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "File too large")


def is_disk_full(error: BaseException) -> bool:
    """An OSError with ENOSPC/EDQUOT/EFBIG, or onnxruntime's error text for one (it raises RuntimeError)."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    text = str(error)
    return any(marker in text for marker in _DISK_FULL_TEXTS)


def disk_full_detail(error: BaseException) -> str:
    """Which file the full disk stopped, when the error says so."""
    name = getattr(error, "filename", None)
    if name:
        return f"writing {name}"
    match = re.search(r"file: (\S+?)\.? error", " ".join(str(error).split()))  # onnxruntime's checkpoint writer
    return f"writing {match.group(1)}" if match else ""
