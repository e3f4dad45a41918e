"""One measurement in a fresh process: `python -m edgeplug.profiling.worker MODE ARTIFACTS BATCH STEPS WARMUP`.

MODE is `baseline` (the runtime imported, nothing loaded), `train` (training
steps on random data), `infer` (the forward model in an inference session) or
`kernels` (training steps under onnxruntime's own profiler: every kernel's time).
Prints one JSON line: peak resident memory (VmHWM) and the timed steps (and, for
`kernels`, onnxruntime's kernel events).
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeplug import _ort
from edgeplug.artifacts import read_report, stage_folders
from edgeplug.layout import CHECKPOINT, FORWARD_MODEL, OPTIMIZER_MODEL, RECIPE_FILE, TRAINING_MODEL
from edgeplug.memory_settings import DEFAULT_MEMORY, recipe_memory
from edgeplug.trainer import open_stage, peak_rss_bytes, session_options


def random_batch(report: dict[str, Any], batch_size: int, num_outputs: int | None, output_shape: list[int] | None,
                 dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Random data shaped like the model's inputs and like the inputs that pass hooks feed, and labels.

    Hook-fed inputs (report.json's `training.extra_inputs`, e.g. activation-shortcut's factors) get
    random arrays of their declared shape (the batch axis set to `batch_size`), not the hooks' values:
    the profiler runs no plugin code, and the ops these inputs feed (dense Einsum/MatMul) cost the
    same time and memory whatever the values. Named dynamic axes get their length from `dims` (else 1);
    integer inputs are zeros (token id 0), attention masks (integer inputs with 'mask' in the name) ones: every
    position counts, as in a batch of full-length sequences."""
    rng = np.random.default_rng(0)
    batch: dict[str, np.ndarray] = {}
    for spec in report["training"]["inputs"] + report["training"].get("extra_inputs", []):
        shape = [batch_size if i == 0 and not isinstance(d, int) else
                 (d if isinstance(d, int) and d > 0 else (dims or {}).get(str(d), 1)) for i, d in enumerate(spec["shape"])]
        dtype = np.dtype(spec["dtype"])
        if dtype.kind == "f":
            batch[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        else:
            batch[spec["name"]] = (np.ones if "mask" in spec["name"].lower() else np.zeros)(shape, dtype)
    if report["training"]["loss"] == "cross-entropy":
        batch["labels"] = rng.integers(0, num_outputs or 2, size=batch_size).astype(np.int64)
    else:
        shape = [batch_size, *(output_shape or [])[1:]]
        batch["labels"] = rng.random(shape).astype(np.float32)
    return batch


def _memory_setting(artifacts: Path) -> str:
    """The recipe's training.memory: the profiler measures the sessions the trainer would open."""
    try:
        recipe = json.loads((artifacts / RECIPE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return DEFAULT_MEMORY
    return recipe_memory(recipe)


def _train(artifacts: Path, batch: dict[str, np.ndarray], steps: int, warmup: int) -> list[float]:
    """Timed training steps; a staged folder runs its stages in one sweep, each stepping its optimizer."""
    report = read_report(artifacts)
    passes_on = [tuple(stage["passes_on"]) for stage in report.get("stages", [])] or [()]
    opened = []
    staged = bool(report.get("stages"))
    memory = _memory_setting(artifacts)
    for folder in stage_folders(artifacts, report):
        _, module, optimizer = (open_stage(folder, memory=memory) if staged
                                else _ort.open_artifacts(folder, session_options=session_options(None, memory)))
        module.train()
        opened.append((module, optimizer, list(module.input_names()), list(module.output_names())))
    # the trainer's sweep: an array a stage passed on is dropped after the last stage that reads it
    last_reader = {name: number for number, stage in enumerate(report.get("stages", [])) for name in stage["inputs"] if name not in batch}
    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        feeds = dict(batch)
        for number, ((module, optimizer, inputs, outputs), handed_on) in enumerate(zip(opened, passes_on, strict=True)):
            values = module(*[feeds[name] for name in inputs])
            optimizer.step()
            module.lazy_reset_grad()
            for name in [name for name in feeds if last_reader.get(name) == number]:
                del feeds[name]
            feeds.update({name: np.asarray(value) for name, value in zip(outputs, values, strict=True) if name in handed_on})
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return times


def _infer(artifacts: Path, batch: dict[str, np.ndarray], steps: int, warmup: int) -> list[float]:
    """Forward passes under the memory setting training uses, so that train minus infer compares like with like
    (a lean training step against an arena inference would credit the arena's slack to inference)."""
    options = session_options(None, _memory_setting(artifacts))
    session = _ort.inference_runtime().InferenceSession(str(artifacts / FORWARD_MODEL), options, providers=["CPUExecutionProvider"])
    feeds = {value.name: batch[value.name] for value in session.get_inputs()}
    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        session.run(None, feeds)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return times


def _kernels(artifacts: Path, batch: dict[str, np.ndarray], steps: int, warmup: int) -> dict[str, Any]:
    """Training steps with onnxruntime's profiler on the training session only (`SessionOptions.enable_profiling`):
    the kernel events (`cat` Node, `*_kernel_time`) of every step, warm-up included. No eval session (it would
    write its own profile into the same file name) and the optimizer's session unprofiled (it copies the
    options when it opens, after profiling is switched off again)."""
    report = read_report(artifacts)
    if report.get("stages"):
        return {"reason": "a staged folder: per-node times are measured for folders with one artifact set"}
    api, runtime = _ort.training_api(), _ort.inference_runtime()
    with tempfile.TemporaryDirectory(prefix="edgeplug-profile-") as folder:
        options = session_options(None, _memory_setting(artifacts)) or runtime.SessionOptions()  # the trainer's sessions
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "training")
        state = api.CheckpointState.load_checkpoint(str(artifacts / CHECKPOINT))
        module = api.Module(str(artifacts / TRAINING_MODEL), state, None, session_options=options)
        options.enable_profiling = False
        optimizer = api.Optimizer(str(artifacts / OPTIMIZER_MODEL), module)
        module.train()
        inputs = list(module.input_names())
        for _ in range(warmup + steps):
            module(*[batch[name] for name in inputs])
            optimizer.step()
            module.lazy_reset_grad()
        del optimizer, module, state  # the session writes its profile when it closes
        gc.collect()
        written = sorted(Path(folder).glob("training*.json"))
        if not written:
            return {"reason": "onnxruntime wrote no profile"}
        events = json.loads(written[0].read_text(encoding="utf-8"))
    kept = [{"name": event["name"].removesuffix("_kernel_time"), "dur": event["dur"], "op": event.get("args", {}).get("op_name")}
            for event in events if event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time")]
    return {"events": kept}


def main(argv: list[str]) -> int:
    mode, artifacts_text, batch_text, steps_text, warmup_text, classes_text, output_shape_text, *rest = argv
    dims = json.loads(rest[0]) if rest else {}
    artifacts = Path(artifacts_text)
    batch_size, steps, warmup = int(batch_text), int(steps_text), int(warmup_text)
    times: list[float] = []
    if mode == "baseline":
        _ort.training_api()
    else:
        report = read_report(artifacts)
        output_shape = json.loads(output_shape_text)
        batch = random_batch(report, batch_size, int(classes_text) or None, output_shape, dims)
        if mode == "kernels":
            print(json.dumps({"mode": mode, "peak_rss_bytes": peak_rss_bytes(), "seconds": [], **_kernels(artifacts, batch, steps, warmup)}))
            return 0
        times = (_train if mode == "train" else _infer)(artifacts, batch, steps, warmup)
    print(json.dumps({"mode": mode, "peak_rss_bytes": peak_rss_bytes(), "seconds": times}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
