"""One device of the fleet: global trainable values in, local training, trained values out.

The device trains a private copy of the artifact folder (links to the shared models,
its own checkpoint), so many simulated devices can share one rewritten folder and the
folder's own checkpoints are never touched.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgeplug.artifacts import read_report
from edgeplug.checkpoints import FOLDER, checkpoints_dir, latest_checkpoint, state_file
from edgeplug.data import Dataset
from edgeplug.errors import EdgeplugError, OutputError
from edgeplug.fleet.params import Arrays, check_arrays, read_trainable, write_state
from edgeplug.layout import CHECKPOINT
from edgeplug.trainer import Metrics, Trainer


@dataclasses.dataclass(frozen=True)
class LocalResult:
    """What one round of local training produced: the trainable values and how they were reached."""

    arrays: Arrays
    num_examples: int
    train: Metrics
    seconds: float


class FleetDevice:
    """Local training of one device on an edgeplug artifact folder, with values set from outside."""

    def __init__(self, artifact_dir: str | Path, work_dir: str | Path, *, seed: int = 0) -> None:
        self.artifact_dir = Path(artifact_dir).resolve()
        report = read_report(self.artifact_dir)
        if report.get("stages"):
            raise EdgeplugError(f"{self.artifact_dir} is a staged folder (a pass such as lls split it into stages); fleet training needs a plain one")
        self.work_dir = Path(work_dir)
        self.seed = seed
        self.report = report
        self.initial = read_trainable(self.artifact_dir)
        self._link_models()

    @property
    def trainable_names(self) -> list[str]:
        return sorted(self.initial)

    def _link_models(self) -> None:
        """Mirror the artifact folder by symbolic links, except the checkpoints this device writes."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.work_dir.resolve() == self.artifact_dir:
            raise OutputError("a device's work folder must not be the artifact folder itself")
        for entry in self.artifact_dir.iterdir():
            if entry.name in (CHECKPOINT, FOLDER) or entry.name.startswith("."):
                continue
            link = self.work_dir / entry.name
            if not link.is_symlink():
                if link.exists():
                    raise OutputError(f"{link} exists and is not a link to the artifact folder; use an empty work folder")
                os.symlink(entry, link)

    def _load(self, arrays: Mapping[str, np.ndarray], *, seed: int = 0, lr: float | None = None) -> Trainer:
        check_arrays(arrays, self.initial, "parameters from the server")
        shutil.rmtree(checkpoints_dir(self.work_dir), ignore_errors=True)
        write_state(self.artifact_dir, arrays, self.work_dir / CHECKPOINT)
        return Trainer(self.work_dir, seed=seed, lr=lr, progress=False)

    def fit(self, arrays: Mapping[str, np.ndarray], data: Dataset, *, epochs: int, batch_size: int,
            lr: float | None = None, round_seed: int = 0) -> LocalResult:
        """Start from `arrays`, train `epochs` on `data`, return the trained trainable values.

        The sample order depends on the device's seed and `round_seed`, so every round
        shuffles anew; the optimizer state starts fresh every round (it never travels).
        """
        trainer = self._load(arrays, seed=self.seed * 100_003 + round_seed, lr=lr)
        result = trainer.fit(data, epochs=epochs, batch_size=batch_size, resume=False)
        checkpoint = latest_checkpoint(self.work_dir)
        if checkpoint is None:  # pragma: no cover - fit always checkpoints at epoch end
            raise OutputError(f"local training in {self.work_dir} wrote no checkpoint")
        trained = read_trainable(state_file(checkpoint))
        last = result.epochs[-1]
        return LocalResult(trained, len(data), last.train, sum(e.seconds for e in result.epochs))

    def evaluate(self, arrays: Mapping[str, np.ndarray], data: Dataset, batch_size: int = 256) -> Metrics:
        """Loss and accuracy of `arrays` on `data`."""
        return self._load(arrays).evaluate(data, batch_size=batch_size)

    def single_input_name(self, purpose: str) -> str:
        """The model's only input, for built-in data; several inputs are an error naming `purpose`."""
        inputs = [entry["name"] for entry in self.report["training"]["inputs"]]
        if len(inputs) != 1:
            raise EdgeplugError(f"{purpose} feeds one image input; this model has {inputs}: pass your own data (--data/--test)")
        return str(inputs[0])

    def parameter_values(self) -> int:
        """Values in all the model's parameters, trainable or not (what full-model training would send)."""
        return int(self.report["parameters"]["total_values"])

    def dataset(self, source: str | Path | Mapping[str, np.ndarray]) -> Dataset:
        """Load and check data against the model's inputs and loss."""
        return Trainer(self.artifact_dir, progress=False).dataset(source)
