"""One device of the fleet: global values in, local training, trained values out.

A device trains the shared artifact folder in memory: `edgeplug.Trainer` with
`checkpoints=False` writes nothing (no scratch checkpoint, no fsync, no lock), so any
number of simulated devices, in any number of processes, can train one rewritten folder
at the same time, and the folder is only read. Each round opens fresh onnxruntime
sessions (one intra-op thread: a session with its own thread pool costs ~10x more to
open) because onnxruntime-training keeps the optimizer's moments inside the checkpoint
state: a reused state would carry one device's AdamW moments into the next device's
round. Everything else (report, recipe, the data checks) is read once and reused.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgeplug.artifacts import read_report
from edgeplug.data import Dataset
from edgeplug.errors import EdgeplugError
from edgeplug.fleet.params import Arrays, check_arrays, read_values, travelling_names
from edgeplug.optimizers import check_learning_rate
from edgeplug.trainer import Metrics, Trainer


@dataclasses.dataclass(frozen=True)
class LocalResult:
    """What one round of local training produced: the travelling values and how they were reached."""

    arrays: Arrays
    num_examples: int
    train: Metrics
    seconds: float
    steps: int = 0


class FleetDevice:
    """Local training of one device (or many, one after another) on an edgeplug artifact folder."""

    def __init__(self, artifact_dir: str | Path, *, seed: int = 0, threads: int = 1) -> None:
        self.artifact_dir = Path(artifact_dir).resolve()
        report = read_report(self.artifact_dir)
        if report.get("stages"):
            raise EdgeplugError(f"{self.artifact_dir} is a staged folder (a pass such as lls split it into stages); fleet training needs a plain one")
        self.seed = seed
        self.report = report
        self.names = travelling_names(self.artifact_dir)
        self.initial = read_values(self.artifact_dir, self.names)
        self.trainer = Trainer(self.artifact_dir, seed=seed, checkpoints=False, progress=False, threads=threads, cache_prefix=False)
        self._recipe_lr = self.trainer.lr

    @property
    def trainable_names(self) -> list[str]:
        return list(self.names)

    def fit(self, arrays: Mapping[str, np.ndarray], data: Dataset, *, epochs: int, batch_size: int,
            lr: float | None = None, round_seed: int = 0, seed: int | None = None) -> LocalResult:
        """Start from `arrays`, train `epochs` on `data`, return the trained travelling values.

        The sample order depends on the device's seed (`seed`, default the one it was made
        with) and `round_seed`, so every round shuffles anew; the optimizer state starts
        fresh every round (it never travels).
        """
        check_arrays(arrays, self.initial, "parameters from the server")
        trainer = self.trainer
        trainer.seed = (self.seed if seed is None else seed) * 100_003 + round_seed
        trainer.lr = self._recipe_lr if lr is None else check_learning_rate(lr, "the fleet's learning rate (lr)")
        started = time.perf_counter()
        result = trainer.fit(data, epochs=epochs, batch_size=batch_size, initial=arrays)
        trained = trainer.parameters(self.names)
        last = result.epochs[-1]
        return LocalResult(trained, len(data), last.train, time.perf_counter() - started, result.steps_run)

    def evaluate(self, arrays: Mapping[str, np.ndarray], data: Dataset, batch_size: int = 256) -> Metrics:
        """Loss and accuracy of `arrays` (with the folder's other weights) on `data`."""
        check_arrays(arrays, self.initial, "parameters to evaluate")
        return self.trainer.evaluate(data, batch_size=batch_size, parameters=arrays)

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
        return self.trainer.dataset(source)
