"""Runtime hooks of ASI: carry the Tucker factors from step to step and across a resume.

Before a training step the factors U_m are fed as graph inputs (warm start); the
graph runs one subspace iteration on this step's input and orthonormalises it
(build.orthonormalise), compresses with the refreshed factors and outputs them,
and after the step they become the next step's inputs. The factors are state,
saved with every checkpoint.

Folders built before the in-graph refresh (layout entries without "orthonormal")
output P_m = X_(m) X_(m)^T U_m instead; their next factors are its numpy QR basis.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

import edgeplug

from . import tucker

LAYOUT_FILE = "factors.json"
FACTORS_FILE = "factors.npz"
STATE_FILE = "activation-shortcut.npz"


class FactorHooks:
    """Feeds U_m before each training step and keeps the graph's refreshed factors after it."""

    def __init__(self, pass_dir: Path) -> None:
        self.layout: list[dict[str, Any]] = json.loads((pass_dir / LAYOUT_FILE).read_text(encoding="utf-8"))
        with np.load(pass_dir / FACTORS_FILE) as saved:
            self.factors = {entry["input"]: saved[entry["input"]].astype(np.float32) for entry in self.layout}
        self.updates = 0

    def feeds(self, batch: int) -> dict[str, np.ndarray]:
        """The factors for a batch of `batch` samples: a batch-mode factor of another batch size is
        replaced by its first rows re-orthonormalised, or an exact identity when the batch is small."""
        feeds = {}
        for entry in self.layout:
            factor = self.factors[entry["input"]]
            if entry["mode"] == 0 and batch != factor.shape[0]:
                rank = factor.shape[1]
                if batch >= rank:
                    rows = factor[:batch] if batch <= factor.shape[0] else np.vstack([factor, np.zeros((batch - factor.shape[0], rank), np.float32)])
                    factor = tucker.orth(rows + 1e-12 * np.eye(batch, rank, dtype=np.float32))
                else:
                    factor = np.eye(batch, rank, dtype=np.float32)
            feeds[entry["input"]] = factor
        return feeds

    @edgeplug.hookimpl
    def edgeplug_before_step(self, step: Any) -> None:
        # Evaluation batches get them too: eval models of folders built before the trainer read each
        # model's own input names declare them (unused); newer eval models do not, and ignore them.
        step.extra_inputs.update(self.feeds(len(step.batch["labels"])))

    @edgeplug.hookimpl
    def edgeplug_after_step(self, step: Any) -> None:
        for entry in self.layout:
            refreshed = step.outputs.get(entry["output"])
            current = self.factors[entry["input"]]
            if refreshed is None or refreshed.shape != current.shape or not np.all(np.isfinite(refreshed)):
                continue  # a partial batch (batch mode) or a diverged step: keep the factor
            self.factors[entry["input"]] = refreshed.astype(np.float32) if entry.get("orthonormal") else tucker.orth(refreshed)
        self.updates += 1

    @edgeplug.hookimpl
    def edgeplug_save_state(self, directory: Path) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **self.factors)
        (directory / STATE_FILE).write_bytes(buffer.getvalue())

    @edgeplug.hookimpl
    def edgeplug_load_state(self, directory: Path) -> None:
        path = directory / STATE_FILE
        if path.is_file():
            with np.load(path) as saved:
                for name in self.factors:
                    if name in saved.files:
                        self.factors[name] = saved[name].astype(np.float32)
