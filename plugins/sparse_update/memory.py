"""Keep the selection's peak memory to what it holds.

The selection runs on the device, next to (or before) the fine-tuning it prepares, and
its peak must not exceed that fine-tuning's. onnxruntime sessions freed by earlier passes
or by the probe leave their memory in the C heap, where the next allocations may not reuse
it; glibc's malloc_trim returns it to the system.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc


def trim_heap() -> None:
    """Collect garbage and return the heap's free memory to the system (glibc only; nothing elsewhere)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
