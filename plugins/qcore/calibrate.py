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
from .signals import alignment_signal


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
    rounds: int = 0
    norms_kept: bool = False


def load_reference(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with np.load(path, allow_pickle=False) as archive:
        return {k.split("/", 1)[1]: (archive[k], archive["std/" + k.split("/", 1)[1]]) for k in archive.files if k.startswith("mean/")}


def load_class_means(path: Path) -> dict[str, np.ndarray]:
    """Hidden layers' reference class means (absent in folders quantized before they existed: no hidden signal)."""
    with np.load(path, allow_pickle=False) as archive:
        return {k.split("/", 1)[1]: archive[k] for k in archive.files if k.startswith("class_mean/")}


def device_features(runner: QuantizedRunner, reference: Mapping[str, tuple[np.ndarray, np.ndarray]],
                    x: np.ndarray, y: np.ndarray, class_means: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Flip-network features of every layer from one forward pass over (x, y).

    The signal feature is the exact cross-entropy descent direction for a last Gemm/MatMul and the
    class-mean alignment signal (`signals`) for hidden layers that have reference class means."""
    logits, inputs, outputs = runner.forward_all(x)
    current = {name: channel_stats(layer, inputs[name]) for name, layer in ((layer.node, layer) for layer in runner.layers)}
    signal: dict[str, np.ndarray | None] = {}
    for layer in runner.layers:
        if layer.last:
            signal[layer.node] = None if layer.op_type == "Conv" else error_correlation(logits, y, inputs[layer.node])
        elif class_means and layer.node in class_means and layer.node in outputs:
            signal[layer.node] = alignment_signal(layer, runner.nodes[layer.node], inputs[layer.node], outputs[layer.node], y,
                                                  class_means[layer.node], runner.norm_gain(layer.node))
        else:
            signal[layer.node] = None
    return {layer.node: layer_features(layer, runner.state, reference[layer.node], current[layer.node], signal[layer.node])
            for layer in runner.layers}


def losses(runner: QuantizedRunner, pool: Coreset, old: np.ndarray) -> tuple[float, float]:
    """Cross-entropy on the old (coreset) part and on the new chunk part of `pool`."""
    logits = runner.logits(pool.x).astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    values = -log_probabilities[np.arange(len(pool.y)), pool.y]
    return float(values[old].mean()) if old.any() else 0.0, float(values[~old].mean()) if (~old).any() else 0.0


def refresh_norms(runner: QuantizedRunner, pool: Coreset, check: Coreset, chunk: int, momentum: float, guard: bool) -> bool:
    """Batch-norm statistics of coreset + chunk (`pool`); with `guard`, kept only if they lower the summed
    cross-entropy of `check` (coreset + the chunk's held-out rows): statistics from ~100 examples of a
    skewed class mix can hurt more than the drift they follow. Returns whether they were kept."""
    if not runner.norms:
        return False
    previous = {k: (m.copy(), v.copy()) for k, (m, v) in runner.state.norm_stats.items()}
    old = check.origin != chunk
    before = sum(losses(runner, check, old)) if guard else 0.0
    runner.refresh_norm_stats(pool.x, momentum)
    if guard and sum(losses(runner, check, old)) >= before:
        runner.state.norm_stats.update(previous)
        return False
    return True


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
        self.class_means = load_class_means(qcore_dir / "reference.npz")
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
        guard = self._guard_rows(len(y))
        fit = np.setdiff1d(np.arange(len(y)), guard)
        check = self.coreset.pooled(x[guard], y[guard], chunk) if len(guard) else pool
        norms_kept = self._refresh_norms(pool, check, chunk)
        proposed, kept, rounds = self._flip(self.coreset.pooled(x[fit], y[fit], chunk), check, chunk)
        correct = self.runner.correct(pool.x, pool.y)
        new = pool.origin == chunk
        after = float(correct[new].mean())
        pool = recount(pool, correct, new, self.never_learned)
        self.coreset = pool.subset(draw(pool.counts, self.size, self.rng))
        return ChunkResult(chunk, source, len(y), before, after, proposed, kept,
                           int(np.count_nonzero(self.coreset.origin > 0)), time.perf_counter() - started, rounds, norms_kept)

    def _guard_rows(self, n: int) -> np.ndarray:
        """The chunk's rows held out for the guard (`guard_split` of it; none for a chunk of one example)."""
        share = float(self.options["guard_split"])
        count = min(n - 1, int(round(share * n))) if self.options["flip_guard"] and n > 1 else 0
        if count <= 0:
            return np.zeros(0, np.int64)
        return np.sort(self.rng.choice(n, size=count, replace=False))

    def _refresh_norms(self, pool: Coreset, check: Coreset, chunk: int) -> bool:
        return refresh_norms(self.runner, pool, check, chunk, float(self.options["norm_momentum"]), bool(self.options["flip_guard"]))

    def _flip(self, pool: Coreset, check: Coreset, chunk: int) -> tuple[int, int, int]:
        """Rounds of flips from the flip networks, each from fresh forward statistics on coreset + chunk.

        With `flip_guard`, each layer's flips are kept only if they lower the cross-entropy on
        the chunk's rows in `check` (held out of `pool` when `guard_split` > 0) without raising it
        on the coreset (forward passes); the rounds stop when a round keeps nothing, or after
        `flip_rounds`. Returns flips proposed, flips kept, rounds run.
        """
        start = {name: codes.copy() for name, codes in self.state.codes.items()}
        check_old = check.origin != chunk
        best = self._losses(check, check_old)
        proposed = rounds = 0
        for _ in range(int(self.options["flip_rounds"])):
            rounds += 1
            features = device_features(self.runner, self.reference, pool.x, pool.y, self.class_means)
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
                    losses = self._losses(check, check_old)
                    margin = float(self.options["guard_margin"])
                    if losses[0] > best[0] or losses[1] >= best[1] * (1.0 - margin):
                        self.state.codes[layer.node] = previous
                        continue
                    best = losses
                kept_this_round += moved
            if kept_this_round == 0:
                break
        kept = sum(int(np.count_nonzero(self.state.codes[k] != start[k])) for k in start)
        return proposed, kept, rounds

    def _losses(self, pool: Coreset, old: np.ndarray) -> tuple[float, float]:
        return losses(self.runner, pool, old)

    def save(self) -> None:
        """Write the updated coreset, then the state (each file whole or not at all)."""
        self.coreset.save(self.dir / "coreset.npz")
        self.state.save(self.dir / "state.npz")
