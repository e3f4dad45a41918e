"""Training cost profiler: what a training step keeps and computes, and what it really costs.

`static_profile` reads an artifact folder and counts, at a given batch size, the
bytes of parameters, gradients, optimizer state and activations retained for
backward, and the forward and backward MACs per node. `measure` runs the
training step, and the same model's inference, each in a fresh process, and
reports peak resident memory and median times. `profile` does both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeplug.errors import EdgeplugError
from edgeplug.profiling.measure import MODES, Measurement, measure
from edgeplug.profiling.static import (
    NodeCost,
    RetainedTensor,
    StaticProfile,
    static_profile,
)
from edgeplug.progress import Progress
from edgeplug.validation import first_error, load_schema

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Profile:
    """Static counts and, unless skipped, measurements of one artifact folder."""

    artifact_dir: str
    static: StaticProfile
    measured: Measurement | None

    def to_dict(self) -> Any:
        """The profile as JSON values, checked against schemas/profile.schema.json."""
        document = json.loads(json.dumps({
            "artifact_dir": self.artifact_dir,
            "static": self.static.to_dict(),
            "measured": self.measured.to_dict() if self.measured else None,
        }))
        problem = first_error(document, load_schema("profile"))
        if problem:
            raise EdgeplugError(f"internal error: the profile does not match its schema: {problem}")
        return document


def profile(artifact_dir: str | Path, batch_size: int = 32, steps: int = 20, warmup: int = 3, *, measured: bool = True,
            dims: Mapping[str, int] | None = None) -> Profile:
    """Count and (unless `measured=False`) measure the cost of one training step; `dims` gives the lengths of
    named dynamic input axes besides the batch (e.g. {"sequence": 128} for a text model)."""
    for value, least, what in ((batch_size, 1, "batch size (--batch-size)"), (steps, 1, "timed steps (--steps)"),
                               (warmup, 0, "warm-up steps (--warmup)")):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise EdgeplugError(f"{what} must be a whole number, at least {least}, not {value!r}")
    phases = {"counting": "counting bytes and MACs", "baseline": "measuring the bare runtime (fresh process)",
              "infer": "measuring inference (fresh process)", "train": f"timing {warmup}+{steps} training steps (fresh process)",
              "kernels": "timing every node with onnxruntime's profiler (fresh process)"}
    with Progress("profile", total=1 + (len(MODES) if measured else 0), unit="phase") as bar:
        done: list[str] = []

        def phase(name: str) -> None:
            if done:
                bar.advance(status=phases[name])  # the finished phase counted, the next one named in the same redraw
            else:
                bar.status(phases[name])
            done.append(name)
            log.debug("profile: %s", phases[name])

        phase("counting")
        counted = static_profile(artifact_dir, batch_size, dims)
        timing = measure(artifact_dir, batch_size, steps, warmup, node_names={node.name: node.op_type for node in counted.nodes},
                         on_phase=phase, dims=dims) if measured else None
        bar.advance()
    return Profile(str(artifact_dir), counted, timing)


__all__ = ["Measurement", "NodeCost", "Profile", "RetainedTensor", "StaticProfile", "measure", "profile", "static_profile"]
