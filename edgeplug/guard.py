"""Resource guards: a memory budget checked before work starts, and a time limit per pass.

Memory (`--max-memory`, `max_memory=`): the estimate is the profiler's counted
training bytes (parameters + gradients + optimizer state + activations retained
for backward, `edgeplug.profiling.static_profile`) plus the runtime's own
footprint. It is a lower bound of the real peak (backward also holds activation
gradients and workspace; see docs/profiler.md), so a run that is refused would
not have fitted; a run that passes may still need more.

Time (`EDGEPLUG_PASS_TIMEOUT`, `pass_timeout=`): every phase of every pass runs
under a SIGALRM timer in the main thread. Python code that hangs is interrupted;
native code that never returns to the interpreter (a C extension stuck in a
loop) cannot be, and neither can passes run outside the main thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import re
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import onnx

from edgeplug.errors import EdgeplugError, ResourceError
from edgeplug.graph import tensor_bytes
from edgeplug.optimizers import OPTIMIZER_STATES

PASS_TIMEOUT_VARIABLE = "EDGEPLUG_PASS_TIMEOUT"
DEFAULT_PASS_TIMEOUT = 600.0
"""Seconds one phase of one pass may take unless EDGEPLUG_PASS_TIMEOUT says otherwise (0: no limit)."""

RUNTIME_FOOTPRINT = 64 * 2**20
"""What Python with onnxruntime-training imported occupies before any model is loaded:
`edgeplug profile`'s "runtime alone" peak, 63.6 MiB on the development machine."""

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """`512M`, `2G`, `1.5GiB`, `1048576` -> bytes (K/M/G/T are powers of 1024)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise EdgeplugError(f"memory size {text!r} is not understood; write it like 512M, 2G or 1.5G")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise EdgeplugError(f"memory size {text!r} must be more than 0")
    return value


def format_size(value: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def current_rss_bytes() -> int:
    """This process's resident memory now (Linux VmRSS), or the fixed runtime footprint elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return RUNTIME_FOOTPRINT


def trim_heap(collect: bool = True) -> None:
    """Collect young garbage (unless `collect` is False: a loop that frees nothing cyclic skips its cost) and
    hand the C heap's free memory back to the system (glibc's malloc_trim; a no-op elsewhere). onnxruntime
    sessions and protobufs a pass freed leave their memory in the heap, where the next allocations need not
    reuse it: without this, what a pass freed still counts in the process's RSS while the next pass (or the
    training the rewrite prepares, in the same process) runs. Only generations 0 and 1 are collected: a full
    collection walks every object the host process holds, which doubled rewrite time inside pytest (an
    application embedding the SDK pays the same), while the sparse-update pass's peak was the same either
    way (147-149 MiB full, 148 young; bench/sparse_update.py, Lite0 128 px)."""
    if collect:
        gc.collect(1)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def available_memory_bytes() -> int | None:
    """Memory this process may still take: the least of the address space left under `ulimit -v`,
    the system's MemAvailable and the cgroup's memory.max headroom (None where none is known)."""
    limits: list[int] = []
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft - _status_bytes("VmSize"))
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError):
        cgroup = Path("/sys/fs/cgroup")
        maximum = (cgroup / "memory.max").read_text().strip()
        if maximum != "max":
            limits.append(int(maximum) - int((cgroup / "memory.current").read_text()))
    return max(min(limits), 0) if limits else None


def _status_bytes(field: str) -> int:
    """A size field of /proc/self/status (VmSize, VmRSS, ...) in bytes; 0 where unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def forward_training_bytes(model: onnx.ModelProto, trainable: Iterable[str], optimizer: str) -> int:
    """Parameters + gradients + optimizer state, counted from the forward model (no activations)."""
    trainable = set(trainable)
    total = 0
    for tensor in model.graph.initializer:
        size = tensor_bytes(tensor)
        total += size
        if tensor.name in trainable:
            total += size * (1 + OPTIMIZER_STATES.get(optimizer, 0))
    return total


def check_budget(estimate: int, budget: int | None, *, what: str, advice: str) -> None:
    """Raise ResourceError when `estimate` bytes exceed `budget` bytes."""
    if budget is not None and estimate > budget:
        raise ResourceError(
            f"{what} needs at least {format_size(estimate)} by edgeplug's estimate, more than --max-memory "
            f"{format_size(budget)}; {advice}"
        )


def check_forward_budget(model: onnx.ModelProto, trainable: Iterable[str], optimizer: str, budget: int | None) -> None:
    """Before generating artifacts: parameters, gradients and optimizer state alone must fit."""
    if budget is None:
        return
    estimate = forward_training_bytes(model, trainable, optimizer) + RUNTIME_FOOTPRINT
    check_budget(estimate, budget, what="training this model (parameters, gradients, optimizer state)",
                 advice="train fewer parameters (the 'trainable' pass, e.g. layers: classifier) or use sgd, "
                        "or raise --max-memory")


def check_artifacts_budget(artifact_dir: Path, batch_size: int, budget: int | None, *, baseline: int,
                           when: str, dims: Mapping[str, int] | None = None) -> int | None:
    """Count a training step of `artifact_dir` at `batch_size` (named dynamic axes at `dims`); refuse when it
    exceeds `budget`."""
    if budget is None:
        return None
    from edgeplug.profiling.static import static_profile

    counted = static_profile(artifact_dir, batch_size, dims)
    estimate = counted.total_training_bytes + baseline
    parts = (f"parameters {format_size(counted.parameter_bytes)}, gradients and optimizer state "
             f"{format_size(counted.gradient_bytes + counted.optimizer_state_bytes)}, retained activations "
             f"{format_size(counted.retained_activation_bytes)}, runtime {format_size(baseline)}")
    check_budget(estimate, budget, what=f"a training step at batch size {batch_size} ({parts})",
                 advice=f"{when}, or raise --max-memory")
    return estimate


# -- time limit of a pass ---------------------------------------------------------------------


class PassTimeout(BaseException):
    """Raised inside a pass phase when its time limit is reached.

    A BaseException, so that a plugin's `except Exception` cannot swallow it."""


def pass_timeout_from_environment() -> float | None:
    """EDGEPLUG_PASS_TIMEOUT in seconds (0 or empty: no limit); DEFAULT_PASS_TIMEOUT when unset."""
    value = os.environ.get(PASS_TIMEOUT_VARIABLE)
    if value is None:
        return DEFAULT_PASS_TIMEOUT
    try:
        seconds = float(value) if value.strip() else 0.0
    except ValueError:
        raise EdgeplugError(f"{PASS_TIMEOUT_VARIABLE}={value!r} is not a number of seconds") from None
    return check_pass_timeout(seconds, f"{PASS_TIMEOUT_VARIABLE}={value!r}") or None


MAX_PASS_TIMEOUT = 10**6
"""Longest pass time limit accepted, in seconds (11 days; the interval timer overflows far above it)."""


def check_pass_timeout(seconds: float, what: str = "pass timeout (--pass-timeout)") -> float:
    """A pass time limit given in code or on the command line: 0 (no limit) or a positive number of seconds
    up to MAX_PASS_TIMEOUT."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds) \
            or not 0 <= seconds <= MAX_PASS_TIMEOUT:
        raise EdgeplugError(f"{what} must be 0 (no limit) or a number of seconds up to {MAX_PASS_TIMEOUT:,}, not {seconds!r}")
    return float(seconds)


PASS_TIMEOUT_GRACE = 5.0
"""Seconds a pass may keep running after its time limit while the timer re-raises PassTimeout every second."""
_exit_on_overrun = False


def exit_on_overrun(enabled: bool) -> bool:
    """Let a pass that outlives its limit by PASS_TIMEOUT_GRACE end the process (exit 2, one line).

    The `edgeplug` command turns this on: it owns its process, and a pass that swallows
    BaseException (the timer's PassTimeout included) would otherwise run forever. The
    Python API leaves it off: ending an embedding application is not edgeplug's call.
    Returns the previous setting.
    """
    global _exit_on_overrun
    previous, _exit_on_overrun = _exit_on_overrun, enabled
    return previous


@contextlib.contextmanager
def time_limit(seconds: float | None, overrun_message: str = "") -> Iterator[None]:
    """Raise PassTimeout in the block after `seconds` (main thread with SIGALRM only; else no limit).

    With `exit_on_overrun(True)`, a block still running PASS_TIMEOUT_GRACE seconds later
    ends the process with exit status 2 and `overrun_message`, from a watchdog thread.
    """
    if not seconds or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return
    watchdog = threading.Timer(seconds + PASS_TIMEOUT_GRACE, _stop_process, (overrun_message,)) if _exit_on_overrun else None
    if watchdog is not None:
        watchdog.daemon = True
        watchdog.start()
    try:
        with _alarm(seconds):
            yield
    finally:
        if watchdog is not None:
            watchdog.cancel()


def _stop_process(message: str) -> None:
    """The watchdog's last resort: the pass ignored every PassTimeout. The kernel releases the folder's
    lock; the next rewrite removes the staging folder this one leaves."""
    with contextlib.suppress(Exception):
        sys.stderr.write(f"edgeplug: error: {message}\n")
        sys.stderr.flush()
    os._exit(EdgeplugError.exit_code)


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:

    def expire(signum: int, frame: object) -> None:
        raise PassTimeout(f"did not finish within {seconds:g} s")

    previous_handler = signal.signal(signal.SIGALRM, expire)
    started = time.monotonic()
    # Fire again every second, in case the pass catches the first one with a bare `except`.
    previous_timer = signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_timer[0]:  # someone else's timer was running: give it back what is left
            left = previous_timer[0] - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 0.001), previous_timer[1])
