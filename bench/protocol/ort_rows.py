"""Helpers for rows that train edgeplug artifact folders with `edgeplug.Trainer`.

The ready point inside `Trainer.fit`: onnxruntime's sessions are open and the data is
loaded when the first training step's `edgeplug_before_step` hook runs, which is where the
protocol measures memory for every runtime. `ready_hook(probe)` is a plugin object for the
trainer's host that marks it.
"""

from __future__ import annotations

from typing import Any

from bench.protocol.measure import MemoryProbe


def ready_hook(probe: MemoryProbe) -> Any:
    """Register the result on the trainer's host: `trainer.host.register(hook, name="bench-ready")`."""
    from edgeplug.plugins import (
        hookimpl,  # lazily: the protocol imports without edgeplug
    )

    class ReadyHook:
        @hookimpl
        def edgeplug_before_step(self, step: Any) -> None:
            if step.training:
                probe.ready()

    return ReadyHook()
