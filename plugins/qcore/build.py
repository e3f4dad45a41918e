"""`edgeplug quantize`: train the float model while recording quantized copies, then quantize,
draw the coreset and train the bit-flip networks. Everything lands in OUT/qcore/."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeplug.plugin_api import DataError, RecipeError, atomic_directory, fill_defaults, load_schema, save_model

from .backprop import backprop_calibrate, latent_weights
from .calibrate import device_features, flip_layers
from .coreset import Coreset, coreset_size, draw, forgetting_counts
from .examples import Examples, concatenate
from .examples import of as examples_of
from .flipnet import train_flipnet
from .qmodel import (
    QuantizedRunner,
    QuantState,
    export_model,
    initial_state,
    write_json,
)
from .quantize import activation_grid
from .signals import channel_means

QCORE_DIR = "qcore"
CONFIG = "config.json"


def _output_classes(model: onnx.ModelProto) -> int:
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value) if dims and dims[-1].HasField("dim_value") else 0


def read_options(artifact_dir: Path) -> dict[str, Any]:
    """The qcore pass options the folder was rewritten with."""
    path = artifact_dir / "passes" / "qcore" / CONFIG
    if not path.is_file():
        raise RecipeError(f"{artifact_dir} was not rewritten with the 'qcore' pass; add it to the recipe and run 'edgeplug rewrite' again")
    options = json.loads(path.read_text(encoding="utf-8"))["options"]
    return dict(fill_defaults(options, load_schema("passes/qcore")))


def quantize(float_model: onnx.ModelProto, x: np.ndarray, bits: int, percentile: float) -> QuantState:
    """Per-channel weight grids, norm statistics and activation ranges from calibration inputs `x`.

    The first layer's input stays float; the last layer's input is quantized at 8 bits.
    """
    state = initial_state(float_model, bits)
    runner = QuantizedRunner(float_model, state)
    runner.refresh_norm_stats(x)
    for layer, values in activation_samples(runner, x).items():
        if not layer.first:
            state.activation_grids[layer.node] = activation_grid(values, 8 if layer.last else bits, percentile)
    return state


ACTIVATION_SAMPLE = 2_000_000
"""Most values per layer input that the activation range is taken from (an encoder's inputs are [batch, sequence,
features]: 128 texts of 48 tokens are 9.4 M values at MiniLM's 1536-wide layer); below it every value counts."""


def activation_samples(runner: QuantizedRunner, x: Any) -> dict[Any, np.ndarray]:
    """Every quantized layer's float input values on `x`, batch by batch; where a layer's inputs over all of `x`
    would exceed ACTIVATION_SAMPLE values, an evenly spread random subset of each batch (seeded)."""
    rng = np.random.default_rng(0)
    batches = -(-len(x) // runner.batch)
    parts: dict[Any, list[np.ndarray]] = {layer: [] for layer in runner.layers}
    for start in range(0, len(x), runner.batch):
        inputs = runner.layer_inputs(x[start:start + runner.batch])
        for layer in runner.layers:
            flat = inputs[layer.node].ravel()
            room = ACTIVATION_SAMPLE // batches
            parts[layer].append(flat if flat.size * batches <= ACTIVATION_SAMPLE else flat[rng.choice(flat.size, room, replace=False)])
        del inputs
    return {layer: np.concatenate(values) for layer, values in parts.items()}


def distort(x: Any, rng: np.random.Generator, strength: float) -> Any:
    """A synthetic drift for flip-network targets: per-channel gain and offset plus noise. Only float inputs
    drift: integer ones (token ids, attention masks) stay as they are (give such models --drift-data)."""
    if isinstance(x, Examples):
        return Examples({name: distort(value, rng, strength) if np.issubdtype(value.dtype, np.floating) else value
                         for name, value in x})
    if not np.issubdtype(x.dtype, np.floating):
        return x
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    spread = float(x.std()) or 1.0
    gain = 1.0 + strength * rng.uniform(-0.5, 0.5, shape)
    offset = strength * spread * rng.normal(0.0, 0.5, shape)
    noise = strength * 0.2 * spread * rng.standard_normal(x.shape)
    return (x * gain + offset + noise).astype(x.dtype)


def reference_class_means(runner: QuantizedRunner, x: Any, y: np.ndarray, classes: int,
                          layers: Any = None) -> dict[str, np.ndarray]:
    """Class means of the hidden layers' aligned outputs on the training data (see `signals`); `layers`: the
    layer nodes to keep them for (default: every hidden layer)."""
    sums: dict[str, np.ndarray] = {}
    counts = np.bincount(y, minlength=classes).astype(np.float64)
    wanted = [name for name in runner.aligned if layers is None or name in set(layers)]
    if not wanted:
        return {}
    names = [runner.aligned[name].tensor for name in wanted]
    step = 1024 if len(runner.layers) < 16 else runner.batch  # large models: few rows of every output at a time
    for start in range(0, len(y), step):
        values = runner.run(x[start:start + step], names)
        for layer_name, value in zip(wanted, values):
            name = layer_name
            means = channel_means(value).astype(np.float64)
            total = sums.setdefault(name, np.zeros((classes, means.shape[1])))
            np.add.at(total, y[start:start + step], means)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {name: (total / counts[:, None]).astype(np.float32) for name, total in sums.items()}


def flip_examples(float_model: onnx.ModelProto, state: QuantState, reference: Mapping[str, tuple[np.ndarray, np.ndarray]],
                  x: Any, y: np.ndarray, options: Mapping[str, Any],
                  class_means: Mapping[str, np.ndarray] | None = None,
                  layers: Any = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Features (as the device computes them) and backprop-calibration targets on (x, y), per layer of `layers`
    (default: every quantized layer)."""
    drifted = state.copy()
    runner = QuantizedRunner(float_model, drifted)
    runner.refresh_norm_stats(x, float(options["norm_momentum"]))
    features = device_features(runner, reference, x, y, class_means, layers)
    every = {layer.node for layer in runner.layers}
    chosen = set(features)
    # the targets come from a calibration of the layers that get flip networks; every layer when all of them do (CNNs),
    # the classifier alone on an encoder (the only layer the device then moves)
    trained = None if chosen == every else chosen
    # straight-through: latent weights from the float model, whose quantization the drifted state's codes are
    latent = latent_weights(float_model, trained) if options.get("backprop_straight_through") else None
    tuned = backprop_calibrate(float_model, drifted, x, y, epochs=int(options["backprop_epochs"]),
                               lr=float(options["backprop_lr"]), seed=int(options["seed"]), layers=trained, latent=latent)
    targets = {name: np.clip(tuned.codes[name].astype(np.int16) - drifted.codes[name], -1, 1).ravel().astype(np.float32)
               for name in features}
    return features, targets


def drift_pools(coreset: Coreset, x: np.ndarray, y: np.ndarray, drift_data: DriftData | None, options: Mapping[str, Any],
                rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """The (x, y) pools the flip networks' targets come from: coreset + a chunk of each drift.

    With drift data (examples grouped by domain, e.g. people the float model was not trained on),
    each drift is a chunk of one domain as the device will see it; otherwise a synthetic
    per-channel gain/offset/noise drift of training examples, growing in strength."""
    count, size = int(options["drifts"]), int(options["drift_chunk"])
    pools = []
    if drift_data is not None:
        domains = rng.permutation(np.unique(drift_data.domain))
        for k in range(count):
            domain = domains[k % len(domains)]
            rows = np.flatnonzero(drift_data.domain == domain)
            picked = rng.choice(rows, size=min(size, len(rows)), replace=False)
            pools.append((concatenate([coreset.x, drift_data.x[picked]]), np.concatenate([coreset.y, drift_data.y[picked]]),
                          f"domain {domain}"))
        return pools
    for k in range(count):
        picked = rng.choice(len(y), size=min(size, len(y)), replace=False)
        strength = float(options["drift_strength"]) * (k + 1) / count
        pools.append((distort(concatenate([coreset.x, x[picked]]), rng, strength), np.concatenate([coreset.y, y[picked]]),
                      f"synthetic {strength:.2f}"))
    return pools


def token_wise_layers(runner: QuantizedRunner, example: Any) -> set[str]:
    """MatMul/Gemm layers whose input has more than two axes ([batch, sequence, features]: a transformer's Linear
    layers applied to every token), found from one forward pass over one example."""
    inputs = runner.layer_inputs(example)
    return {layer.node for layer in runner.layers if layer.op_type != "Conv" and inputs[layer.node].ndim > 2}


@dataclasses.dataclass(frozen=True)
class DriftData:
    """Labelled examples grouped by domain (one integer per example) for the flip networks' targets."""

    x: Any  # np.ndarray, or Examples for a model with several inputs
    y: np.ndarray
    domain: np.ndarray


def build(artifact_dir: Path, data: Any, *, epochs: int, batch_size: int, echo: Callable[[str], None],
          drift_data: DriftData | None = None) -> dict[str, Any]:
    """Train with records, quantize, draw the coreset, train the flip networks; returns the summary."""
    from edgeplug import Trainer, export

    options = read_options(artifact_dir)
    started = time.perf_counter()
    trainer = Trainer(artifact_dir, seed=int(options["seed"]), echo=echo)
    dataset = trainer.dataset(data)
    x, y = examples_of(dataset.inputs), dataset.labels
    rng = np.random.default_rng(int(options["seed"]))
    calib = x[rng.permutation(len(y))[: int(options["calibration_samples"])]]
    size = coreset_size(options["coreset_size"], len(y))
    if size > len(y):  # before the record training advances the folder's checkpoint
        raise RecipeError(f"qcore: coreset_size {size} is larger than the training data ({len(y)} examples)")
    every = int(options["record_every"])
    record_epochs = sorted({*range(every, epochs + 1, every), epochs})
    record_bits = [int(b) for b in options["record_bits"]]
    records = np.zeros((len(record_bits), len(record_epochs), len(y)), dtype=bool)
    with tempfile.TemporaryDirectory(prefix="qcore-build-") as scratch:
        for t, epoch in enumerate(record_epochs):
            Trainer(artifact_dir, seed=int(options["seed"]), echo=echo).fit(dataset, epochs=epoch, batch_size=batch_size)
            float_model = onnx.load(str(export(artifact_dir, Path(scratch) / "float.onnx")))
            for i, bits in enumerate(record_bits):
                records[i, t] = QuantizedRunner(float_model, quantize(float_model, calib, bits, options["activation_percentile"])).correct(x, y)
            echo(f"record {t + 1}/{len(record_epochs)} (epoch {epoch}): accuracy " + ", ".join(
                f"{b} bits {records[i, t].mean():.3f}" for i, b in enumerate(record_bits)))
    return finish(artifact_dir, float_model, x, y, records, record_epochs, options, echo=echo, drift_data=drift_data,
                  started=started)


def rebuild(artifact_dir: Path, data: Any, *, echo: Callable[[str], None], drift_data: DriftData | None = None) -> dict[str, Any]:
    """Redo everything after the float training (quantization, coreset, flip networks) from the trained
    float model and forgetting records a previous `build` left in OUT/qcore/ (options re-read)."""
    from edgeplug import Trainer

    options = read_options(artifact_dir)
    folder = artifact_dir / QCORE_DIR
    if not (folder / "records.npz").is_file():
        raise DataError(f"{folder} has no records.npz; run 'edgeplug quantize' first")
    dataset = Trainer(artifact_dir, seed=int(options["seed"]), echo=echo).dataset(data)
    x, y = examples_of(dataset.inputs), dataset.labels
    with np.load(folder / "records.npz", allow_pickle=False) as archive:
        records, record_epochs = archive["records"], [int(e) for e in archive["epochs"]]
    float_model = onnx.load(str(folder / "float.onnx"))
    return finish(artifact_dir, float_model, x, y, records, record_epochs, options, echo=echo, drift_data=drift_data,
                  started=time.perf_counter())


def finish(artifact_dir: Path, float_model: onnx.ModelProto, x: Any, y: np.ndarray, records: np.ndarray,
           record_epochs: list[int], options: Mapping[str, Any], *, echo: Callable[[str], None],
           drift_data: DriftData | None, started: float) -> dict[str, Any]:
    """Quantize the trained float model, draw the coreset from the records, train the flip networks, write OUT/qcore/."""
    rng = np.random.default_rng(int(options["seed"]) + 1)
    calib = x[rng.permutation(len(y))[: int(options["calibration_samples"])]]
    size = coreset_size(options["coreset_size"], len(y))
    record_bits = [int(b) for b in options["record_bits"]]
    never = int(options.get("never_learned") or len(record_epochs))
    counts = forgetting_counts(records, never)
    chosen = draw(counts, size, rng)
    bits = int(options["bits"])
    state = quantize(float_model, calib, bits, options["activation_percentile"])
    runner = QuantizedRunner(float_model, state)
    reference = runner.channel_stats(calib)
    coreset = Coreset(x[chosen], y[chosen], counts[chosen], runner.correct(x[chosen], y[chosen]), np.zeros(size, np.int64))
    echo(f"coreset: {size} of {len(y)} examples ({size / len(y):.2%}), {int((counts > 0).sum())} ever forgotten")

    classes = int(max(int(y.max()) + 1, _output_classes(float_model)))
    token_wise = token_wise_layers(runner, x[:1])
    refused = [layer.node for layer in flip_layers(runner.layers, str(options.get("flip_layers", "last")))
               if not layer.last and layer.node in token_wise]
    if refused:
        raise RecipeError(f"qcore: flip_layers 'all' needs a class-mean signal for every hidden layer, and {len(refused)} of them "
                          f"(e.g. '{refused[0]}') are MatMuls over [batch, sequence, features] (an encoder's token-wise Linear "
                          "layers), which have none; use flip_layers: last")
    # flip networks for every layer that has a signal: the last one, and hidden layers except token-wise ones (an
    # encoder's Linear layers get none: no class-mean signal, and 10 M feature rows per drift for MiniLM-L6)
    flipping = [layer for layer in runner.layers if layer.last or layer.node not in token_wise]
    class_means = reference_class_means(runner, x, y, classes, [layer.node for layer in flipping if not layer.last])
    features: dict[str, list[np.ndarray]] = {layer.node: [] for layer in flipping}
    targets: dict[str, list[np.ndarray]] = {layer.node: [] for layer in flipping}
    for k, (pool_x, pool_y, what) in enumerate(drift_pools(coreset, x, y, drift_data, options, rng)):
        f, g = flip_examples(float_model, state, reference, pool_x, pool_y, options, class_means, flipping)
        for name in features:
            features[name].append(f[name])
            targets[name].append(g[name])
        moved = sum(int(np.count_nonzero(v)) for v in g.values())
        echo(f"flip targets {k + 1}/{options['drifts']} ({what}): backprop calibration moved {moved} weights")

    summary: dict[str, Any] = {"bits": bits, "record_bits": record_bits, "record_epochs": record_epochs,
                               "record_accuracy": records.mean(axis=2).round(4).tolist(),
                               "never_learned_count": never, "examples": int(len(y)), "coreset_size": size,
                               "coreset_share": size / len(y), "ever_forgotten": int((counts > 0).sum()), "flipnets": {}}
    with atomic_directory(artifact_dir / QCORE_DIR, overwrite=True) as staged:
        (staged / "flipnet").mkdir()
        for layer in flipping:
            info = train_flipnet(np.concatenate(features[layer.node]), np.concatenate(targets[layer.node]),
                                 staged / "flipnet" / f"{layer.node}.onnx", hidden=int(options["flip_hidden"]),
                                 epochs=int(options["flip_epochs"]), lr=float(options["flip_lr"]), seed=int(options["seed"]))
            summary["flipnets"][layer.node] = info
            echo(f"flip network {layer.node}: {info['nonzero_targets']} non-zero targets, agreement {info['agreement']:.3f}")
        save_model(float_model, staged / "float.onnx")
        state.save(staged / "state.npz")
        state.save(staged / "state.initial.npz")
        coreset.save(staged / "coreset.npz")
        np.savez(staged / "records.npz", records=records, epochs=np.asarray(record_epochs, np.int64))
        stats: dict[str, Any] = {f"mean/{k}": v[0] for k, v in reference.items()} | {f"std/{k}": v[1] for k, v in reference.items()}
        stats |= {f"class_mean/{k}": v for k, v in class_means.items()}
        np.savez(staged / "reference.npz", **stats)
        quantized = export_model(float_model, state)
        save_model(quantized, staged / f"model.int{bits}.onnx")
        summary["float_bytes"] = (staged / "float.onnx").stat().st_size
        summary["quantized_bytes"] = (staged / f"model.int{bits}.onnx").stat().st_size
        summary["seconds"] = round(time.perf_counter() - started, 2)
        write_json(staged / "build.json", summary)
    return summary
