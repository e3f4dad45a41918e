"""Measured costs: peak memory and step time, each in a fresh process so runs do not mix."""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgeplug.artifacts import output_shape, read_report
from edgeplug.errors import EdgeplugError


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Peaks are VmHWM of the measuring process; times are medians over `steps` after warm-up."""

    batch_size: int
    steps: int
    train_peak_rss_bytes: int
    median_step_seconds: float
    step_seconds: tuple[float, ...]
    inference_peak_rss_bytes: int
    median_inference_seconds: float
    baseline_rss_bytes: int

    @property
    def training_overhead_bytes(self) -> int:
        """Peak of training minus peak of inference on the same model and batch."""
        return self.train_peak_rss_bytes - self.inference_peak_rss_bytes

    def to_dict(self) -> dict[str, Any]:
        document = dataclasses.asdict(self)
        document["training_overhead_bytes"] = self.training_overhead_bytes
        return document


def measure(artifact_dir: str | Path, batch_size: int = 16, steps: int = 20, warmup: int = 3, timeout: float = 1800) -> Measurement:
    """Run training steps, inference and a bare runtime, each in a fresh subprocess."""
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise EdgeplugError("batch size and steps must be at least 1, warm-up at least 0")
    artifact_dir = Path(artifact_dir)
    report = read_report(artifact_dir)
    classes, shape = _output(artifact_dir, report)
    results = {
        mode: _run(mode, artifact_dir, batch_size, steps, warmup, classes, shape, timeout)
        for mode in ("baseline", "infer", "train")
    }
    return Measurement(
        batch_size=batch_size,
        steps=steps,
        train_peak_rss_bytes=results["train"]["peak_rss_bytes"],
        median_step_seconds=statistics.median(results["train"]["seconds"]),
        step_seconds=tuple(results["train"]["seconds"]),
        inference_peak_rss_bytes=results["infer"]["peak_rss_bytes"],
        median_inference_seconds=statistics.median(results["infer"]["seconds"]),
        baseline_rss_bytes=results["baseline"]["peak_rss_bytes"],
    )


def _output(artifact_dir: Path, report: dict[str, Any]) -> tuple[int, list[int]]:
    dims = [d if isinstance(d, int) else 0 for d in output_shape(artifact_dir, report)]
    return (dims[-1] if dims else 0), dims


# `python -m edgeplug.profiling.worker` would put the current folder first on sys.path, where a folder
# named `edgeplug/` (a checkout, a project's own) shadows the installed package. With -c the first
# entry is '' (the current folder) too, and the bootstrap drops it before importing anything of ours.
_WORKER_BOOTSTRAP = ("import sys; sys.path.pop(0); from edgeplug.profiling.worker import main; "
                     "sys.exit(main(sys.argv[1:]))")


def _run(mode: str, artifact_dir: Path, batch_size: int, steps: int, warmup: int, classes: int,
         output_shape: list[int], timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-c", _WORKER_BOOTSTRAP, mode, str(artifact_dir), str(batch_size),
               str(steps), str(warmup), str(classes), json.dumps(output_shape)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise EdgeplugError(f"the {mode} measurement ran past {timeout:.0f} s; use fewer --steps or a smaller --batch-size") from None
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-3:])[:500]
        raise EdgeplugError(f"the {mode} measurement failed (exit {done.returncode}): {tail}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
