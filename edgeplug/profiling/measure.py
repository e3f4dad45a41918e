"""Measured costs: peak memory and step time, each in a fresh process so runs do not mix, and each node's
forward and backward time from onnxruntime's own profiler."""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
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
    nodes: tuple[dict[str, Any], ...] = ()
    """Per forward node of the model, from onnxruntime's profiler (median over the timed steps): `name`, `op_type`,
    `forward_seconds` (its kernel; a kernel onnxruntime fused it into counts for the fused node's first name),
    `backward_seconds` (the kernels of its gradient, `<node>_Grad/...`)."""
    other_kernels: tuple[dict[str, Any], ...] = ()
    """Kernels that belong to no forward node (the loss and its gradient, gradient accumulation): `name`, `seconds`."""
    kernels_note: str | None = None
    """Why `nodes` is empty (a staged folder; onnxruntime wrote no profile), else None."""

    @property
    def training_overhead_bytes(self) -> int:
        """Peak of training minus peak of inference on the same model and batch."""
        return self.train_peak_rss_bytes - self.inference_peak_rss_bytes

    def to_dict(self) -> dict[str, Any]:
        document = dataclasses.asdict(self)
        document["training_overhead_bytes"] = self.training_overhead_bytes
        return document


MODES = ("baseline", "infer", "train", "kernels")
"""The fresh processes `measure` runs, in order (`kernels`: the training steps again, under onnxruntime's profiler)."""


def measure(artifact_dir: str | Path, batch_size: int = 16, steps: int = 20, warmup: int = 3, timeout: float = 1800, *,
            node_names: Mapping[str, str] | None = None, on_phase: Callable[[str], None] | None = None,
            dims: Mapping[str, int] | None = None) -> Measurement:
    """Run a bare runtime, inference, training steps and profiled training steps, each in a fresh subprocess.

    `node_names` (forward node name -> op type, e.g. from the static profile) says which kernels are a forward
    node's; `on_phase(mode)` is called before each process starts (progress). Random data; named dynamic axes
    at the lengths in `dims`, attention masks all ones."""
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise EdgeplugError("batch size and steps must be at least 1, warm-up at least 0")
    artifact_dir = Path(artifact_dir)
    report = read_report(artifact_dir)
    classes, shape = _output(artifact_dir, report)
    results = {}
    for mode in MODES:
        if on_phase is not None:
            on_phase(mode)
        results[mode] = _run(mode, artifact_dir, batch_size, steps, warmup, classes, shape, timeout, dict(dims or {}))
    kernels = results["kernels"]
    nodes, other = per_node_seconds(kernels.get("events", []), warmup, node_names or {})
    return Measurement(
        batch_size=batch_size,
        steps=steps,
        train_peak_rss_bytes=results["train"]["peak_rss_bytes"],
        median_step_seconds=statistics.median(results["train"]["seconds"]),
        step_seconds=tuple(results["train"]["seconds"]),
        inference_peak_rss_bytes=results["infer"]["peak_rss_bytes"],
        median_inference_seconds=statistics.median(results["infer"]["seconds"]),
        baseline_rss_bytes=results["baseline"]["peak_rss_bytes"],
        nodes=tuple(nodes),
        other_kernels=tuple(other),
        kernels_note=kernels.get("reason"),
    )


def per_node_seconds(events: Iterable[Mapping[str, Any]], warmup: int,
                     node_names: Mapping[str, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Kernel events (`name` without `_kernel_time`, `dur` in microseconds, one per kernel per step) as per-node
    forward and backward seconds: each kernel's median over the steps after `warmup`, the kernels of a node's
    gradient (`<node>_Grad/...`) summed into its backward time. onnxruntime names a fused kernel `fused <node>`.
    Kernels of no node in `node_names` (the loss, gradient accumulation) are returned apart, largest first."""
    runs: dict[str, list[float]] = {}
    for event in events:
        runs.setdefault(str(event["name"]), []).append(float(event["dur"]) / 1e6)
    forward: dict[str, float] = {}
    backward: dict[str, float] = {}
    other: dict[str, float] = {}
    for name, seconds in runs.items():
        timed = seconds[warmup:] if len(seconds) > warmup else seconds
        median = statistics.median(timed)
        kernel = name.removeprefix("fused ")
        owner, grad, _ = kernel.partition("_Grad/")
        if grad and owner in node_names:
            backward[owner] = backward.get(owner, 0.0) + median
        elif kernel in node_names:
            forward[kernel] = forward.get(kernel, 0.0) + median
        else:
            other[kernel] = other.get(kernel, 0.0) + median
    nodes = [{"name": name, "op_type": op_type, "forward_seconds": forward.get(name, 0.0), "backward_seconds": backward.get(name, 0.0)}
             for name, op_type in node_names.items() if name in forward or name in backward]
    return nodes, [{"name": name, "seconds": value} for name, value in sorted(other.items(), key=lambda item: -item[1])]


def _output(artifact_dir: Path, report: dict[str, Any]) -> tuple[int, list[int]]:
    dims = [d if isinstance(d, int) else 0 for d in output_shape(artifact_dir, report)]
    return (dims[-1] if dims else 0), dims


# `python -m edgeplug.profiling.worker` would put the current folder first on sys.path, where a folder
# named `edgeplug/` (a checkout, a project's own) shadows the installed package. With -c the first
# entry is '' (the current folder) too, and the bootstrap drops it before importing anything of ours.
_WORKER_BOOTSTRAP = ("import sys; sys.path.pop(0); from edgeplug.profiling.worker import main; "
                     "sys.exit(main(sys.argv[1:]))")


def _run(mode: str, artifact_dir: Path, batch_size: int, steps: int, warmup: int, classes: int,
         output_shape: list[int], timeout: float, dims: dict[str, int]) -> dict[str, Any]:
    command = [sys.executable, "-c", _WORKER_BOOTSTRAP, mode, str(artifact_dir), str(batch_size),
               str(steps), str(warmup), str(classes), json.dumps(output_shape), json.dumps(dims)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise EdgeplugError(f"the {mode} measurement ran past {timeout:.0f} s; use fewer --steps or a smaller --batch-size") from None
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-3:])[:500]
        raise EdgeplugError(f"the {mode} measurement failed (exit {done.returncode}): {tail}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
