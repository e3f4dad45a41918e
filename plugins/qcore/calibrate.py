"""On-device continual calibration, forward passes only.

Per chunk: update the batch-norm statistics on coreset + chunk, compute the flip
networks' features from forward passes, apply their flips to the integer weights
(in rounds, each kept only if it lowers the loss on coreset + chunk, when `flip_guard` is on),
recount forgetting and resample the coreset back to its fixed size. Nothing here
imports or runs onnxruntime-training: only onnxruntime inference sessions.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeplug.plugin_api import DataError

from .coreset import Coreset, draw, recount
from .flipnet import (
    FlipNet,
    apply_flips,
    error_correlation,
    layer_features,
    load_normalisation,
)
from .qmodel import QuantizedRunner, QuantState, channel_stats


@dataclasses.dataclass(frozen=True)
class ChunkResult:
    """One row of the per-chunk table."""

    chunk: int
    source: str
    examples: int
    accuracy_before: float
    accuracy_after: float
    flips_proposed: int
    flips_kept: int
    coreset_from_stream: int
    seconds: float


def load_reference(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with np.load(path, allow_pickle=False) as archive:
        return {k.split("/", 1)[1]: (archive[k], archive["std/" + k.split("/", 1)[1]]) for k in archive.files if k.startswith("mean/")}


def device_features(runner: QuantizedRunner, reference: Mapping[str, tuple[np.ndarray, np.ndarray]],
                    x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Flip-network features of every layer from one forward pass over (x, y)."""
    logits, inputs = runner.logits_and_inputs(x)
    current = {name: channel_stats(layer, inputs[name]) for name, layer in ((layer.node, layer) for layer in runner.layers)}
    last = runner.layers[-1]
    error = None if last.op_type == "Conv" else error_correlation(logits, y, inputs[last.node])
    return {layer.node: layer_features(layer, runner.state, reference[layer.node], current[layer.node],
                                       error if layer is last else None) for layer in runner.layers}


class Calibrator:
    """The device side: a quantized model, its coreset and flip networks, updated chunk by chunk."""

    def __init__(self, qcore_dir: Path, options: Mapping[str, Any], *, state: QuantState | None = None,
                 coreset: Coreset | None = None) -> None:
        missing = [name for name in ("float.onnx", "build.json", "reference.npz") if not (qcore_dir / name).is_file()]
        if missing:
            raise DataError(f"{qcore_dir} lacks {', '.join(missing)}; run 'edgeplug quantize OUT --data train.npz' first")
        self.dir = qcore_dir
        self.options = dict(options)
        self.model = onnx.load(str(qcore_dir / "float.onnx"))
        self.state = state if state is not None else QuantState.load(qcore_dir / "state.npz")
        self.coreset = coreset if coreset is not None else Coreset.load(qcore_dir / "coreset.npz")
        self.size = len(self.coreset)
        self.reference = load_reference(qcore_dir / "reference.npz")
        build = json.loads((qcore_dir / "build.json").read_text(encoding="utf-8"))
        self.never_learned = int(build["never_learned_count"])
        self.flipnets = {name: FlipNet(qcore_dir / "flipnet" / f"{name}.onnx", *load_normalisation(info))
                         for name, info in build["flipnets"].items()}
        self.runner = QuantizedRunner(self.model, self.state)
        self.rng = np.random.default_rng(int(self.options["seed"]))

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(self.runner.correct(x, y).mean())

    def step(self, x: np.ndarray, y: np.ndarray, chunk: int, source: str = "") -> ChunkResult:
        started = time.perf_counter()
        before = self.accuracy(x, y)
        pool = self.coreset.pooled(x, y, chunk)
        self.runner.refresh_norm_stats(pool.x, float(self.options["norm_momentum"]))
        proposed, kept = self._flip(pool, chunk)
        correct = self.runner.correct(pool.x, pool.y)
        new = pool.origin == chunk
        after = float(correct[new].mean())
        pool = recount(pool, correct, new, self.never_learned)
        self.coreset = pool.subset(draw(pool.counts, self.size, self.rng))
        return ChunkResult(chunk, source, len(y), before, after, proposed, kept,
                           int(np.count_nonzero(self.coreset.origin > 0)), time.perf_counter() - started)

    def _flip(self, pool: Coreset, chunk: int) -> tuple[int, int]:
        """Rounds of flips from the flip networks, each from fresh forward statistics.

        With `flip_guard`, each layer's flips are kept only if they lower the
        cross-entropy on the chunk without raising it on the coreset (forward passes);
        the rounds stop when a round keeps nothing.
        """
        start = {name: codes.copy() for name, codes in self.state.codes.items()}
        old = pool.origin != chunk
        best = self._losses(pool, old)
        proposed = 0
        for _ in range(int(self.options["flip_rounds"])):
            features = device_features(self.runner, self.reference, pool.x, pool.y)
            kept_this_round = 0
            for layer in reversed(self.runner.layers):
                flips = self.flipnets[layer.node].steps(features[layer.node]).reshape(self.state.codes[layer.node].shape)
                previous = self.state.codes[layer.node]
                self.state.codes[layer.node] = apply_flips(layer, self.state, flips)
                moved = int(np.count_nonzero(self.state.codes[layer.node] != previous))
                proposed += moved
                if moved == 0:
                    continue
                if self.options["flip_guard"]:
                    losses = self._losses(pool, old)
                    if losses[0] > best[0] or losses[1] >= best[1]:
                        self.state.codes[layer.node] = previous
                        continue
                    best = losses
                kept_this_round += moved
            if kept_this_round == 0:
                break
        kept = sum(int(np.count_nonzero(self.state.codes[k] != start[k])) for k in start)
        return proposed, kept

    def _losses(self, pool: Coreset, old: np.ndarray) -> tuple[float, float]:
        """Cross-entropy on the coreset part and on the new chunk of the pool."""
        logits = self.runner.logits(pool.x).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        losses = -log_probabilities[np.arange(len(pool.y)), pool.y]
        return float(losses[old].mean()) if old.any() else 0.0, float(losses[~old].mean())

    def save(self) -> None:
        """Write the updated coreset, then the state (each file whole or not at all)."""
        self.coreset.save(self.dir / "coreset.npz")
        self.state.save(self.dir / "state.npz")
