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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeplug.plugin_api import DataError

from .coreset import Coreset, draw_reserved, recount
from .flipnet import (
    SIGNAL,
    FlipNet,
    apply_flips,
    error_correlation,
    layer_features,
    load_normalisation,
)
from .layers import QuantLayer, find_layers
from .qmodel import Activations, QuantizedRunner, QuantState, channel_stats
from .signals import aligned_outputs, alignment_signal


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


def flip_layers(layers: Iterable[QuantLayer], option: str) -> list[QuantLayer]:
    """The layers whose flip networks act: `last` (the classifier, whose descent direction is exact) or `all`."""
    if option == "all":
        return list(layers)
    return [layer for layer in layers if layer.last]


def feature_probes(model: onnx.ModelProto, layers: Iterable[QuantLayer]) -> list[str]:
    """Tensors the flip features of `layers` read: each layer's input, and a hidden layer's aligned output."""
    layers = list(layers)
    aligned = aligned_outputs(model, find_layers(model))
    names: list[str] = []
    for layer in layers:
        names.append(layer.input)
        if not layer.last and layer.node in aligned:
            names.append(aligned[layer.node].tensor)
    return list(dict.fromkeys(names))


def features_from(runner: QuantizedRunner, reference: Mapping[str, tuple[np.ndarray, np.ndarray]], acts: Activations,
                  y: np.ndarray, layers: Iterable[QuantLayer], class_means: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Flip-network features of `layers` from the activations of a forward pass over labelled examples.

    The signal feature is the exact cross-entropy descent direction for a last Gemm/MatMul and the
    class-mean alignment signal (`signals`) for hidden layers that have reference class means."""
    features = {}
    for layer in layers:
        inputs = acts.input_of(layer)
        signal: np.ndarray | None = None
        if layer.last:
            signal = None if layer.op_type == "Conv" else error_correlation(acts.logits, y, inputs)
        elif class_means and layer.node in class_means and runner.aligned[layer.node].tensor in acts.values:
            signal = alignment_signal(layer, runner.nodes[layer.node], inputs, acts.values[runner.aligned[layer.node].tensor], y,
                                      class_means[layer.node], runner.norm_gain(layer.node))
        features[layer.node] = layer_features(layer, runner.state, reference[layer.node], channel_stats(layer, inputs), signal)
    return features


def device_features(runner: QuantizedRunner, reference: Mapping[str, tuple[np.ndarray, np.ndarray]],
                    x: Any, y: np.ndarray, class_means: Mapping[str, np.ndarray] | None = None,
                    layers: Iterable[QuantLayer] | None = None) -> dict[str, np.ndarray]:
    """Flip-network features of `layers` (default: every layer) from one forward pass over (x, y) (see `features_from`)."""
    chosen = list(runner.layers if layers is None else layers)
    acts = runner.activations(x, feature_probes(runner.model, chosen))
    return features_from(runner, reference, acts, y, chosen, class_means)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy of `logits` (float64)."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_probabilities[np.arange(len(labels)), labels]


def split_losses(logits: np.ndarray, labels: np.ndarray, old: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy of the old (coreset) rows and of the new (chunk) rows."""
    values = cross_entropy(logits, labels)
    return float(values[old].mean()) if old.any() else 0.0, float(values[~old].mean()) if (~old).any() else 0.0


def losses(runner: QuantizedRunner, pool: Coreset, old: np.ndarray) -> tuple[float, float]:
    """Cross-entropy on the old (coreset) part and on the new chunk part of `pool`."""
    return split_losses(runner.logits(pool.x), pool.y, old)


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


def descent_steps(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`flip_proposal: descent`: every weight steps one code along its descent direction (the signal feature: the
    exact negative cross-entropy gradient of a last Gemm/MatMul, in grid steps), its size ordering the flips for
    `flip_search`. Weights without a signal (zero) do not move."""
    signal = features[:, SIGNAL]
    return np.sign(signal).astype(np.int8), np.abs(signal).astype(np.float32)


def _halvings(count: int) -> list[int]:
    """count, count/2, count/4, ..., 1: the flip counts `flip_search` tries."""
    out = [count]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


@dataclasses.dataclass(frozen=True)
class Rows:
    """Which rows of the pool (coreset first, then the chunk) feed the flip features and which judge them."""

    fit: np.ndarray | None  # None: all rows
    check: np.ndarray | None
    old: np.ndarray  # over the check rows: True for coreset rows


class Calibrator:
    """The device side: a quantized model, its coreset and flip networks, updated chunk by chunk.

    One chunk costs a handful of forward passes over coreset + chunk: one before anything changes,
    the norm-statistics re-estimate (each norm's prefix) and one after it; the flips of a layer are
    then judged by re-running only what lies after that layer from kept activations, so flips of the
    last layer (the default, `flip_layers: last`) cost no forward pass of the network at all."""

    def __init__(self, qcore_dir: Path, options: Mapping[str, Any], *, state: QuantState | None = None,
                 coreset: Coreset | None = None, threads: int | None = None) -> None:
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
        self.layers = flip_layers(find_layers(self.model), str(self.options.get("flip_layers", "last")))
        if int(self.options["flip_rounds"]) == 0:
            self.layers = []
        self.probes = feature_probes(self.model, self.layers)
        self.runner = QuantizedRunner(self.model, self.state, probes=self.probes, threads=threads)
        self.runner.prepare(self.layers, self.coreset.x[:1])
        missing_nets = [layer.node for layer in self.layers if layer.node not in build["flipnets"]]
        if missing_nets:
            raise DataError(f"{qcore_dir} has no flip network for {', '.join(missing_nets[:3])}{', ...' if len(missing_nets) > 3 else ''} "
                            "(an encoder's token-wise Linear layers get none: use flip_layers 'last'; otherwise run "
                            "'edgeplug quantize --reuse-records' again)")
        self.flipnets = {layer.node: FlipNet(qcore_dir / "flipnet" / f"{layer.node}.onnx", *load_normalisation(build["flipnets"][layer.node]),
                                             threads=threads) for layer in self.layers}
        self.rng = np.random.default_rng(int(self.options["seed"]))

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(self.runner.correct(x, y).mean())

    def step(self, x: Any, y: np.ndarray, chunk: int, source: str = "") -> ChunkResult:
        started = time.perf_counter()
        pool = self.coreset.pooled(x, y, chunk, stacked=True)
        rows = self._rows(len(self.coreset), len(y))
        probes = self.probes
        acts = self.runner.activations(pool.x, probes)
        new = pool.origin == chunk
        before = float((acts.logits[new].argmax(axis=1) == y).mean())
        norms_kept, acts = self._refresh_norms(pool, acts, rows, probes)
        proposed, kept, rounds, acts = self._flip(pool, acts, rows)
        correct = np.asarray(acts.logits.argmax(axis=1) == pool.y)
        after = float(correct[new].mean())
        pool = recount(pool, correct, new, self.never_learned)
        reserve = float(self.options.get("coreset_reserve", 0.0))
        self.coreset = pool.subset(draw_reserved(pool.counts, pool.origin, self.size, reserve, self.rng))
        return ChunkResult(chunk, source, len(y), before, after, proposed, kept,
                           int(np.count_nonzero(self.coreset.origin > 0)), time.perf_counter() - started, rounds, norms_kept)

    def _rows(self, kept: int, n: int) -> Rows:
        """Rows of a pool of `kept` coreset examples and a chunk of `n`: the chunk's rows held out for the
        guard are `guard_split` of it (none for a chunk of one example)."""
        share = float(self.options["guard_split"])
        count = min(n - 1, int(round(share * n))) if self.options["flip_guard"] and n > 1 else 0
        old = np.arange(kept)
        if count <= 0:
            return Rows(None, None, np.arange(kept + n) < kept)
        guard = np.sort(self.rng.choice(n, size=count, replace=False))
        fit = np.setdiff1d(np.arange(n), guard)
        check = np.concatenate([old, kept + guard])
        return Rows(np.concatenate([old, kept + fit]), check, check < kept)

    def _losses(self, acts: Activations, pool: Coreset, rows: Rows) -> tuple[float, float]:
        if rows.check is None:
            return split_losses(acts.logits, pool.y, rows.old)
        return split_losses(acts.logits[rows.check], pool.y[rows.check], rows.old)

    def _refresh_norms(self, pool: Coreset, acts: Activations, rows: Rows, probes: list[str]) -> tuple[bool, Activations]:
        """Batch-norm statistics of coreset + chunk; with `flip_guard`, kept only if they lower the summed
        cross-entropy of the judging rows (statistics from ~100 examples of a skewed class mix can hurt
        more than the drift they follow). Returns whether they were kept and the activations under the
        statistics in force."""
        if not self.runner.norms:
            return False, acts
        guard = bool(self.options["flip_guard"])
        previous = {k: (m.copy(), v.copy()) for k, (m, v) in self.state.norm_stats.items()}
        before = sum(self._losses(acts, pool, rows))
        self.runner.refresh_norm_stats(pool.x, float(self.options["norm_momentum"]))
        refreshed = self.runner.activations(pool.x, probes)
        if guard and sum(self._losses(refreshed, pool, rows)) >= before:
            self.state.norm_stats.update(previous)
            return False, acts
        return True, refreshed

    def _flip(self, pool: Coreset, acts: Activations, rows: Rows) -> tuple[int, int, int, Activations]:
        """Rounds of flips from the flip networks, each from the current activations on coreset + chunk.

        With `flip_guard`, each layer's flips are kept only if they lower the cross-entropy on
        the chunk's judging rows (held out of the features when `guard_split` > 0) without raising it
        on the coreset; the rounds stop when a round keeps nothing, or after `flip_rounds`. Returns
        flips proposed, flips kept, rounds run and the activations under the final codes.
        """
        start = {layer.node: self.state.codes[layer.node].copy() for layer in self.layers}
        guard = bool(self.options["flip_guard"])
        search = bool(self.options.get("flip_search", False))
        descent = str(self.options.get("flip_proposal", "network")) == "descent"
        limit = float(self.options.get("flip_limit", 1.0))
        margin = float(self.options["guard_margin"])
        best = self._losses(acts, pool, rows)
        fit_y = pool.y if rows.fit is None else pool.y[rows.fit]
        proposed = rounds = 0
        for _ in range(int(self.options["flip_rounds"])):
            rounds += 1
            fit = acts if rows.fit is None else acts.take(rows.fit)
            features = features_from(self.runner, self.reference, fit, fit_y, self.layers, self.class_means)
            del fit
            kept_this_round = 0
            for layer in reversed(self.layers):
                steps, confidence = (descent_steps(features[layer.node]) if descent
                                     else self.flipnets[layer.node].scored_steps(features[layer.node]))
                previous = self.state.codes[layer.node]
                shape = previous.shape
                proposal = apply_flips(layer, self.state, steps.reshape(shape))
                moved = int(np.count_nonzero(proposal != previous))
                proposed += moved
                if moved == 0:
                    continue
                # the proposal, then (flip_search) its most confident half, quarter, ... until the guard keeps one
                cap = max(1, int(np.ceil(limit * previous.size)))
                if moved > cap:  # flip_limit: at most that many of the most confident moves per layer and round
                    proposal = self._most_confident(previous, proposal, confidence.reshape(shape), cap)
                    moved = cap
                candidates = [proposal] if not (guard and search) else [
                    self._most_confident(previous, proposal, confidence.reshape(shape), count) for count in _halvings(moved)]
                for codes in candidates:
                    self.state.codes[layer.node] = codes
                    trial = self.runner.rerun_from(layer, acts, pool.x)
                    if guard:
                        judged = self._losses(trial, pool, rows)
                        if judged[0] > best[0] or judged[1] >= best[1] * (1.0 - margin):
                            continue
                        best = judged
                    acts = trial
                    kept_this_round += int(np.count_nonzero(codes != previous))
                    break
                else:
                    self.state.codes[layer.node] = previous
            if kept_this_round == 0:
                break
        kept = sum(int(np.count_nonzero(self.state.codes[k] != start[k])) for k in start)
        return proposed, kept, rounds, acts

    @staticmethod
    def _most_confident(previous: np.ndarray, proposal: np.ndarray, confidence: np.ndarray, count: int) -> np.ndarray:
        """`previous` with only the `count` moves of `proposal` that the flip network is most confident of."""
        moved = np.flatnonzero(proposal.ravel() != previous.ravel())
        chosen = moved[np.argsort(-confidence.ravel()[moved], kind="stable")[:count]]
        codes = previous.copy().ravel()
        codes[chosen] = proposal.ravel()[chosen]
        return codes.reshape(previous.shape)

    def save(self) -> None:
        """Write the updated coreset, then the state (each file whole or not at all)."""
        self.coreset.save(self.dir / "coreset.npz")
        self.state.save(self.dir / "state.npz")
