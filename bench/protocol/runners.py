"""What runs inside the fresh processes: per episode `prepare_episode`, then one `train_*` per row.

`prepare_episode` (one process per episode) gives the episode its head with the `new-head`
pass (prototypes from the training shots), scores that head untrained, rewrites every recipe
row with `new-head` (same options, same shots: the same head) as its first pass, checks that
each row's head equals the episode's head, and builds the hand-made artifacts from the
exported head model (`headed.onnx`, where the manual and PyTorch rows start). Rewrite times
are recorded (a pass that reads the support set runs on the device).

Each `train_*` (one fresh process per row and episode) trains its row once per learning
rate of the grid from the same initial weights, on the training shots; validation shots
choose the learning rate; the query accuracy of the chosen one is the row's result. Memory
is measured on the first candidate (the fresh process): `probe.ready()` once the model,
the sessions (or module and optimizer) and the data are loaded, before step 1;
`probe.finish()` after its last step. Every runtime uses the same sample order
(numpy seed (seed, epoch) permutation, as `edgeplug.Trainer`), batch size, epochs and lr schedule.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import math
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bench.protocol.lr_search import Candidate, choose_lr
from bench.protocol.ort_rows import ready_hook

HEADED = "headed.onnx"


def _arrays(path: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """An episode split: the model inputs by name, in the file's order (`x` for single-input families;
    `input_ids`, `attention_mask` for text), and the labels `y`."""
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files if key != "y"}, archive["y"].astype(np.int64)


def _take(inputs: Mapping[str, Any], rows: Any) -> list[Any]:
    return [array[rows] for array in inputs.values()]


def _ordered(inputs: dict[str, Any], names: Any) -> dict[str, Any]:
    """`inputs` in the order of the model's input `names` when every one of them is there (else as stored)."""
    wanted = [name for name in names if name in inputs]
    return {name: inputs[name] for name in wanted} if len(wanted) == len(inputs) else inputs


def _finish(candidates: list[Candidate], memory: dict[str, Any] | None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    choice = choose_lr(candidates)
    steps = [c.extra["median_step_seconds"] for c in candidates if c.extra.get("median_step_seconds")]
    return {"accuracy": choice.chosen.query_accuracy, "loss": choice.chosen.query_loss, "lr": choice.lr,
            "lr_choice": choice.to_dict(), "memory": memory,
            "median_step_seconds": statistics.median(steps) if steps else None,
            "first_median_step_seconds": candidates[0].extra.get("median_step_seconds"),
            "fit_seconds": candidates[0].extra.get("fit_seconds"), "prefix_cache": candidates[0].extra.get("prefix_cache"),
            "steps": candidates[0].extra.get("steps"), **(extra or {})}


def _chunk_correct(correct: np.ndarray, chunk: int) -> list[int]:
    """Correct predictions per consecutive chunk of `chunk` examples (the last chunk may be shorter): the unit a
    paired interval over test examples resamples when a runtime reports accuracy per batch, not per example."""
    return [int(correct[i:i + chunk].sum()) for i in range(0, len(correct), chunk)]


def _record_chunks(details: dict[str, Any], lr: float, counts: list[int]) -> None:
    """Keeps every scored candidate's per-chunk counts by lr (with `query_all` every candidate is scored on the query set)."""
    details.setdefault("query_chunk_correct_by_lr", {})[repr(float(lr))] = counts


def _with_chunks(result: dict[str, Any], details: dict[str, Any]) -> dict[str, Any]:
    """The row's record with the CHOSEN candidate's per-chunk counts as `query_chunk_correct` (not the last scored one's)."""
    by_lr = details.get("query_chunk_correct_by_lr")
    if not by_lr:
        return result
    chosen = by_lr.get(repr(float(result["lr"]))) if result.get("lr") is not None else None
    return {**result, **({"query_chunk_correct": chosen} if chosen is not None else {}), "query_chunk_correct_by_lr": by_lr}


# -- per episode ------------------------------------------------------------------------------

def prepare_episode(job: dict[str, Any], context: Any) -> dict[str, Any]:
    """Head, untrained score, every row's artifacts. job: model, folder, data{train,validation,query},
    classes, head_options, rows[{name, kind, recipe, calibration, biases}], batch_size, profile."""
    import edgeplug
    from edgeplug.pipeline import rewrite
    from edgeplug.recipe import recipe_from_dict

    folder = Path(job["folder"])
    x, y = _arrays(job["data"]["train"])
    calibration = {**x, "y": y}
    started = time.perf_counter()
    new_head = {"name": "new-head", "options": {"classes": job["classes"], **job.get("head_options", {})}}
    head_recipe = {"loss": "cross-entropy", "optimizer": {"name": "adamw"},
                   "passes": [new_head, {"name": "trainable", "options": {"layers": "classifier"}}]}
    rewrite(job["model"], recipe_from_dict(head_recipe, source="bench head"), folder / "head", force=True, calibration=calibration)
    headed = folder / HEADED
    edgeplug.export(folder / "head", headed)
    head_seconds = time.perf_counter() - started
    head = _score_onnx(headed, job["data"], threads=context.pinning.threads)
    head_weights = _classifier(headed)
    out: dict[str, Any] = {"head": {**head, "seconds": head_seconds}, "rows": {}}
    for row in job["rows"]:
        target = folder / row["name"]
        started = time.perf_counter()
        entry: dict[str, Any] = {}
        try:
            if row["kind"] == "recipe":
                recipe = dict(row["recipe"])
                if row.get("biases"):
                    recipe = _with_biases(recipe, headed)
                recipe["passes"] = [new_head, *recipe.get("passes", [])]
                report = rewrite(job["model"], recipe_from_dict(recipe, source=row["name"]), target, force=True,
                                 calibration=calibration).report
                entry["trainable_values"] = report["parameters"]["trainable_values"]
                entry["head_difference"] = _head_difference(target, head_weights)
                if entry["head_difference"] is not None and entry["head_difference"] > 1e-5:
                    raise RuntimeError(f"the row's new-head differs from the episode's head by {entry['head_difference']:.2e}")
                entry["passes"] = [{"name": p["name"], "summary": p.get("summary")} for p in report["passes"]]
            elif row["kind"] == "manual":
                entry["trainable_values"] = build_manual_artifacts(headed, target)
            entry["rewrite_seconds"] = time.perf_counter() - started
            if job.get("profile") and row["kind"] in ("recipe", "manual"):
                entry["static"] = _static_profile(target, job["batch_size"], x)
        except Exception as error:  # a pass that refuses this model/episode: recorded, the row is skipped here
            entry = {"error": f"{type(error).__name__}: {' '.join(str(error).split())[:500]}"}
        out["rows"][row["name"]] = entry
    return out


def _score_onnx(model: Path, data: Mapping[str, str], *, threads: int) -> dict[str, Any]:
    """Accuracy and mean cross-entropy of an inference model on the validation and query sets."""
    from edgeplug import _ort

    runtime = _ort.inference_runtime()
    options = runtime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = runtime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    names = [value.name for value in session.get_inputs()]
    out = {}
    for split in ("validation", "query"):
        x, y = _arrays(data[split])
        logits = np.concatenate([session.run(None, dict(zip(names, _take(x, slice(i, i + 64)), strict=True)))[0]
                                 for i in range(0, len(y), 64)])
        out[f"{split}_accuracy"] = float((logits.argmax(1) == y).mean())
        out[f"{split}_loss"] = _cross_entropy(logits, y)
    return out


def _classifier(model: Path) -> tuple[np.ndarray, ...]:
    """The last Gemm's weight and bias (what new-head wrote)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(model))
    values = {t.name: t for t in proto.graph.initializer}
    gemm = [n for n in proto.graph.node if n.op_type == "Gemm"][-1]
    return tuple(numpy_helper.to_array(values[name]) for name in gemm.input[1:3])


def _head_difference(folder: Path, head: tuple[np.ndarray, ...]) -> float | None:
    """Max abs difference between a rewritten row's initial classifier and the episode's head (None: not readable)."""
    try:
        mine = _classifier(folder / "forward_model.onnx")
    except (OSError, IndexError, KeyError):
        return None
    if [a.shape for a in mine] != [b.shape for b in head]:
        return float("inf")
    return float(max(np.abs(a - b).max() for a, b in zip(mine, head, strict=True)))


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def _with_biases(recipe: dict[str, Any], model: Path) -> dict[str, Any]:
    """TinyTL-style rows: every Conv/Gemm bias, every BatchNormalization scale and shift, and the classifier's
    weight join `trainable`'s include."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    parameters = {t.name for t in proto.graph.initializer}
    layers = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "ConvTranspose")]
    names = [n.input[2] for n in layers if len(n.input) > 2 and n.input[2] in parameters]
    names += [name for n in proto.graph.node if n.op_type == "BatchNormalization" for name in n.input[1:3] if name in parameters]
    classifier = layers[-1].input[1]
    passes = [dict(p) for p in recipe.get("passes", [])]
    entry = next((p for p in passes if p["name"] == "trainable"), None)
    if entry is None:
        entry = {"name": "trainable", "options": {}}
        passes.insert(0, entry)
    options = dict(entry.get("options", {}))
    options["include"] = sorted({*options.get("include", []), *names, classifier})
    options.setdefault("layers", "none")
    entry["options"] = options
    return {**recipe, "passes": passes}


def _static_profile(folder: Path, batch_size: int, inputs: Mapping[str, np.ndarray]) -> dict[str, Any] | None:
    """Counted at the episode's training batch; a dynamic axis besides the batch (a text model's sequence) at the
    width the training arrays have (padded: what rows that feed whole arrays train at)."""
    try:
        from edgeplug.artifacts import read_report
        from edgeplug.data import TensorSpec
        from edgeplug.profiling import static_profile
        from edgeplug.sequences import axis_lengths

        specs = [TensorSpec(i["name"], i["dtype"], i["shape"]) for i in read_report(folder)["training"]["inputs"]]
        profile = static_profile(folder, batch_size=batch_size, dims=axis_lengths(specs, inputs)).to_dict()
    except Exception as error:  # the profiler may not read every pass's folder
        return {"error": f"{type(error).__name__}: {error}"}
    return {key: profile.get(key) for key in ("retained_activation_bytes", "total_training_bytes", "parameter_bytes",
                                               "gradient_bytes", "optimizer_state_bytes", "backward_macs", "forward_macs")}


def build_manual_artifacts(model: Path, folder: Path) -> int:
    """Full fine-tune artifacts straight from onnxruntime.training.artifacts (AdamW, cross-entropy)."""
    import onnx

    from edgeplug import _ort

    artifacts = _ort.training_artifacts()
    proto = onnx.load(str(model))
    parameters = [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 0]
    frozen = [t.name for t in proto.graph.initializer if t.name not in set(parameters)]
    folder.mkdir(parents=True, exist_ok=True)
    output = proto.graph.output[0].name
    artifacts.generate_artifacts(proto, requires_grad=parameters, frozen_params=frozen, loss=artifacts.LossType.CrossEntropyLoss,
                                 optimizer=artifacts.OptimType.AdamW, artifact_directory=str(folder),
                                 additional_output_names=[output])
    return int(sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.name in set(parameters)))


# -- rows ---------------------------------------------------------------------------------------

def _epochs_loop(n: int, job: Mapping[str, Any], step: Callable[[np.ndarray, int], float]) -> tuple[list[float], float]:
    """Trainer's loop: epoch e visits a numpy (seed, e) permutation in batches. Returns the step times and
    the last epoch's mean loss weighted by batch size (what `Trainer.fit` reports as the train loss)."""
    batch, times, number, epoch_loss = job["batch_size"], [], 0, math.nan
    for epoch in range(job["epochs"]):
        order = np.random.default_rng([job["seed"], epoch]).permutation(n)
        total = 0.0
        for start in range(0, n, batch):
            indices = order[start:start + batch]
            tick = time.perf_counter()
            loss = step(indices, number)
            times.append(time.perf_counter() - tick)
            total += loss * len(indices)
            number += 1
            if not math.isfinite(loss):
                return times, math.nan
        epoch_loss = total / n
    return times, epoch_loss


def _train_steps(n: int, job: Mapping[str, Any], step: Callable[[np.ndarray, int], float], context: Any | None,
                 started: float) -> dict[str, Any]:
    """Runs `_epochs_loop`, closes the memory probe's window after the first candidate (`context` given), and
    returns the fit's figures for the row: median step, steps, train loss, seconds since `started`."""
    times, train_loss = _epochs_loop(n, job, step)
    if context is not None:
        context.probe.finish_once()
    return {"median_step_seconds": statistics.median(times), "steps": len(times), "train_loss": train_loss,
            "fit_seconds": time.perf_counter() - started}


Evaluator = Callable[[str], tuple[float, float]]
"""split name ("validation" or "query") -> (accuracy, mean cross-entropy) of a trained candidate."""


def _grid(job: Mapping[str, Any], train_one: Callable[[float, bool], tuple[dict[str, Any], Evaluator | None]],
          memory: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
    """Train every lr of the grid (`train_one(lr, first)` -> (record, evaluator or None if it diverged)),
    choose on the validation shots, score only the chosen candidate on the query set (every candidate
    with job["query_all"], for the record)."""
    candidates: list[Candidate] = []
    best: tuple[Candidate, Evaluator] | None = None
    measured = None
    for number, lr in enumerate(job["grid"]):
        extra, evaluate = train_one(float(lr), number == 0)
        if number == 0:
            measured = memory()
        if evaluate is None:
            candidates.append(Candidate(lr, math.nan, math.nan, None, None, extra))
            continue
        candidate = Candidate(lr, *evaluate("validation"), None, None, extra)
        if job.get("query_all"):
            candidate = dataclasses.replace(candidate, **dict(zip(("query_accuracy", "query_loss"), evaluate("query"), strict=True)))
        candidates.append(candidate)
        if best is None or choose_lr([best[0], candidate]).chosen is candidate:
            best = (candidate, evaluate)
        gc.collect()
    if best is not None and best[0].query_accuracy is None:
        scored = dataclasses.replace(best[0], **dict(zip(("query_accuracy", "query_loss"), best[1]("query"), strict=True)))
        candidates = [scored if c is best[0] else c for c in candidates]
    return _finish(candidates, measured)


def train_recipe(job: dict[str, Any], context: Any) -> dict[str, Any]:
    """A recipe row: its edgeplug artifact folder trained by `edgeplug.Trainer`."""
    from edgeplug.data import Dataset
    from edgeplug.errors import EdgeplugError
    from edgeplug.trainer import Trainer

    def train_one(lr: float, first: bool) -> tuple[dict[str, Any], Evaluator | None]:
        if first:
            context.probe.loading()
        trainer = Trainer(job["artifacts"], seed=job["seed"], lr=lr, checkpoints=False, progress=False, threads=context.pinning.threads)
        hook = ready_hook(context.probe) if first else None
        if hook is not None:
            trainer.host.register(hook, name="bench-ready")
        train = trainer.dataset(job["train"])
        started = time.perf_counter()
        try:
            fit = trainer.fit(train, epochs=job["epochs"], batch_size=job["batch_size"], resume=False)
        except EdgeplugError as error:
            if "loss became" not in str(error):
                raise  # a broken row, not a diverged learning rate: the row fails for this episode
            return {"error": str(error)}, None
        finally:
            if hook is not None:
                context.probe.finish_once()
                trainer.host.unregister(hook)
        extra = {"median_step_seconds": fit.median_step_seconds, "steps": fit.steps_run, "train_loss": fit.epochs[-1].train.loss,
                 "fit_seconds": time.perf_counter() - started, "prefix_cache": getattr(fit, "prefix_cache", None)}

        def evaluate(split: str) -> tuple[float, float]:
            data = trainer.dataset(job[split])
            if split == "query" and job.get("query_chunk"):  # per-chunk counts for a paired interval over test examples
                chunk = int(job["query_chunk"])
                counts, loss = [], 0.0
                for i in range(0, len(data), chunk):
                    part = Dataset({k: v[i:i + chunk] for k, v in data.inputs.items()}, data.labels[i:i + chunk], data.source)
                    metrics = trainer.evaluate(part, batch_size=chunk)
                    counts.append(round(float(metrics.accuracy or 0.0) * len(part)))
                    loss += float(metrics.loss) * len(part)
                _record_chunks(details, lr, counts)
                return sum(counts) / len(data), loss / len(data)
            metrics = trainer.evaluate(data)
            return float(metrics.accuracy or 0.0), float(metrics.loss)

        return extra, evaluate

    details: dict[str, Any] = {}
    return _with_chunks(_grid(job, train_one, context.probe.result), details)


def train_manual(job: dict[str, Any], context: Any) -> dict[str, Any]:
    """The hand-built artifacts, trained with onnxruntime.training.api alone."""
    from edgeplug import _ort
    from edgeplug.schedules import make_schedule

    api = _ort.training_api()
    folder = Path(job["artifacts"])
    x, y = _arrays(job["train"])
    evaluation = {split: _arrays(job[split]) for split in ("validation", "query")}

    def train_one(lr: float, first: bool) -> tuple[dict[str, Any], Evaluator | None]:
        started = time.perf_counter()  # like Trainer.fit: opening the sessions counts
        if first:
            context.probe.loading()
        state = api.CheckpointState.load_checkpoint(str(folder / "checkpoint"))
        module = api.Module(str(folder / "training_model.onnx"), state, str(folder / "eval_model.onnx"),
                            session_options=context.pinning.ort_session_options())
        optimizer = api.Optimizer(str(folder / "optimizer_model.onnx"), module)
        nonlocal x, evaluation
        x = _ordered(x, module.input_names())
        evaluation = {split: (_ordered(inputs, module.input_names()), labels) for split, (inputs, labels) in evaluation.items()}
        schedule = make_schedule(lr, job.get("schedule"), job["epochs"] * -(-len(y) // job["batch_size"]))
        module.train()
        if first:
            context.probe.ready()

        def step(indices: np.ndarray, count: int) -> float:
            optimizer.set_learning_rate(schedule(count))
            loss = float(module(*_take(x, indices), y[indices])[0])
            optimizer.step()
            module.lazy_reset_grad()
            return loss

        extra = _train_steps(len(y), job, step, context if first else None, started)
        if not math.isfinite(extra["train_loss"]):
            return extra, None

        def evaluate(split: str) -> tuple[float, float]:
            ex, ey = evaluation[split]
            module.eval()
            logits = np.concatenate([module(*_take(ex, slice(i, i + 64)), ey[i:i + 64])[1] for i in range(0, len(ey), 64)])
            if split == "query" and job.get("query_chunk"):
                _record_chunks(details, lr, _chunk_correct(logits.argmax(1) == ey, int(job["query_chunk"])))
            return float((logits.argmax(1) == ey).mean()), _cross_entropy(logits, ey)

        return extra, evaluate

    details: dict[str, Any] = {}
    return _with_chunks(_grid(job, train_one, context.probe.result), details)


def train_torch(job: dict[str, Any], context: Any) -> dict[str, Any]:
    """PyTorch eager full fine-tune: the family's builder gives the same net with the episode's head."""
    import copy

    import torch

    from edgeplug.schedules import make_schedule

    context.pinning.pin_torch()
    arrays, labels = _arrays(job["train"])
    x, y = {k: torch.from_numpy(a) for k, a in arrays.items()}, torch.from_numpy(labels)
    context.probe.loading()
    module_name, _, function = job["builder"].partition(":")
    model = getattr(importlib.import_module(module_name), function)(Path(job["headed"]), **job.get("builder_args", {}))
    initial = copy.deepcopy(model.state_dict())
    evaluation = {}
    for split in ("validation", "query"):
        split_inputs, split_labels = _arrays(job[split])
        evaluation[split] = ({k: torch.from_numpy(a) for k, a in split_inputs.items()}, torch.from_numpy(split_labels))
    loss_fn = torch.nn.CrossEntropyLoss()

    def train_one(lr: float, first: bool) -> tuple[dict[str, Any], Evaluator | None]:
        started = time.perf_counter()
        model.load_state_dict(initial)
        model.eval()  # the ONNX rows train the eval-mode export: no dropout, folded BN
        parameters = [p for p in model.parameters() if p.requires_grad]
        # onnxruntime-training's AdamW: betas 0.9/0.999, eps 1e-6, no weight decay, bias correction
        optimizer = torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
        schedule = make_schedule(lr, job.get("schedule"), job["epochs"] * -(-len(y) // job["batch_size"]))
        if first:
            context.probe.ready()

        def step(indices: np.ndarray, count: int) -> float:
            for group in optimizer.param_groups:
                group["lr"] = schedule(count)
            index = torch.from_numpy(indices)
            loss = loss_fn(model(*_take(x, index)), y[index])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.item())

        extra = _train_steps(len(y), job, step, context if first else None, started)
        if not math.isfinite(extra["train_loss"]):
            return extra, None
        trained = copy.deepcopy(model.state_dict())

        def evaluate(split: str) -> tuple[float, float]:
            model.load_state_dict(trained)
            ex, ey = evaluation[split]
            with torch.no_grad():
                logits = torch.cat([model(*_take(ex, slice(i, i + 64))) for i in range(0, len(ey), 64)]).numpy()
            return float((logits.argmax(1) == ey.numpy()).mean()), _cross_entropy(logits, ey.numpy())

        return extra, evaluate

    return _grid(job, train_one, context.probe.result)


def verify_torch(job: dict[str, Any], context: Any) -> dict[str, Any]:
    """Max abs difference between the torch builder's logits and the headed ONNX model's."""
    import torch

    from edgeplug import _ort

    module_name, _, function = job["builder"].partition(":")
    model = getattr(importlib.import_module(module_name), function)(Path(job["headed"]), **job.get("builder_args", {}))
    x, _ = _arrays(job["query"])
    first = _take(x, slice(0, 8))
    with torch.no_grad():
        expected = model(*(torch.from_numpy(a) for a in first)).numpy()
    session = _ort.inference_runtime().InferenceSession(job["headed"], providers=["CPUExecutionProvider"])
    got = session.run(None, dict(zip([v.name for v in session.get_inputs()], first, strict=True)))[0]
    return {"max_abs_diff": float(np.abs(got - expected).max())}


TARGETS = {"recipe": "bench.protocol.runners:train_recipe", "manual": "bench.protocol.runners:train_manual",
           "torch": "bench.protocol.runners:train_torch"}
