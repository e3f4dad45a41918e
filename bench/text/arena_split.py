"""Where onnxruntime's training memory goes beyond the live tensors: one training session, four allocator settings.

`edgeplug profile` counts what a step keeps alive (gradients, optimizer state, retained activations). The measured
RSS added also holds what onnxruntime's allocators keep around live tensors. This runs STEPS training steps (default
3) of a folder at batch B and sequence length L in a fresh process under one setting and prints its peak RSS and the
step times:

  arena     onnxruntime's defaults: CPU arena + the allocation planner's buffer reuse (edgeplug's `memory: arena`)
  noreuse   arena on, planner reuse off (`SessionOptions.enable_mem_reuse = False`)
  noarena   arena off, planner reuse on (glibc's mmap threshold fixed, so freed buffers go back)
  lean      both off, mmap threshold fixed (edgeplug's `memory: lean`)
  heap      both off, glibc's mmap threshold left dynamic: freed buffers stay in the heap for the next step's
            tensors (no page faults per step), so the heap keeps its high-water mark

    for m in arena noreuse noarena lean heap; do python bench/text/arena_split.py FOLDER $m 128 [B [STEPS]]; done
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

from edgeplug import _ort
from edgeplug.artifacts import read_report
from edgeplug.layout import CHECKPOINT, OPTIMIZER_MODEL, TRAINING_MODEL
from edgeplug.profiling.worker import random_batch
from edgeplug.trainer import peak_rss_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.memory_settings import timed_steps  # noqa: E402


def main(folder: Path, mode: str, length: int, batch_size: int = 16, steps: int = 3) -> None:
    runtime, api = _ort.inference_runtime(), _ort.training_api()
    options = runtime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    if mode in ("noarena", "lean"):
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD fixed, as edgeplug's lean setting does
        options.enable_cpu_mem_arena = False
    if mode == "heap":
        options.enable_cpu_mem_arena = False
    if mode in ("noreuse", "lean", "heap"):
        options.enable_mem_reuse = False
    state = api.CheckpointState.load_checkpoint(str(folder / CHECKPOINT))
    module = api.Module(str(folder / TRAINING_MODEL), state, None, session_options=options)
    optimizer = api.Optimizer(str(folder / OPTIMIZER_MODEL), module)
    report = read_report(folder)
    batch = random_batch(report, batch_size, 6, [None, 6], {"sequence": length})
    times = [round(seconds, 3) for seconds in timed_steps(module, optimizer, batch, steps)]
    print(json.dumps({"folder": str(folder), "mode": mode, "length": length, "batch_size": batch_size,
                      "peak_rss_mib": round(peak_rss_bytes() / 2**20, 1), "step_seconds": times,
                      "median_step_seconds_after_first": sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else None}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), *(int(v) for v in sys.argv[4:6]))
