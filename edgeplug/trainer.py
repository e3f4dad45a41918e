"""The on-device training loop over onnxruntime-training artifacts.

Deterministic and resumable: the sample order of epoch e comes from (seed, e), and
a checkpoint records the epoch and batch reached, so a run killed at any point and
resumed reaches the same weights as one that was never interrupted.

A staged folder (report.json lists `stages`) trains its stages in one forward sweep
per batch: each stage runs, steps its own optimizer at once, and passes its outputs
on as plain arrays, so no gradient crosses a stage boundary.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import logging
import resource
import shutil
import statistics
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeplug import _ort
from edgeplug.artifacts import output_shape, read_report, stage_folders
from edgeplug.carried import carried_feeds, carried_update, load_carried_state, save_carried_state
from edgeplug.checkpoints import (
    HOOKS,
    PROGRESS,
    checkpoint_runtime,
    checkpoints_dir,
    complete_checkpoints,
    device_parameters,
    latest_checkpoint,
    read_progress,
    state_file,
    write_checkpoint,
)
from edgeplug.collapse import CollapseMonitor, OutputSpread, TrainingWarning, likely_causes
from edgeplug.data import Dataset, TensorSpec, load_dataset
from edgeplug.errors import DataError, EdgeplugError, ModelError
from edgeplug.guard import check_artifacts_budget, current_rss_bytes, parse_size
from edgeplug.layout import CHECKPOINT, RECIPE_FILE, TRAINING_MODEL
from edgeplug.locking import output_lock, remove_stale_staging_in
from edgeplug.memory_settings import (
    DEFAULT_MEMORY,
    LEAN,
    MEMORY_SETTINGS,
    PREFIX_CACHE_DTYPES,
    recipe_memory,
    recipe_prefix_cache_dtype,
    switches,
)
from edgeplug.optimizers import DEFAULT_LR, check_learning_rate
from edgeplug.passes import RuntimeContext, fill_defaults
from edgeplug.plugins import PluginHost, default_host
from edgeplug.progress import Progress
from edgeplug.schedules import make_schedule
from edgeplug.sequences import SequenceAxes, axis_lengths, find_sequence_axes, outputs_agree

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32
"""Batch size of `train` (and `profile`, which describes the step `train` runs) when neither the command line nor the
recipe's `training.batch_size` gives one."""


@dataclasses.dataclass
class StepInfo:
    """One training step, as the step hooks see it."""

    epoch: int
    step: int
    batch: Mapping[str, np.ndarray] = dataclasses.field(repr=False)
    module: Any = dataclasses.field(repr=False)
    extra_inputs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)
    outputs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)
    training: bool = True
    """False for evaluation batches, which run only edgeplug_before_step."""


@dataclasses.dataclass
class _Session:
    """One trainable artifact set opened in onnxruntime-training (the folder, or one stage)."""

    state: Any
    module: Any
    optimizer: Any
    input_names: list[str]  # of the training model
    output_names: list[str]
    passes_on: tuple[str, ...]
    eval_input_names: list[str] | None = None  # of the eval model (None: the training model's)
    eval_output_names: list[str] | None = None
    carried: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # step-carried state by input name
    carried_specs: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # report.json's carried_state entries

    def names(self) -> tuple[list[str], list[str]]:
        """Input and output names of the model the module runs now: the eval model may take fewer
        inputs (e.g. a pass's training-only ones) and give fewer outputs."""
        if self.module.training or self.eval_input_names is None or self.eval_output_names is None:
            return self.input_names, self.output_names
        return self.eval_input_names, self.eval_output_names


@dataclasses.dataclass(frozen=True)
class Metrics:
    loss: float
    accuracy: float | None


@dataclasses.dataclass(frozen=True)
class EpochResult:
    epoch: int
    train: Metrics
    eval: Metrics | None
    seconds: float


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What a call to `Trainer.fit` did."""

    epochs: list[EpochResult]
    initial_eval: Metrics | None
    steps_run: int
    resumed_from_step: int | None
    median_step_seconds: float | None
    peak_rss_bytes: int
    step_losses: list[float] = dataclasses.field(default_factory=list)
    """The loss of every step this call ran, in order (for comparing runtimes step by step)."""
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    """The time of every step this call ran (forward, backward and optimizer of every stage)."""
    prefix_cache: dict[str, Any] | None = None
    """What the frozen-prefix cache did (`edgeplug.prefix_cache.CacheStats`), or why it was not used (`reason`)."""
    warnings: list[str] = dataclasses.field(default_factory=list)
    """Warnings of this run (a collapse: see `edgeplug.collapse`), also given to the `warn` callback."""
    trimming: dict[str, Any] | None = None
    """Whether batches were cut to their longest attention mask (`edgeplug.sequences`): the mask, the axes, the check's
    difference and the share of sequence positions fed; or why not (`reason`)."""


class Trainer:
    """Train an artifact folder written by `edgeplug.rewrite`."""

    def __init__(
        self,
        artifact_dir: str | Path,
        *,
        seed: int | None = None,
        lr: float | None = None,
        checkpoint_every: int | None = None,
        keep_checkpoints: int = 2,
        checkpoints: bool = True,
        progress: bool = True,
        echo: Callable[[str], None] | None = None,
        host: PluginHost | None = None,
        max_memory: int | str | None = None,
        threads: int | None = None,
        cache_prefix: bool | None = None,
        cache_memory: int | str = "256M",
        cache_dir: str | Path | None = None,
        warn: Callable[[str], None] | None = None,
        memory: str | None = None,
        trim_padding: bool | None = None,
        cache_dtype: str | None = None,
    ) -> None:
        """`cache_prefix`: compute the frozen prefix (everything before the first trainable layer) once per
        training example and train only the rest (`edgeplug.prefix_cache`; bit-identical weights). None (the
        default) uses it when it applies, more than one epoch remains and trimming the padding would not cut the
        first epoch's batches to at most half their positions (`TRIM_OVER_CACHE_SHARE`), True insists (an error says why it
        cannot), False never. The cache keeps up to `cache_memory` in memory and the rest in a file under
        `cache_dir` (default: the system's temporary folder). `cache_dtype`: how the cache stores float32 tensors,
        "float32" (exact: bit-identical weights) or "float16" (half the bytes, cast back to float32 before each step:
        close to, not bit-identical with, float32); None takes the recipe's `training.prefix_cache_dtype` (float32).
        `memory`: "compact" (the CPU arena without the
        allocation planner's buffer reuse: less memory than onnxruntime's defaults at the same speed), "arena"
        (onnxruntime's defaults) or "lean" (no arena, no planned reuse: the process holds only live tensors;
        slower steps); None takes the recipe's `training.memory` (edgeplug.memory_settings).

        `trim_padding`: cut each batch to its longest attention mask (`edgeplug.sequences`: inputs that share the
        mask's dynamic sequence axis lose their trailing all-padding columns). None (the default) trims when the model
        has such a mask and one padded batch gives the same outputs trimmed (checked before step 1), True insists (an
        error says why it cannot), False never."""
        self.artifact_dir = Path(artifact_dir)
        self.cache_prefix = cache_prefix
        self.cache_memory = parse_size(cache_memory)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._prefix: Any = None  # the PrefixCache the open sessions read from, or None
        self.max_memory = parse_size(max_memory) if max_memory is not None else None
        if threads is not None and threads < 1:
            raise EdgeplugError(f"threads must be at least 1, got {threads}")
        self.threads = threads  # onnxruntime intra-op threads (None: onnxruntime's default, one per core)
        self.report = read_report(self.artifact_dir)
        try:
            self.recipe = json.loads((self.artifact_dir / RECIPE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise EdgeplugError(f"{self.artifact_dir / RECIPE_FILE} is missing or damaged ({type(error).__name__}); "
                                "rewrite the artifact folder") from None
        if not isinstance(self.recipe, dict):
            raise EdgeplugError(f"{self.artifact_dir / RECIPE_FILE} is not an edgeplug recipe; rewrite the artifact folder")
        recipe_training = self.recipe.get("training", {}) if isinstance(self.recipe.get("training"), dict) else {}
        self._recipe_training: dict[str, Any] = recipe_training
        if seed is None:
            seed = recipe_training.get("seed", 0)
        self.memory = memory if memory is not None else recipe_memory(self.recipe)
        if self.memory not in MEMORY_SETTINGS:
            raise EdgeplugError(f"memory must be one of {', '.join(MEMORY_SETTINGS)}, not {self.memory!r}")
        self.cache_dtype = cache_dtype if cache_dtype is not None else recipe_prefix_cache_dtype(self.recipe)
        if self.cache_dtype not in PREFIX_CACHE_DTYPES:
            where = "cache_dtype (--cache-dtype)" if cache_dtype is not None else f"{self.artifact_dir}/{RECIPE_FILE}: training.prefix_cache_dtype"
            raise EdgeplugError(f"{where} must be one of {', '.join(PREFIX_CACHE_DTYPES)}, not {self.cache_dtype!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise EdgeplugError(f"the seed (--seed) must be a whole number, 0 or more, not {seed!r}")
        if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int)
                                             or checkpoint_every < 1):
            raise EdgeplugError(f"checkpoint_every (--checkpoint-every) must be at least 1 step, not {checkpoint_every!r}")
        self.seed = seed
        self.lr = check_learning_rate(lr if lr is not None else float(self.recipe.get("optimizer", {}).get("lr", DEFAULT_LR)),
                                      "the learning rate (--lr)" if lr is not None else f"{self.artifact_dir}/{RECIPE_FILE}: optimizer.lr")
        self.checkpoint_every = checkpoint_every
        self.keep_checkpoints = keep_checkpoints
        # False: nothing written and no lock taken (benchmarks measure the steps alone; fleet devices train in memory)
        self.checkpoints = checkpoints
        self.progress = progress
        self.echo = echo or _log_line  # what happens on the way: logged (the CLI shows it), or given to `echo`
        self.warn = warn or (lambda text: warnings.warn(text, TrainingWarning, stacklevel=5))
        self.host = host or default_host()
        training = self.report["training"]
        self.loss_kind: str = training["loss"]
        self.input_specs = [TensorSpec(i["name"], i["dtype"], i["shape"]) for i in training["inputs"]]
        self.trim_padding = trim_padding
        self._trimming: SequenceAxes | None = None  # set per fit once the check passed
        self._tokens = [0, 0]  # sequence positions fed, and present before trimming (this fit)
        self._api = _ort.training_api()
        self._folders = stage_folders(self.artifact_dir, self.report)
        self._carried_specs = [list(entry.get("carried_state", [])) for entry in
                               self.report.get("device_runtime", {}).get("artifact_sets", [])] or [[] for _ in self._folders]
        self._staged = bool(self.report.get("stages"))
        self._passes_on = [tuple(stage["passes_on"]) for stage in self.report.get("stages", [])] or [()]
        handed_on = {name for names in self._passes_on for name in names}
        self._last_reader = {name: number for number, stage in enumerate(self.report.get("stages", []))
                             for name in stage["inputs"] if name in handed_on}
        self._sessions: list[_Session] = []
        self._module: Any = None
        self._position = (0, 0)  # (epoch, global step) the current weights are at
        self._checkpoint: Path | None = None  # the checkpoint the session was opened from
        self._hooks_active = False
        self._step_losses: list[float] = []
        self._optimizer: Any = None
        self._state: Any = None
        self._batch_size = self.run_defaults(None, None)[1]  # of the last fit (else the recipe's): evaluation's default
        self._eval_spread = OutputSpread()

    # -- data ----------------------------------------------------------------------

    def dataset(self, source: str | Path | Mapping[str, np.ndarray]) -> Dataset:
        """Load and check data against this model's inputs and loss."""
        data = self.recipe.get("data", {})
        return load_dataset(
            source, self.input_specs, loss=self.loss_kind, num_classes=self._num_classes(),
            input_keys=data.get("inputs"), labels_key=data.get("labels"),
        )

    def _refuse_zero_width(self) -> None:
        """A zero-width output crashes onnxruntime-training natively (SIGSEGV); rewrite refuses such models,
        but a folder may come from an older edgeplug or be edited by hand."""
        shape = output_shape(self.artifact_dir, self.report)
        if any(isinstance(d, int) and d == 0 for d in shape):
            raise ModelError(f"{self.artifact_dir}: output '{self.report['training']['output']}' has shape "
                             f"{['N' if d is None else d for d in shape]}: a zero-width output leaves nothing to train; "
                             "fix the model and rewrite it")

    def _num_classes(self) -> int | None:
        if self.loss_kind != "cross-entropy":
            return None
        shape = output_shape(self.artifact_dir, self.report)
        return shape[-1] if shape and isinstance(shape[-1], int) and shape[-1] > 0 else None

    # -- sessions --------------------------------------------------------------------

    def _open(self, checkpoint: Path | None, values: Mapping[str, np.ndarray] | None = None) -> None:
        """Open the sessions from `checkpoint` (None: the folder's initial state), then overwrite the
        parameters named in `values`."""
        self._refuse_zero_width()
        self._checkpoint = checkpoint
        # A failing step is reported as one DataError line; onnxruntime's own log line would be a second.
        _ort.inference_runtime().set_default_logger_severity(4)
        self._sessions = []
        for number, (folder, passes_on) in enumerate(zip(self._folders, self._passes_on, strict=True)):
            index = number if self._staged else None
            foreign = checkpoint is not None and checkpoint_runtime(checkpoint) != "python"  # parameters only: evaluate
            state_path = state_file(checkpoint, index) if checkpoint and not foreign else folder / CHECKPOINT
            with _ort.captured_native_stderr():
                if self._prefix is not None:
                    state, module, optimizer = self._prefix.open(folder, state_path)
                else:
                    state, module, optimizer = (open_stage(folder, state_path, threads=self.threads, memory=self.memory) if self._staged
                                                else _ort.open_artifacts(folder, state_path, session_options=session_options(self.threads, self.memory)))
            if foreign and checkpoint is not None:
                for name, value in device_parameters(checkpoint, number).items():
                    state.parameters[name] = value
            train_names = (list(module.input_names()), list(module.output_names()))
            module.eval()
            eval_names = (list(module.input_names()), list(module.output_names()))
            module.train()
            specs = self._carried_specs[number]
            carried = load_carried_state(checkpoint, number, folder, specs)
            self._sessions.append(_Session(state, module, optimizer, *train_names, passes_on, *eval_names, carried, specs))
        last = self._sessions[-1]  # what step hooks see as `step.module`
        self._state, self._module, self._optimizer = last.state, last.module, last.optimizer
        if values:
            self._set_parameters(values)

    def _set_parameters(self, values: Mapping[str, np.ndarray]) -> None:
        unknown = set(values)
        with _ort.captured_native_stderr():
            for session in self._sessions:
                for name, value in values.items():
                    if name in session.state.parameters:
                        session.state.parameters[name] = np.ascontiguousarray(value)
                        unknown.discard(name)
        if unknown:
            raise EdgeplugError(f"{self.artifact_dir} has no parameters named {sorted(unknown)[:5]}")

    def parameters(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Current values of the parameters `names` (default: every trainable one), by name, as copies.

        After `fit` these are the trained values in memory, also when `checkpoints=False`.
        """
        if self._module is None:
            self._open(latest_checkpoint(self.artifact_dir))
        wanted = None if names is None else set(names)
        found: dict[str, np.ndarray] = {}
        for session in self._sessions:
            for name, parameter in session.state.parameters:
                if (parameter.requires_grad if wanted is None else name in wanted):
                    found[name] = np.array(parameter.data)
        if wanted is not None and wanted - set(found):
            raise EdgeplugError(f"{self.artifact_dir} has no parameters named {sorted(wanted - set(found))[:5]}")
        return dict(sorted(found.items()))

    def _run(self, batch: Mapping[str, np.ndarray], extra: Mapping[str, np.ndarray], *,
             train: bool = False) -> dict[str, np.ndarray]:
        """One sweep through the stages (one session for a plain folder); the last stage's outputs.

        With `train`, each stage's optimizer steps right after that stage ran, before the next runs.
        """
        feeds = {**batch, **extra}
        values: dict[str, np.ndarray] = {}
        size = len(batch["labels"])
        for number, session in enumerate(self._sessions):
            fed, matched = carried_feeds(session.carried, session.carried_specs, size)
            values = self._run_session(session, {**feeds, **fed})
            if train:
                session.optimizer.step()
                session.module.lazy_reset_grad()
                session.carried.update(carried_update(session.carried_specs, values, matched))
            for name in [name for name in feeds if self._last_reader.get(name, -1) == number]:
                del feeds[name]  # a block output no later stage reads: free it before the next stage runs
            feeds.update({name: values[name] for name in session.passes_on})
        return values

    @staticmethod
    def _run_session(session: _Session, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names, output_names = session.names()
        missing = [name for name in names if name not in feeds]
        if missing:
            raise DataError(f"the training model needs inputs {missing} that neither the data nor any pass hook provides")
        try:
            values = session.module(*[feeds[name] for name in names])
        except Exception as error:  # onnxruntime reports shape/type problems as RuntimeError/Fail
            raise DataError(f"onnxruntime rejected a batch: {' '.join(str(error).split())[:400]}") from None
        if not isinstance(values, (list, tuple)):
            values = [values]
        return dict(zip(output_names, [np.asarray(v) for v in values], strict=True))

    def _set_mode(self, train: bool) -> None:
        for session in self._sessions:
            session.module.train() if train else session.module.eval()

    # -- evaluation --------------------------------------------------------------------

    def evaluate(self, data: Dataset | str | Path | Mapping[str, np.ndarray], batch_size: int | None = None, *,
                 parameters: Mapping[str, np.ndarray] | None = None) -> Metrics:
        """Mean loss and accuracy (cross-entropy only) of the current weights on `data`.

        Batches of `batch_size` (default: the batch size of the last `fit`, else the recipe's, else 32), under the
        same `max_memory` check as training. `parameters` first overwrites those parameters (by name) in the
        open sessions, or in the folder's initial state when none is open.
        """
        dataset = data if isinstance(data, Dataset) else self.dataset(data)
        batch_size = self._batch_size if batch_size is None else batch_size
        if batch_size < 1:
            raise EdgeplugError("the evaluation batch size must be at least 1")
        check_artifacts_budget(self.artifact_dir, batch_size, self.max_memory, baseline=current_rss_bytes(),
                               when="evaluate with a smaller batch size (--batch-size)", dims=axis_lengths(self.input_specs, dataset.inputs))
        return self._evaluate(dataset, batch_size, parameters)

    def _evaluate(self, dataset: Dataset, batch_size: int, parameters: Mapping[str, np.ndarray] | None = None) -> Metrics:
        """`evaluate` without the memory check (fit checked the same batch size for training, which needs more)."""
        if self._module is None:
            self._open(None if parameters is not None else latest_checkpoint(self.artifact_dir), parameters)
        elif parameters is not None:
            self._set_parameters(parameters)
        epoch, global_step = self._position
        losses, correct = [], 0
        self._eval_spread = OutputSpread()
        output_name = self.report["training"]["output"]
        self._set_mode(False)
        try:
            with self._runtime_hooks_active():
                for start in range(0, len(dataset), batch_size):
                    indices = np.arange(start, min(start + batch_size, len(dataset)))
                    batch = self._trimmed(dataset.batch(indices))
                    step = StepInfo(epoch, global_step, batch, self._module, training=False)
                    self.host.before_step(step)
                    outputs = self._run(batch, step.extra_inputs)
                    losses.append(float(_loss(outputs)) * len(indices))
                    correct += _correct(outputs, batch["labels"], self.loss_kind, output_name)
                    if output_name in outputs:
                        self._eval_spread.add(outputs[output_name])
        finally:
            self._set_mode(True)
        accuracy = correct / len(dataset) if self.loss_kind == "cross-entropy" else None
        return Metrics(sum(losses) / len(dataset), accuracy)

    # -- training ------------------------------------------------------------------------

    def run_defaults(self, epochs: int | None, batch_size: int | None) -> tuple[int, int]:
        """`epochs` and `batch_size`, or where None the recipe's `training` values, else 1 and DEFAULT_BATCH_SIZE."""
        if epochs is None:
            epochs = int(self._recipe_training.get("epochs", 1))
        if batch_size is None:
            batch_size = int(self._recipe_training.get("batch_size", DEFAULT_BATCH_SIZE))
        return epochs, batch_size

    def fit(
        self,
        train: Dataset | str | Path | Mapping[str, np.ndarray],
        eval: Dataset | str | Path | Mapping[str, np.ndarray] | None = None,
        *,
        epochs: int | None = None,
        batch_size: int | None = None,
        resume: bool = True,
        initial: Mapping[str, np.ndarray] | None = None,
    ) -> FitResult:
        """Train for `epochs` epochs, resuming from the last checkpoint unless `resume=False`.

        `epochs` and `batch_size` default to the recipe's `training` section, else 1 and 32.
        `initial` starts from the folder's initial state with those parameters (by name)
        overwritten instead, as `resume=False` does (a fleet device starts from the global model).
        Holds the artifact folder's lock (another process training or rewriting it is a
        LockedError; with `checkpoints=False` nothing is written and no lock is taken) and, with
        `max_memory`, refuses to start when the estimated training step at `batch_size` does not fit.
        """
        epochs, batch_size = self.run_defaults(epochs, batch_size)
        if epochs < 1 or batch_size < 1:
            raise EdgeplugError("epochs and batch size must be at least 1")
        train_set = train if isinstance(train, Dataset) else self.dataset(train)
        eval_set = None if eval is None else (eval if isinstance(eval, Dataset) else self.dataset(eval))
        check_artifacts_budget(self.artifact_dir, batch_size, self.max_memory, baseline=current_rss_bytes(),
                               when="use a smaller --batch-size or train fewer layers (rewrite with the 'trainable' pass)",
                               dims=axis_lengths(self.input_specs, train_set.inputs))
        resume = resume and initial is None
        if not self.checkpoints:
            return self._fit(train_set, eval_set, epochs, batch_size, resume, initial)
        with output_lock(self.artifact_dir, purpose=f"edgeplug train {self.artifact_dir}"):
            remove_stale_staging_in(checkpoints_dir(self.artifact_dir))
            return self._fit(train_set, eval_set, epochs, batch_size, resume, initial)

    def _fit(self, train_set: Dataset, eval_set: Dataset | None, epochs: int, batch_size: int, resume: bool,
             start: Mapping[str, np.ndarray] | None = None) -> FitResult:
        if not resume and self.checkpoints:
            shutil.rmtree(checkpoints_dir(self.artifact_dir), ignore_errors=True)
        checkpoint, progress = self._resume_point() if resume else (None, None)
        progress = progress or {"epoch": 0, "batch": 0, "step": 0, "history": []}
        raw_train = train_set
        train_set, cache_info = self._start_prefix_cache(train_set, epochs - int(progress["epoch"]), batch_size)
        _ort.seed_random_ops(step_seed(self.seed, int(progress["step"])))  # random ops seeded when sessions open
        self._open(checkpoint, start)
        trimming = self._start_trimming(raw_train, batch_size, cached=train_set is not raw_train)
        if checkpoint:
            self._note_unreproducible_random_ops()
        # Read now: training prunes old checkpoints, the resumed one included.
        resumed_from = int(progress["step"]) if checkpoint else None
        if checkpoint and progress.get("num_samples") not in (None, len(train_set)):
            raise DataError(f"the checkpoint was made with {progress['num_samples']} training samples, this data has {len(train_set)}; use the same data or --restart")
        steps_per_epoch = -(-len(train_set) // batch_size)
        if checkpoint and progress.get("seed") not in (None, self.seed):
            raise EdgeplugError(f"the checkpoint was made with seed {progress['seed']}; resume with --seed {progress['seed']} or pass --restart")
        if checkpoint and progress.get("batch_size") not in (None, batch_size):
            raise EdgeplugError(f"the checkpoint was made with batch size {progress['batch_size']}; resume with the same or pass --restart")
        schedule = make_schedule(self.lr, self.recipe.get("optimizer", {}).get("schedule"), epochs * steps_per_epoch)
        self._position = (int(progress["epoch"]), int(progress["step"]))
        with self._runtime_hooks_active():
            if checkpoint:
                self.echo(f"resuming from {checkpoint.name} (epoch {progress['epoch'] + 1}, batch {progress['batch']})")
            self._batch_size = batch_size
            initial = None
            if eval_set is not None and not checkpoint:
                initial = self._evaluate(eval_set, batch_size)
                self.echo(f"before training: {_metrics_text('eval', initial)}")
            monitor = self._collapse_monitor(train_set, eval_set, initial)
            step_times = self._epochs(train_set, eval_set, epochs, batch_size, steps_per_epoch, schedule, progress, monitor)
        history = [EpochResult(h["epoch"], Metrics(**h["train"]), Metrics(**h["eval"]) if h.get("eval") else None, h["seconds"]) for h in progress["history"]]
        median = statistics.median(step_times) if step_times else None
        peak = peak_rss_bytes()
        if trimming is not None and self._trimming is not None:
            trimming["fed_share"] = round(self._tokens[0] / self._tokens[1], 4) if self._tokens[1] else 1.0
        return FitResult(history, initial, len(step_times), resumed_from, median, peak, list(self._step_losses),
                         [round(t, 6) for t in step_times], cache_info, list(monitor.messages), trimming)

    def _start_trimming(self, train_set: Dataset, batch_size: int, *, cached: bool) -> dict[str, Any] | None:
        """Decide whether batches are cut to their longest attention mask (see `trim_padding`); what was decided.

        The check: the `batch_size` training examples with the shortest masks, once padded and once
        trimmed, through the eval model at the current weights; the outputs must agree up to float rounding.
        """
        self._trimming, self._tokens = None, [0, 0]
        if self.trim_padding is False:
            return None
        axes = find_sequence_axes(self.input_specs)
        reason = None
        if axes is None:
            reason = "the model has no attention-mask input (integer, rank 2, 'mask' in its name) with a dynamic sequence axis"
        elif self._staged:
            reason = "staged folders pass tensors between stages whose sequence axis is not known"
        elif cached:
            reason = "the frozen-prefix cache feeds cached tensors of the padded length"
        elif any(session.carried_specs for session in self._sessions):
            reason = "the training step carries state (a pass's factors) shaped at the padded length"
        if reason is None and axes is not None:
            mask = np.asarray(train_set.inputs[axes.mask])
            lengths = mask.reshape(len(mask), -1).cumsum(axis=1).argmax(axis=1) if mask.size else np.zeros(0)
            shortest = np.argsort(lengths, kind="stable")[: min(batch_size, len(train_set))]
            batch = train_set.batch(np.sort(shortest))
            trimmed = axes.trim(batch)
            if trimmed[axes.mask].shape == batch[axes.mask].shape:
                reason = "the training data has no padding to trim (every batch uses every position)"
            else:
                agree, difference = self._same_outputs(batch, trimmed)
                if not agree:
                    reason = (f"the model's output changes when padding is cut (max difference {difference:.2e}): it does not "
                              f"mask '{axes.mask}' everywhere, so every position is fed")
        if reason is not None:
            if self.trim_padding:
                raise EdgeplugError(f"cannot trim padding: {reason}; train without trim_padding (--trim-padding)")
            return {"reason": reason}
        assert axes is not None
        self._trimming = axes
        self.echo(f"batches trimmed to their longest '{axes.mask}' (axes {dict(axes.axes)}; checked on one padded batch: "
                  f"max difference {difference:.1e})")
        return {**axes.to_dict(), "check_difference": difference}

    def _same_outputs(self, batch: Mapping[str, np.ndarray], trimmed: Mapping[str, np.ndarray]) -> tuple[bool, float]:
        output_name = self.report["training"]["output"]
        self._set_mode(False)
        try:
            with self._runtime_hooks_active():
                results = []
                for feed in (batch, trimmed):
                    step = StepInfo(*self._position, feed, self._module, training=False)
                    self.host.before_step(step)
                    results.append(self._run(feed, step.extra_inputs).get(output_name))
        finally:
            self._set_mode(True)
        if results[0] is None or results[1] is None:
            return False, float("inf")
        return outputs_agree(results[0], results[1])

    def _trimmed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._trimming is None:
            return batch
        out = self._trimming.trim(batch)
        self._tokens[0] += int(np.prod(out[self._trimming.mask].shape))
        self._tokens[1] += int(np.prod(batch[self._trimming.mask].shape))
        return out

    def _resume_point(self) -> tuple[Path | None, dict[str, Any] | None]:
        """The newest complete checkpoint that loads, and its progress; damaged ones are skipped with a note.

        A checkpoint can be complete on disk and still damaged (a truncated copy, a bad
        sector, a hand edit): the one before it is used instead, and only when every one
        is damaged is that an error.
        """
        candidates = complete_checkpoints(self.artifact_dir)
        problems = []
        for candidate in candidates:
            runtime = checkpoint_runtime(candidate)
            if runtime != "python":
                raise EdgeplugError(f"checkpoint {candidate.name} was written by the {runtime} runtime, whose optimizer "
                                    f"state this runtime cannot load; continue with --runtime {runtime} or pass --restart")
            problem = self._damage(candidate)
            if problem is None:
                return candidate, read_progress(candidate)
            problems.append(f"{candidate.name}: {problem}")
            self.echo(f"checkpoint {candidate.name} is damaged ({problem}); trying the one before it")
        if candidates:
            raise EdgeplugError(f"every checkpoint in {checkpoints_dir(self.artifact_dir)} is damaged ({'; '.join(problems)[:600]}); "
                                "pass --restart to train from the initial weights")
        return None, None

    def _damage(self, checkpoint: Path) -> str | None:
        """Why `checkpoint` cannot be resumed from (its progress or its runtime state does not load), or None."""
        try:
            progress = read_progress(checkpoint)
            if not all(isinstance(progress.get(key), int) and progress[key] >= 0 for key in ("epoch", "batch", "step")) \
                    or not isinstance(progress.get("history"), list):
                return f"{PROGRESS} lacks epoch, batch, step or history"
        except (OSError, ValueError, AttributeError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return f"{PROGRESS}: {type(error).__name__}"
        for number in range(len(self._folders)):
            path = state_file(checkpoint, number if self._staged else None)
            try:
                with _ort.captured_native_stderr():
                    self._api.CheckpointState.load_checkpoint(str(path))
            except Exception as error:  # noqa: BLE001 - onnxruntime raises RuntimeError/Fail for a bad file
                return f"{path.relative_to(checkpoint)} does not load: {' '.join(str(error).split())[-120:]}"
        return None

    def _note_unreproducible_random_ops(self) -> None:
        """Say so when the models draw random numbers whose generator state no checkpoint holds."""
        found: list[str] = []
        for folder in self._folders:
            with contextlib.suppress(Exception):
                model = onnx.load(str(folder / TRAINING_MODEL), load_external_data=False)
                found += [f"{node.op_type} (node '{node.name}')" for node in model.graph.node if node.op_type in UNSEEDED_RANDOM_OPS]
        if found:
            self.echo(f"note: {', '.join(found[:3])} draw random numbers from a generator that onnxruntime-training "
                      "neither reseeds per step nor checkpoints: this resumed run is not bit-identical to an "
                      "uninterrupted one (Dropout is)")

    def _start_prefix_cache(self, train_set: Dataset, epochs_left: int, batch_size: int) -> tuple[Dataset, dict[str, Any] | None]:
        """Cut the frozen prefix and cache its outputs for `train_set` (see `cache_prefix`); the dataset to train on."""
        if self._prefix is not None:
            self._prefix.close()
            self._prefix = None
        if self.cache_prefix is False:
            return train_set, None
        if self.cache_prefix is None and epochs_left < 2:
            return train_set, {"reason": "fewer than two epochs left to train"}
        kept = self._trimmed_share(train_set, batch_size) if self.cache_prefix is None else None
        if kept is not None and kept <= TRIM_OVER_CACHE_SHARE:
            return train_set, {"reason": f"trimming the padding keeps {kept:.0%} of the sequence positions of the first epoch's "
                                         "batches: cheaper than caching the frozen prefix, whose cached tensors have the padded length"}
        from edgeplug import prefix_cache

        try:
            # asked for explicitly (cache_prefix=True): cache even a prefix that does no real work
            cut = prefix_cache.cut_models(self.artifact_dir, self.report, require_compute=self.cache_prefix is None)
            # the folder's initial state: the prefix reads frozen parameters only, and the check compares
            # the cut and the whole model at the same weights
            _return_freed_buffers()  # the uncut session's buffers go back to the system before the cut one opens
            cache = prefix_cache.PrefixCache(cut, self.artifact_dir, self.artifact_dir / CHECKPOINT, self.cache_memory, self.cache_dir,
                                             threads=self.threads, memory=self.memory, dtype=self.cache_dtype)
            try:
                cached = cache.dataset(train_set)
            except BaseException:
                cache.close()
                raise
        except prefix_cache.NotCacheable as reason:
            if self.cache_prefix:
                raise EdgeplugError(f"cannot cache the frozen prefix: {reason}; train without --cache-prefix") from None
            return train_set, {"reason": str(reason)}
        self._prefix = cache
        self._module = None
        _return_freed_buffers()  # the fill's sessions are gone: their buffers go back before the cut model's session opens
        self._prefix_finalizer = weakref.finalize(self, cache.close)
        self.echo(f"frozen prefix cached ({cache.dtype}): {len(cut.boundary)} tensor(s), {cache.stats[-1].bytes_per_example / 1024:.1f} KiB per example, "
                  f"{cache.stats[-1].seconds:.2f} s")
        return cached, cache.stats[-1].to_dict()

    def _epoch_order(self, epoch: int, examples: int) -> np.ndarray:
        """The order an epoch feeds the training examples in: a function of (seed, epoch) only, so a resumed run repeats it."""
        return np.random.default_rng([self.seed, epoch]).permutation(examples)

    def _trimmed_share(self, train_set: Dataset, batch_size: int) -> float | None:
        """The share of the padded sequence positions that trimming would feed in the first epoch (its batches, in
        its order), or None when batches would not be trimmed (see `trim_padding`; the padded-vs-trimmed check
        comes later)."""
        if self.trim_padding is False or self._staged:
            return None
        axes = find_sequence_axes(self.input_specs)
        if axes is None or axes.mask not in train_set.inputs or not len(train_set):
            return None
        mask = np.asarray(train_set.inputs[axes.mask])
        order = self._epoch_order(0, len(train_set))
        size = max(1, batch_size)
        fed = sum(axes.length({axes.mask: mask[order[i:i + size]]}) * len(order[i:i + size]) for i in range(0, len(order), size))
        return fed / (len(order) * mask.shape[1]) if mask.ndim > 1 and mask.shape[1] else None

    def _epochs(self, train_set: Dataset, eval_set: Dataset | None, epochs: int, batch_size: int, steps_per_epoch: int,
                schedule: Callable[[int], float], progress: dict[str, Any], monitor: CollapseMonitor) -> list[float]:
        step_times: list[float] = []
        self._step_losses = []
        output_name = self.report["training"]["output"]
        self._set_mode(True)
        while progress["epoch"] < epochs:
            epoch = progress["epoch"]
            order = self._epoch_order(epoch, len(train_set))
            started = time.perf_counter()
            sums: dict[str, Any] = progress.setdefault("running", {"loss": 0.0, "correct": 0, "seen": 0})
            spread = OutputSpread()
            with Progress(f"epoch {epoch + 1}/{epochs}", total=steps_per_epoch, unit="step", show=self.progress) as bar:
                bar.advance(progress["batch"])
                while progress["batch"] < steps_per_epoch:
                    indices = order[progress["batch"] * batch_size : (progress["batch"] + 1) * batch_size]
                    batch = self._trimmed(train_set.batch(indices))
                    step = StepInfo(epoch, progress["step"], batch, self._module)
                    self._position = (epoch, progress["step"])
                    self.host.before_step(step)
                    for session in self._sessions:
                        session.optimizer.set_learning_rate(schedule(progress["step"]))
                    _ort.seed_random_ops(step_seed(self.seed, progress["step"]))  # dropout masks: f(seed, step) only
                    tick = time.perf_counter()
                    step.outputs = self._run(batch, step.extra_inputs, train=True)
                    step_times.append(time.perf_counter() - tick)
                    loss = float(_loss(step.outputs))
                    self._step_losses.append(loss)
                    if not np.isfinite(loss):
                        raise EdgeplugError(f"the loss became {loss} at step {progress['step']}; lower the learning rate (--lr)")
                    self.host.after_step(step, loss)
                    sums["loss"] += loss * len(indices)
                    sums["correct"] += _correct(step.outputs, batch["labels"], self.loss_kind, output_name)
                    if output_name in step.outputs:
                        spread.add(step.outputs[output_name])
                    sums["seen"] += len(indices)
                    progress["batch"] += 1
                    progress["step"] += 1
                    bar.advance(status=f"loss {loss:.4f}")
                    if self.checkpoint_every and progress["step"] % self.checkpoint_every == 0 and progress["batch"] < steps_per_epoch:
                        self._save(progress, train_set, batch_size)
            train_metrics = Metrics(sums["loss"] / sums["seen"], sums["correct"] / sums["seen"] if self.loss_kind == "cross-entropy" else None)
            eval_metrics = self._evaluate(eval_set, batch_size) if eval_set is not None else None
            seconds = time.perf_counter() - started
            progress["history"].append({
                "epoch": epoch + 1, "train": dataclasses.asdict(train_metrics),
                "eval": dataclasses.asdict(eval_metrics) if eval_metrics else None, "seconds": round(seconds, 3),
            })
            del progress["running"]
            progress["epoch"] += 1
            progress["batch"] = 0
            self.echo(f"epoch {epoch + 1}/{epochs}  {_metrics_text('train', train_metrics)}"
                      + (f"  {_metrics_text('eval', eval_metrics)}" if eval_metrics else "") + f"  ({seconds:.1f} s)")
            self._save(progress, train_set, batch_size)
            self.host.epoch_end(EpochResult(epoch + 1, train_metrics, eval_metrics, round(seconds, 3)), epochs, progress["step"], self.artifact_dir)
            message = monitor.epoch_end(epoch + 1, train_metrics.loss, train_metrics.accuracy,
                                        eval_metrics.accuracy if eval_metrics else None,
                                        spread.constant(), eval_set is not None and self._eval_spread.constant())
            if message:
                self.warn(message)
        return step_times

    def _collapse_monitor(self, train_set: Dataset, eval_set: Dataset | None, initial: Metrics | None) -> CollapseMonitor:
        num_classes = self._num_classes()
        return CollapseMonitor(
            num_classes if self.loss_kind == "cross-entropy" else None, train_set.labels,
            eval_set.labels if eval_set is not None else None, initial.accuracy if initial else None,
            lambda: likely_causes(self.recipe, self.report, self.lr, self._batch_norm_in_batch_mode),
        )

    def _batch_norm_in_batch_mode(self) -> bool:
        """Whether any training model normalises with batch statistics (onnxruntime's BatchNormInternal)."""
        for folder in self._folders:
            model = onnx.load(str(folder / TRAINING_MODEL), load_external_data=False)
            if any(node.op_type == "BatchNormInternal" for node in model.graph.node):
                return True
        return False

    def _save(self, progress: dict[str, Any], train_set: Dataset, batch_size: int) -> None:
        if not self.checkpoints:
            return
        record = {**progress, "num_samples": len(train_set), "batch_size": batch_size, "seed": self.seed, "runtime": "python"}
        api = self._api

        def save_state(path: Path) -> None:
            save_carried_state(path.parent, [session.carried for session in self._sessions])
            if not self._staged:
                api.CheckpointState.save_checkpoint(self._state, str(path), include_optimizer_state=True)
                return
            path.mkdir()  # staged: one onnxruntime checkpoint per stage, state/<i>
            for number, session in enumerate(self._sessions):
                api.CheckpointState.save_checkpoint(session.state, str(state_file(path.parent, number)),
                                                    include_optimizer_state=True)

        write_checkpoint(self.artifact_dir, progress["step"], record, save_state, lambda d: self.host.save_state(d), self.keep_checkpoints)

    @contextlib.contextmanager
    def _runtime_hooks_active(self) -> Iterator[None]:
        """Register the passes' runtime hooks (once), restoring their state from the open checkpoint."""
        if self._hooks_active:
            yield
            return
        hooks = self._register_runtime_hooks()
        self._hooks_active = True
        try:
            if self._checkpoint is not None:
                self.host.load_state(self._checkpoint / HOOKS)
            yield
        finally:
            self._hooks_active = False
            for hook in hooks:
                self.host.unregister(hook)

    def _register_runtime_hooks(self) -> list[object]:
        registered = []
        for entry in self.report["passes"]:
            if not entry.get("runtime_hooks"):
                continue
            info = self.host.get_pass(entry["name"])
            options: dict[str, Any] = next(
                (p.get("options", {}) for p in self.recipe.get("passes", []) if p["name"] == entry["name"]), {}
            )
            instance = info.factory(fill_defaults(options, info.factory.options_schema))
            hook = instance.runtime_hooks(RuntimeContext(self.artifact_dir, self.artifact_dir / "passes" / entry["name"]))
            if hook is not None:
                self.host.register(hook, name=f"runtime:{entry['name']}:{id(hook)}", version=info.version,
                                   described_as=f"the runtime hooks of pass '{entry['name']}' (plugin '{info.plugin}' {info.version})")
                registered.append(hook)
        return registered


TRIM_OVER_CACHE_SHARE = 0.5
"""Default mode: when trimming would keep at most this share of the padded positions, batches are trimmed and the
frozen prefix is not cached (the cache holds padded-length tensors, so the cut model runs at the padded length). On
MiniLM-L6 with LoRA on the last 2 of 6 blocks and TREC-like questions padded to 64 tokens (45% kept), trimmed steps
took 275-290 ms against 371-422 ms cached; BBC articles fill all 128 tokens, and the cache made steps 1.3-1.9x faster."""


def session_options(threads: int | None, memory: str = DEFAULT_MEMORY) -> Any:
    """Session options for a training module: pinned pools (threads None: onnxruntime's defaults) and the
    memory setting's switches (edgeplug.memory_settings). Without the allocation planner's buffer reuse
    ("compact", "lean") a buffer freed in forward is not held for a same-sized tensor created much later (a
    gradient in backward), which hid activation-shortcut's saving entirely; "lean" also turns the CPU arena off
    and fixes glibc's mmap threshold, so freed tensors go back to the system at once. Returns None when nothing
    differs from onnxruntime's defaults."""
    wanted = switches(memory)
    if threads is None and wanted.cpu_mem_arena and wanted.mem_reuse:
        return None
    options = _ort.inference_runtime().SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not wanted.cpu_mem_arena:
        _return_freed_buffers()
        options.enable_cpu_mem_arena = False
    options.enable_mem_reuse = wanted.mem_reuse
    return options


def open_stage(folder: Path, state: Path | None = None, *, threads: int | None = None, memory: str = DEFAULT_MEMORY) -> tuple[Any, Any, Any]:
    """Open one stage of a staged folder (checkpoint state, module, optimizer): no memory arena, no spinning.

    Each session's arena would keep its stage's peak for good, so N stages would hold
    about what backpropagation through the whole model needs; without arenas a
    stage's buffers are freed before the next stage runs. Spinning thread pools of
    the idle stages made a sweep 5x slower on 2 cores. The planner's buffer reuse stays
    on except under "lean" (with the arena already off, "compact" changes nothing else here).
    """
    _return_freed_buffers()
    options = _ort.inference_runtime().SessionOptions()
    options.enable_cpu_mem_arena = False
    # idle stages must not spin: N sessions' thread pools would busy-wait against the running stage
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if memory == LEAN:
        options.enable_mem_reuse = False
    return _ort.open_artifacts(folder, state, session_options=options)


@functools.cache
def _return_freed_buffers() -> None:
    """Fix glibc's mmap threshold (M_MMAP_THRESHOLD = -3) at 128 KiB for this process.

    glibc raises the threshold after each large free, so the next stage's buffers come
    from the heap and stay resident once freed; fixed, large buffers are mapped and
    unmapped, and memory goes back to the system between stages. No-op off glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)


UNSEEDED_RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli",
                                 "Multinomial"})
"""Ops whose kernels seed their own generator once, when the session opens: not reproducible across a resume."""


def step_seed(seed: int, step: int) -> int:
    """The runtime's random seed for training step `step` of a run seeded `seed` (63 bits, well spread).

    onnxruntime-training's Dropout draws from one process-wide generator; reseeding it
    before every step makes each step's masks a function of (seed, step) alone, so a
    resumed run draws exactly the masks an uninterrupted one would.
    """
    return int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def peak_rss_bytes() -> int:
    """This process's peak resident memory.

    Linux's VmHWM, because ru_maxrss survives exec and would report the peak of
    whatever process started this one.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _loss(outputs: Mapping[str, np.ndarray]) -> float:
    return float(next(iter(outputs.values())))


def _correct(outputs: Mapping[str, np.ndarray], labels: np.ndarray, loss: str, output_name: str) -> int:
    if loss != "cross-entropy" or output_name not in outputs:
        return 0
    logits = outputs[output_name]
    return int((logits.reshape(len(labels), -1).argmax(axis=1) == labels).sum())


def _log_line(text: str) -> None:
    log.info("%s", text)


def _metrics_text(prefix: str, metrics: Metrics) -> str:
    text = f"{prefix}_loss {metrics.loss:.4f}"
    return text + (f"  {prefix}_acc {metrics.accuracy:.3f}" if metrics.accuracy is not None else "")
