"""`edgeplug quantize`: train the float model while recording quantized copies, then quantize,
draw the coreset and train the bit-flip networks. Everything lands in OUT/qcore/."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeplug.plugin_api import DataError, RecipeError, atomic_directory, fill_defaults, load_schema, save_model

from .backprop import backprop_calibrate
from .calibrate import device_features
from .coreset import Coreset, coreset_size, draw, forgetting_counts
from .flipnet import train_flipnet
from .layers import find_layers
from .qmodel import (
    QuantizedRunner,
    QuantState,
    export_model,
    initial_state,
    write_json,
)
from .quantize import activation_grid

QCORE_DIR = "qcore"
CONFIG = "config.json"


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
    inputs = runner.layer_inputs(x)
    for layer in runner.layers:
        if not layer.first:
            state.activation_grids[layer.node] = activation_grid(inputs[layer.node], 8 if layer.last else bits, percentile)
    return state


def distort(x: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A synthetic drift for flip-network targets: per-channel gain and offset plus noise."""
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    spread = float(x.std()) or 1.0
    gain = 1.0 + strength * rng.uniform(-0.5, 0.5, shape)
    offset = strength * spread * rng.normal(0.0, 0.5, shape)
    noise = strength * 0.2 * spread * rng.standard_normal(x.shape)
    return (x * gain + offset + noise).astype(x.dtype)


def flip_examples(float_model: onnx.ModelProto, state: QuantState, reference: Mapping[str, tuple[np.ndarray, np.ndarray]],
                  x: np.ndarray, y: np.ndarray, options: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Features (as the device computes them) and backprop-calibration targets on (x, y), per layer."""
    drifted = state.copy()
    runner = QuantizedRunner(float_model, drifted)
    runner.refresh_norm_stats(x, float(options["norm_momentum"]))
    features = device_features(runner, reference, x, y)
    tuned = backprop_calibrate(float_model, drifted, x, y, epochs=int(options["backprop_epochs"]),
                               lr=float(options["backprop_lr"]), seed=int(options["seed"]))
    targets = {name: np.clip(tuned.codes[name].astype(np.int16) - drifted.codes[name], -1, 1).ravel().astype(np.float32)
               for name in drifted.codes}
    return features, targets


def build(artifact_dir: Path, data: Any, *, epochs: int, batch_size: int, echo: Callable[[str], None]) -> dict[str, Any]:
    """Train with records, quantize, draw the coreset, train the flip networks; returns the summary."""
    from edgeplug import Trainer, export

    options = read_options(artifact_dir)
    started = time.perf_counter()
    trainer = Trainer(artifact_dir, seed=int(options["seed"]), echo=echo)
    dataset = trainer.dataset(data)
    if len(dataset.inputs) != 1:
        raise DataError(f"qcore needs a model with one data input; this one has {sorted(dataset.inputs)}")
    x, y = next(iter(dataset.inputs.values())), dataset.labels
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
    never = int(options.get("never_learned") or len(record_epochs))
    counts = forgetting_counts(records, never)
    chosen = draw(counts, size, rng)
    bits = int(options["bits"])
    state = quantize(float_model, calib, bits, options["activation_percentile"])
    runner = QuantizedRunner(float_model, state)
    reference = runner.channel_stats(calib)
    coreset = Coreset(x[chosen], y[chosen], counts[chosen], runner.correct(x[chosen], y[chosen]), np.zeros(size, np.int64))
    echo(f"coreset: {size} of {len(y)} examples ({size / len(y):.2%}), {int((counts > 0).sum())} ever forgotten")

    features: dict[str, list[np.ndarray]] = {layer.node: [] for layer in runner.layers}
    targets: dict[str, list[np.ndarray]] = {layer.node: [] for layer in runner.layers}
    for k in range(int(options["drifts"])):
        picked = rng.choice(len(y), size=min(int(options["drift_chunk"]), len(y)), replace=False)
        pool_x = distort(np.concatenate([coreset.x, x[picked]]), rng, float(options["drift_strength"]) * (k + 1) / int(options["drifts"]))
        pool_y = np.concatenate([coreset.y, y[picked]])
        f, g = flip_examples(float_model, state, reference, pool_x, pool_y, options)
        for name in features:
            features[name].append(f[name])
            targets[name].append(g[name])
        moved = sum(int(np.count_nonzero(v)) for v in g.values())
        echo(f"flip targets {k + 1}/{options['drifts']}: backprop calibration moved {moved} weights")

    summary: dict[str, Any] = {"bits": bits, "record_bits": record_bits, "record_epochs": record_epochs,
                               "record_accuracy": records.mean(axis=2).round(4).tolist(),
                               "never_learned_count": never, "examples": int(len(y)), "coreset_size": size,
                               "coreset_share": size / len(y), "ever_forgotten": int((counts > 0).sum()), "flipnets": {}}
    with atomic_directory(artifact_dir / QCORE_DIR, overwrite=True) as staged:
        (staged / "flipnet").mkdir()
        for layer in find_layers(float_model):
            info = train_flipnet(np.concatenate(features[layer.node]), np.concatenate(targets[layer.node]),
                                 staged / "flipnet" / f"{layer.node}.onnx", hidden=int(options["flip_hidden"]),
                                 epochs=int(options["flip_epochs"]), lr=float(options["flip_lr"]), seed=int(options["seed"]))
            summary["flipnets"][layer.node] = info
            echo(f"flip network {layer.node}: {info['nonzero_targets']} non-zero targets, agreement {info['agreement']:.3f}")
        save_model(float_model, staged / "float.onnx")
        state.save(staged / "state.npz")
        state.save(staged / "state.initial.npz")
        coreset.save(staged / "coreset.npz")
        stats: dict[str, Any] = {f"mean/{k}": v[0] for k, v in reference.items()} | {f"std/{k}": v[1] for k, v in reference.items()}
        np.savez(staged / "reference.npz", **stats)
        quantized = export_model(float_model, state)
        save_model(quantized, staged / f"model.int{bits}.onnx")
        summary["float_bytes"] = (staged / "float.onnx").stat().st_size
        summary["quantized_bytes"] = (staged / f"model.int{bits}.onnx").stat().st_size
        summary["seconds"] = round(time.perf_counter() - started, 2)
        write_json(staged / "build.json", summary)
    return summary
