"""The fast domain adaptor in the cloud: train the generator over source domains, run it per device.

Training (onnxruntime-training, no torch): each step takes one source domain, a
summary of anchors drawn from an unlabelled device-sized sample of it (computed
exactly as `edgeplug personalize anchors` does, 8-bit packing included), and a
labelled batch of the same domain; the loss is the frozen device model's
cross-entropy with the generated slot values, and only the generator trains.
Personalising a device is then one forward pass of the generator.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeplug.plugin_api import (
    DataError,
    ModelError,
    OutputError,
    atomic_directory,
    captured_native_stderr,
    first_error,
    inference_runtime,
    load_schema,
    open_artifacts,
    training_artifacts,
)

from . import anchors as anchor_ops
from . import baselines
from .device import DeviceModel, accuracy
from .generator_graph import (
    SUMMARY,
    initial_parameters,
    joined_model,
    layout_for,
    standalone_model,
)
from .manifest import Manifest
from .options import GeneratorOptions

GENERATOR_MODEL = "generator.onnx"
GENERATOR_INFO = "generator.json"
FORMAT = "edgeplug-personalize-generator"


@dataclasses.dataclass
class Domains:
    """Labelled source data: samples, labels and the domain each sample comes from."""

    x: np.ndarray
    y: np.ndarray
    domain: np.ndarray

    def ids(self) -> list[int]:
        return sorted(int(d) for d in np.unique(self.domain))

    def of(self, domain: int) -> tuple[np.ndarray, np.ndarray]:
        members = self.domain == domain
        return self.x[members], self.y[members]


def load_domains(arrays: Mapping[str, np.ndarray], device: DeviceModel, label: str) -> Domains:
    """x (or the model input's name), y and domain from an .npz; at least two domains."""
    x = device.inputs(arrays, label)
    for key in ("y", "domain"):
        if key not in arrays:
            raise DataError(f"{label}: no '{key}' array (arrays: {', '.join(sorted(arrays))}); source domains need "
                            "x, y (class indices) and domain (an integer id per sample)")
    y, domain = np.asarray(arrays["y"]), np.asarray(arrays["domain"])
    if y.shape != (len(x),) or domain.shape != (len(x),) or y.dtype.kind not in "iu" or domain.dtype.kind not in "iu":
        raise DataError(f"{label}: y and domain must be integer arrays with one entry per sample ({len(x)})")
    if len(np.unique(domain)) < 2:
        raise DataError(f"{label}: holds {len(np.unique(domain))} domain; the generator needs several source domains")
    return Domains(x, y.astype(np.int64), domain.astype(np.int64))


@dataclasses.dataclass(frozen=True)
class DeviceSide:
    """What the device computes forward-only from its samples: statistics it keeps, anchors it uploads."""

    statistics: dict[str, np.ndarray]
    packed: anchor_ops.Packed

    @property
    def summary(self) -> np.ndarray:
        return anchor_ops.summary(self.packed)


def device_side(device: DeviceModel, x: np.ndarray, count: int, method: str, seed: int, *, statistics: bool) -> DeviceSide:
    """Re-estimate the statistics (if asked), then features under them, anchors and 8-bit packing."""
    stats = baselines.statistics(device, x) if statistics else {}
    features = device.features(x, stats)
    chosen, weights = anchor_ops.select(features, count, method, seed)
    return DeviceSide(stats, anchor_ops.pack(features[chosen], weights))


def uses_device_statistics(manifest: Manifest, requested: bool) -> bool:
    return requested and any(slot.role == "statistics" for slot in manifest.slots)


def train_generator(artifacts: str | Path, domains: Domains, output: str | Path, options: GeneratorOptions, *,
                    force: bool = False, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the generator for the artifact folder's device model; write OUTPUT/generator.{onnx,json}."""
    started = time.perf_counter()
    say = echo or (lambda _text: None)
    if Path(output).exists() and not force:  # refuse before minutes of training, not after
        raise OutputError(f"{output} already exists; to replace it pass --force (force=True in Python)")
    device = DeviceModel(artifacts)
    manifest = device.manifest
    if not manifest.parameter_slots():
        raise ModelError("the device model has no parameter slots to generate; add slots to the personalize pass")
    rng = np.random.default_rng(options.seed)
    ids = domains.ids()
    order = rng.permutation(ids).tolist()
    held = max(1, round(len(ids) * options.validation_domains)) if options.validation_domains > 0 and len(ids) >= 5 else 0
    validation, training = order[:held], order[held:]
    say(f"source domains: {len(training)} for training, {len(validation)} held out for validation")
    statistics = uses_device_statistics(manifest, options.device_statistics)
    draws: dict[int, list[DeviceSide]] = {}
    for d in ids:
        x, _ = domains.of(d)
        draws[d] = []
        for draw in range(options.draws):
            picked = rng.choice(len(x), size=min(options.device_samples, len(x)), replace=False)
            draws[d].append(device_side(device, x[picked], options.count, options.method, options.seed + draw, statistics=statistics))
    defaults = device.defaults()
    layout = layout_for(manifest, defaults, np.array([s.summary for d in training for s in draws[d]]), options.hidden)
    parameters = initial_parameters(layout, options.seed)
    say(f"generator: summary {len(layout.summary_mean)} -> {options.hidden} -> {options.hidden} -> {layout.width} slot values; "
        f"{sum(v.size for v in parameters.values()):,} parameters")

    def evaluate(values: Mapping[str, np.ndarray]) -> float | None:
        if not validation:
            return None
        model = standalone_model(layout, defaults, values)
        session = inference_runtime().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        scores = []
        for d in validation:
            x, y = domains.of(d)
            side = draws[d][0]
            slots = dict(zip([s.name for s in layout.slots], session.run(None, {SUMMARY: side.summary[None]})))
            scores.append(accuracy(device.logits(x, {**side.statistics, **slots}), y))
        return float(np.mean(scores))

    history: list[dict[str, Any]] = []
    untrained = evaluate(parameters)  # zero output layer: the model's own values (or the device statistics alone)
    best = (untrained, 0, dict(parameters))
    with tempfile.TemporaryDirectory(prefix="edgeplug-generator-") as folder:
        module, optimizer, state = _training_session(joined_model(onnx.load(str(device.path)), manifest, layout, defaults, parameters,
                                                                  device_statistics=statistics),
                                                     list(parameters), Path(folder))
        names = list(module.input_names())
        every = max(1, options.steps // max(options.evaluations, 1))
        losses: list[float] = []
        queue: list[int] = []
        module.train()
        for step in range(options.steps):
            if not queue:
                queue = rng.permutation(training).tolist()
            d = queue.pop()
            x, y = domains.of(d)
            batch = rng.choice(len(x), size=min(options.batch_size, len(x)), replace=False)
            side = draws[d][int(rng.integers(options.draws))]
            feeds = {manifest.input: x[batch], SUMMARY: side.summary[None], "labels": y[batch], **side.statistics}
            optimizer.set_learning_rate(options.lr * 0.5 * (1 + math.cos(math.pi * step / options.steps)))
            loss = module(*[feeds[name] for name in names])
            optimizer.step()
            module.lazy_reset_grad()
            losses.append(float(np.asarray(loss)))
            if (step + 1) % every == 0 or step + 1 == options.steps:
                current = {name: np.array(state.parameters[name].data) for name in parameters}
                score = evaluate(current)
                history.append({"step": step + 1, "train_loss": float(np.mean(losses[-every:])), "validation_accuracy": score})
                say(f"step {step + 1}: train loss {history[-1]['train_loss']:.4f}"
                    + (f", validation accuracy {score:.4f}" if score is not None else ""))
                if score is None or best[0] is None or score > best[0]:
                    best = (score, step + 1, current)
    info = {
        "format": FORMAT, "format_version": 1, "model_fingerprint": manifest.fingerprint,
        "summary_width": int(len(layout.summary_mean)), "device_statistics": statistics,
        "anchors": {"count": options.count, "method": options.method, "device_samples": options.device_samples},
        "slots": [s.name for s in layout.slots],
        "training": {"domains": len(training), "validation_domains": len(validation), "options": dataclasses.asdict(options),
                     "best_step": best[1], "validation_accuracy": best[0], "validation_accuracy_untrained": untrained,
                     "history": history, "seconds": round(time.perf_counter() - started, 3)},
    }
    model = standalone_model(layout, defaults, best[2])
    with atomic_directory(Path(output), overwrite=force) as stage:
        (stage / GENERATOR_MODEL).write_bytes(model.SerializeToString())
        (stage / GENERATOR_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def _training_session(model: onnx.ModelProto, trainable: list[str], folder: Path) -> tuple[Any, Any, Any]:
    """Training artifacts of the joined model (only the generator trains), opened for training."""
    artifacts = training_artifacts()
    frozen = [t.name for t in model.graph.initializer if t.name not in set(trainable)]
    with captured_native_stderr() as log:
        try:
            artifacts.generate_artifacts(model, requires_grad=trainable, frozen_params=frozen,
                                         loss=artifacts.LossType.CrossEntropyLoss, optimizer=artifacts.OptimType.AdamW,
                                         artifact_directory=str(folder))
        except Exception as error:
            raise ModelError(f"cannot build the generator's training graph: {type(error).__name__}: "
                             f"{' '.join(str(error).split())[:300]} {' '.join(log)[:300]}") from None
    state, module, optimizer = open_artifacts(folder)
    return module, optimizer, state


def generator_info(folder: str | Path) -> dict[str, Any]:
    """A generator folder's validated `generator.json`: what a device needs to compute matching anchors."""
    info_path = Path(folder) / GENERATOR_INFO
    if not info_path.is_file():
        raise DataError(f"{folder} is not a generator folder ({GENERATOR_INFO} missing); "
                        "make one with edgeplug personalize train-generator")
    try:
        info: dict[str, Any] = json.loads(info_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{info_path} is not JSON ({error}); train the generator again") from None
    problem = first_error(info, load_schema("personalize-generator"))
    if problem is not None:
        raise DataError(f"{info_path}: {problem}; train the generator again")
    return info


class Generator:
    """A trained generator folder, for the cloud's one forward pass per personalisation."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        info = generator_info(folder)
        model_path = folder / GENERATOR_MODEL
        if not model_path.is_file():
            raise DataError(f"{folder} is not a generator folder ({GENERATOR_MODEL} missing); "
                            "make one with edgeplug personalize train-generator")
        self.info = info
        self.fingerprint: str = info["model_fingerprint"]
        model = onnx.load(str(model_path))
        outputs = [o.name for o in model.graph.output]
        if outputs != info["slots"]:
            raise DataError(f"{model_path} does not produce the slots {GENERATOR_INFO} lists; train the generator again")
        self.session = inference_runtime().InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    def generate(self, packed: anchor_ops.Packed, meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Slot values for the device that sent these anchors: one forward pass.

        With `device_statistics`, the device applies them together with the statistics it re-estimated."""
        if bool(meta["statistics"]) != bool(self.info["device_statistics"]):
            need = "with" if self.info["device_statistics"] else "without"
            raise DataError(f"this generator expects anchors computed {need} device statistics: run edgeplug personalize "
                            f"anchors {'--statistics STATS.npz ' if need == 'with' else ''}(or pass --generator to it)")
        summary = anchor_ops.summary(packed)
        if len(summary) != self.info["summary_width"]:
            raise DataError(f"the anchors have {len(summary) // 2} features but this generator reads "
                            f"{self.info['summary_width'] // 2}; compute them with the same device model")
        return dict(zip(self.info["slots"], self.session.run(None, {SUMMARY: summary[None]})))

