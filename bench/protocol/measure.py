"""Memory at the same point for every runtime, and pinned thread counts.

The ready point: the model, the runtime's sessions (or the torch module and its
optimizer) and the data are loaded, and step 1 has not run. A row calls
`MemoryProbe.ready()` there and `MemoryProbe.finish()` when training ends:

- peak RSS: the process's VmHWM at the end (it includes the interpreter, the runtime,
  the model and the data, so runtimes with a bigger footprint show it);
- RSS added by training: the peak after the ready point minus the RSS at the ready
  point. At the ready point the probe resets the kernel's peak counter (writing 5 to
  /proc/self/clear_refs, Linux >= 4.0), so a transient peak while loading does not hide
  what training adds. Where the reset is refused, the probe falls back to
  VmHWM(end) - VmHWM(ready), a lower bound, and says so (`peak_reset: false`).

VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child started by a big
parent would report the parent's peak.

Threads: `pin_threads(n)` sets the environment for BLAS/OpenMP pools (before they start),
and `ThreadPinning` applies n to onnxruntime sessions and to torch and records what each
runtime really uses. torch's OpenMP pool collapses under contention on shared cores, and
onnxruntime's spinning pools burn the cores other jobs need: pin both, record both.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in bytes (Linux only)."""
    values = {}
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    except OSError as error:
        raise RuntimeError("the benchmark measures memory from /proc/self/status (Linux)") from error
    if len(values) != 2:
        raise RuntimeError("no VmRSS/VmHWM in /proc/self/status")
    return values


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


@dataclasses.dataclass
class MemoryProbe:
    """Call `loading()` before the row loads its model (runtime imported, data in memory), `ready()` after
    loading, before step 1, and `finish()` after the last step.

    Two figures follow: RSS added by training (ready point to the end) and RSS added with loading
    (from `loading()` to the end: the sessions or module, and whatever a runtime does before step 1, e.g.
    edgeplug's frozen-prefix cache fill). Without `loading()` the second is None.
    """

    rss_ready: int | None = None
    hwm_ready: int | None = None
    peak_reset: bool = False
    rss_loading: int | None = None
    hwm_loading: int | None = None  # peak before loading() (interpreter, imports, data)
    _result: dict[str, Any] | None = dataclasses.field(default=None, repr=False)

    def loading(self) -> None:
        if self.rss_loading is not None or self.rss_ready is not None:
            return
        self.hwm_loading = proc_status()["VmHWM"]
        reset_peak()
        self.rss_loading = proc_status()["VmRSS"]

    def ready(self) -> None:
        if self.rss_ready is not None:
            return  # the first call wins: a loop may call it before every step
        status = proc_status()
        self.hwm_ready = status["VmHWM"]
        self.peak_reset = reset_peak()
        self.rss_ready = proc_status()["VmRSS"] if self.peak_reset else status["VmRSS"]

    def finish_once(self) -> None:
        """Take the measurement the first time it is called (later calls keep it)."""
        if self._result is None:
            self._result = self.finish()

    def result(self) -> dict[str, Any] | None:
        """What `finish_once` measured (None before)."""
        return self._result

    def finish(self) -> dict[str, Any]:
        if self.rss_ready is None or self.hwm_ready is None:
            raise RuntimeError("MemoryProbe.finish() without ready(): the row never reached its ready point")
        hwm = proc_status()["VmHWM"]
        if self.peak_reset:
            added = hwm - self.rss_ready
            peak = max(hwm, self.hwm_ready, self.hwm_loading or 0)
        else:
            added = hwm - self.hwm_ready
            peak = hwm
        with_loading = None
        if self.rss_loading is not None and self.peak_reset:
            with_loading = max(hwm, self.hwm_ready) - self.rss_loading  # hwm_ready: the peak between loading() and ready()
        return {"peak_rss_bytes": peak, "rss_added_bytes": added, "rss_ready_bytes": self.rss_ready,
                "rss_added_with_loading_bytes": with_loading, "rss_loading_bytes": self.rss_loading,
                "peak_before_ready_bytes": self.hwm_ready, "peak_reset": self.peak_reset}


def pin_threads(threads: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process whose BLAS/OpenMP pools use `threads` threads."""
    if threads < 1:
        raise ValueError("threads must be at least 1")
    env = dict(os.environ if environ is None else environ)
    env.update({name: str(threads) for name in THREAD_VARIABLES})
    return env


@dataclasses.dataclass(frozen=True)
class ThreadPinning:
    """Apply one thread count to every runtime a row uses and record what each one reports."""

    threads: int
    spinning: bool = False  # onnxruntime's intra-op pool busy-waits between ops when True
    arena: bool = True  # onnxruntime's CPU memory arena (its default); recorded because it moves RSS

    def ort_session_options(self) -> Any:
        """onnxruntime SessionOptions with the pinned pools (imported without torch)."""
        from edgeplug import _ort

        options = _ort.inference_runtime().SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.enable_cpu_mem_arena = self.arena
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        return options

    def pin_torch(self) -> None:
        import torch

        torch.set_num_threads(self.threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set, or parallel work already ran in this process
            pass

    def record(self) -> dict[str, Any]:
        """What the runtimes loaded in this process use now."""
        out: dict[str, Any] = {"requested": self.threads, "environment": {n: os.environ.get(n) for n in THREAD_VARIABLES}}
        out["onnxruntime"] = {"intra_op_num_threads": self.threads, "inter_op_num_threads": 1,
                              "allow_spinning": self.spinning, "cpu_mem_arena": self.arena}
        if "torch" in sys.modules and sys.modules["torch"] is not None:
            import torch

            out["torch"] = {"num_threads": torch.get_num_threads(), "num_interop_threads": torch.get_num_interop_threads()}
        return out
