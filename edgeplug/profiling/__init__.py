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
from pathlib import Path
from typing import Any

from edgeplug.errors import EdgeplugError
from edgeplug.profiling.measure import Measurement, measure
from edgeplug.profiling.static import (
    NodeCost,
    RetainedTensor,
    StaticProfile,
    static_profile,
)
from edgeplug.validation import first_error, load_schema


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


def profile(artifact_dir: str | Path, batch_size: int = 16, steps: int = 20, warmup: int = 3, *, measured: bool = True) -> Profile:
    """Count and (unless `measured=False`) measure the cost of one training step."""
    for value, least, what in ((batch_size, 1, "batch size (--batch-size)"), (steps, 1, "timed steps (--steps)"),
                               (warmup, 0, "warm-up steps (--warmup)")):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise EdgeplugError(f"{what} must be a whole number, at least {least}, not {value!r}")
    counted = static_profile(artifact_dir, batch_size)
    timing = measure(artifact_dir, batch_size, steps, warmup) if measured else None
    return Profile(str(artifact_dir), counted, timing)


__all__ = ["Measurement", "NodeCost", "Profile", "RetainedTensor", "StaticProfile", "measure", "profile", "static_profile"]
