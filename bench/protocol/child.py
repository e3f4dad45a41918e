"""Entry point of a fresh row process: `python bench/protocol/child.py JOB.json` (see isolation.py).

Thread counts are already in the environment (set by the parent before this interpreter
started); the context applies them to onnxruntime and torch and records them.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.protocol.measure import MemoryProbe, ThreadPinning  # noqa: E402


@dataclasses.dataclass
class ChildContext:
    """What a row function gets besides its job: call `probe.ready()` after loading (model,
    sessions, data), before step 1, and `probe.finish()` after the last training step."""

    probe: MemoryProbe
    pinning: ThreadPinning
    work: Path


def main(job_path: str) -> None:
    spec = json.loads(Path(job_path).read_text(encoding="utf-8"))
    pinning = ThreadPinning(int(spec["threads"]), spinning=bool(spec.get("spinning")), arena=bool(spec.get("arena", True)))
    module_name, _, function_name = spec["target"].partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    context = ChildContext(MemoryProbe(), pinning, Path(job_path).parent)
    load_before = os.getloadavg()
    started = time.perf_counter()
    result: dict[str, Any] = function(spec["job"], context)
    if "memory" not in result and context.probe.rss_ready is not None:
        result["memory"] = context.probe.finish()
    result["threads"] = pinning.record()
    result["child"] = {"seconds": round(time.perf_counter() - started, 3), "loadavg_before": load_before,
                       "loadavg_after": os.getloadavg(), "python": platform.python_version(), "pid": os.getpid()}
    Path(spec["result"]).write_text(json.dumps(result, default=_jsonable) + "\n", encoding="utf-8")


def _jsonable(value: Any) -> Any:
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, (np.integer, np.floating)):
            return value.item()
    except ImportError:
        pass
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python bench/protocol/child.py JOB.json")
    main(sys.argv[1])
