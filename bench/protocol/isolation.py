"""Each (row, episode) trains in a fresh process; rows are interleaved episode by episode.

Why fresh processes: an allocator or arena that grew for one row would otherwise lend
its memory to the next, and a runtime imported for one row (torch: ~220 MiB) would sit
in the next row's RSS. Why interleaved: load on a shared machine comes and goes; running
every row on episode k before any row on episode k+1 spreads it over all rows alike, and
a per-episode row order (seeded) keeps any row from always following the same one.

`run_fresh(target, job)` starts `python bench/protocol/child.py JOB.json` with the thread
count pinned in its environment; the child imports `target` ("package.module:function"),
calls `function(job, context)` with a `ChildContext` (memory probe, thread pinning) and
returns its dict plus the child's CPU seconds, wall seconds and load average.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from bench.protocol.measure import pin_threads

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).resolve().with_name("child.py")
T = TypeVar("T")
R = TypeVar("R")


class ChildFailed(RuntimeError):
    """A row's child process exited non-zero; the message carries its command and log tail."""


@dataclasses.dataclass(frozen=True)
class FreshResult:
    result: dict[str, Any]
    cpu_seconds: float  # user + system time of the child (and anything it waited for)
    wall_seconds: float


def run_fresh(target: str, job: dict[str, Any], *, work: Path, tag: str, threads: int = 1,
              spinning: bool = False, arena: bool = True, timeout: float | None = None) -> FreshResult:
    """Run `target(job, context)` in a fresh Python process; its JSON result and resource use."""
    work.mkdir(parents=True, exist_ok=True)
    job_path, result_path, log_path = (work / f"{tag}.job.json", work / f"{tag}.result.json", work / f"{tag}.log")
    result_path.unlink(missing_ok=True)
    spec = {"target": target, "threads": threads, "spinning": spinning, "arena": arena,
            "result": str(result_path), "job": job}
    job_path.write_text(json.dumps(spec, indent=1, default=_jsonable) + "\n", encoding="utf-8")
    command = [sys.executable, str(CHILD), str(job_path)]
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=pin_threads(threads), stdout=log, stderr=subprocess.STDOUT)
        try:
            _, status, usage = _wait(process, timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise ChildFailed(f"{tag}: timed out after {timeout} s; log {log_path}") from None
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not result_path.is_file():
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-25:])
        raise ChildFailed(f"{tag}: child exited {code}: {' '.join(command)}\n{tail}")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    return FreshResult(result, usage.ru_utime + usage.ru_stime, wall)


def _wait(process: subprocess.Popen[bytes], timeout: float | None) -> tuple[int, int, Any]:
    """os.wait4 for the child's own rusage (Popen.wait discards it)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG if deadline else 0)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return pid, status, usage
        if deadline and time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(process.args, timeout or 0)
        time.sleep(0.05)


def interleaved(episodes: Sequence[T], rows: Sequence[R], *, seed: int = 0, shuffle: bool = True) -> list[tuple[T, R]]:
    """Every row on episode 0, then every row on episode 1, ...; within an episode the rows
    run in a seeded order that changes from episode to episode (unless `shuffle` is False). The order is
    keyed by the episode's id (`.index`) where it has one, else by its position: a run that continues a
    draw from a later episode runs each episode's rows in the order the whole draw would."""
    schedule = []
    for k, episode in enumerate(episodes):
        key = getattr(episode, "index", None)
        key = key if isinstance(key, int) else k
        order = np.random.default_rng([seed, key]).permutation(len(rows)) if shuffle else np.arange(len(rows))
        schedule += [(episode, rows[int(i)]) for i in order]
    return schedule


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
