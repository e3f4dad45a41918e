"""Why does backprop calibration hardly beat no recalibration on the VADER stream? Measured on the validation stream.

Runs variants of bench/qcore_vader.py's backprop row over its validation stream (seed 0's order, from the quantized
model in --work; no text of it is in any seed's stream or test sets) and records per chunk: the cross-entropy and
accuracy of the pool it trains on (coreset + chunk) before and after the calibration, the share of integer weights
whose code differs from the start (the classifier and the encoder's Linear layers apart), and accuracy on the
validation texts of the chunk's domain (new) and on validation tweets (original), the four-domain figure as in
qcore_vader.py. Variants: `q:LR:EPOCHS` (the backprop row: every quantized layer, straight-through, at that lr and
epoch count), `head:LR:EPOCHS` (the same, classifier only), `float:LR:EPOCHS` (an upper bound with no quantization at
all: the float model fine-tuned the same way, its float weights kept and scored in float, beside `float-none`, the
float model untouched), `none`.

    nice python bench/qcore_vader_diag.py --work /tmp/edgeplug-bench-qcore-vader --variants none q:1e-5:3 float:1e-5:3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

BENCH = Path(__file__).resolve().parent
if str(BENCH.parent) not in sys.path:
    sys.path.insert(0, str(BENCH.parent))

import edgeplug  # noqa: E402
from bench import qcore_vader as qv  # noqa: E402
from edgeplug.plugin_api import captured_native_stderr, inference_runtime, inference_session, open_artifacts  # noqa: E402
from edgeplug_plugins.qcore.build import activation_samples  # noqa: E402
from edgeplug_plugins.qcore.calibrate import cross_entropy  # noqa: E402
from edgeplug_plugins.qcore.coreset import Coreset, draw_reserved, recount  # noqa: E402
from edgeplug_plugins.qcore.examples import Examples  # noqa: E402
from edgeplug_plugins.qcore.layers import find_layers  # noqa: E402
from edgeplug_plugins.qcore.qmodel import QuantizedRunner, QuantState, dequantized_float_model  # noqa: E402
from edgeplug_plugins.qcore.quantize import activation_grid, quantize_weights  # noqa: E402


class FloatBackprop:
    """The backprop row without quantization: the float model's Linear weights (every layer the quantized model
    quantizes) fine-tuned on coreset + chunk with AdamW, the result kept in float; scored by the float model."""

    def __init__(self, folder: Path, seed: int, lr: float, epochs: int, reserve: float) -> None:
        qdir = folder / "qcore"
        self.name = "float"
        self.model = onnx.load(str(qdir / "float.onnx"))
        self.layers = find_layers(self.model)
        self.coreset = Coreset.load(qdir / "coreset.npz")
        self.size = len(self.coreset)
        self.never = int(json.loads((qdir / "build.json").read_text())["never_learned_count"])
        self.rng = np.random.default_rng(seed)
        self.lr, self.epochs, self.reserve = lr, epochs, reserve
        self.session = inference_session(self.model, threads=qv.THREADS, arena=False)

    def logits(self, x: Examples) -> np.ndarray:
        out = []
        for start in range(0, len(x), 16):
            part = x[start:start + 16]
            out.append(self.session.run(["logits"], dict(part.arrays))[0])
        return np.concatenate(out)

    def accuracy(self, x: Examples, y: np.ndarray) -> float:
        return float((self.logits(x).argmax(-1) == y).mean())

    def step(self, x: Examples, y: np.ndarray, chunk: int) -> float:
        pool = self.coreset.pooled(x, y, chunk)
        self._train(pool, chunk)
        self.session = inference_session(self.model, threads=qv.THREADS, arena=False)
        correct = self.logits(pool.x).argmax(-1) == pool.y
        pool = recount(pool, correct, pool.origin == chunk, self.never)
        self.coreset = pool.subset(draw_reserved(pool.counts, pool.origin, self.size, self.reserve, self.rng))
        return 0.0

    def _train(self, pool: Coreset, chunk: int) -> None:
        """`epochs` of AdamW on the pool from the current float weights (bench/qcore's order and batches); the
        trained weights replace the model's."""
        pattern = "^(" + "|".join(re.escape(layer.weight) for layer in self.layers) + ")$"
        recipe = {"version": 1, "loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": self.lr},
                  "passes": [{"name": "trainable", "options": {"layers": "none", "include": [pattern], "syntax": "regex"}}]}
        with tempfile.TemporaryDirectory(prefix="qcore-diag-float-") as scratch:
            (Path(scratch) / "recipe.json").write_text(json.dumps(recipe))
            edgeplug.rewrite(self.model, Path(scratch) / "recipe.json", Path(scratch) / "out")
            ort = inference_runtime()
            options = ort.SessionOptions()
            options.enable_cpu_mem_arena = False
            options.intra_op_num_threads = qv.THREADS
            with captured_native_stderr():
                checkpoint, module, optimizer = open_artifacts(Path(scratch) / "out", session_options=options)
            names = list(module.input_names())
            module.train()
            optimizer.set_learning_rate(self.lr)
            batch = min(32, len(pool.y))
            for epoch in range(self.epochs):  # bench/qcore/backprop_train's order and batches
                order = np.random.default_rng([chunk, epoch]).permutation(len(pool.y))
                for start in range(0, len(pool.y), batch):
                    rows = order[start:start + batch]
                    feeds = {**pool.x[rows].arrays, "labels": pool.y[rows]}
                    module(*[feeds[name] for name in names])
                    optimizer.step()
                    module.lazy_reset_grad()
            trained = {layer.weight: np.asarray(checkpoint.parameters[layer.weight].data).copy() for layer in self.layers}
        for tensor in self.model.graph.initializer:
            if tensor.name in trained:
                tensor.CopyFrom(numpy_helper.from_array(trained[tensor.name].astype(np.float32), tensor.name))


class FloatThenQuantized(FloatBackprop):
    """FloatBackprop deployed quantized: after each calibration its float weights are put on the fixed integer grids
    (codes = Q(float weights)) and the quantized model (fixed activation grids) scores and recounts the coreset: a
    backprop calibration that keeps float weights on the device and ships the quantized model."""

    def __init__(self, folder: Path, seed: int, lr: float, epochs: int, reserve: float) -> None:
        super().__init__(folder, seed, lr, epochs, reserve)
        self.name = "floatq"
        self.state = QuantState.load(folder / "qcore" / "state.initial.npz")
        self.runner = QuantizedRunner(onnx.load(str(folder / "qcore" / "float.onnx")), self.state, probes=[], threads=qv.THREADS)
        self.runner.prepare([], self.coreset.x[:1])

    def logits(self, x: Examples) -> np.ndarray:
        return self.runner.logits(x)

    def step(self, x: Examples, y: np.ndarray, chunk: int) -> float:
        pool = self.coreset.pooled(x, y, chunk)
        self._train(pool, chunk)
        values = {tensor.name: tensor for tensor in self.model.graph.initializer}
        for layer in self.layers:
            matrix = layer.to_matrix(numpy_helper.to_array(values[layer.weight])).astype(np.float32)
            self.state.codes[layer.node] = quantize_weights(matrix, self.state.weight_grids[layer.node])
        correct = self.logits(pool.x).argmax(-1) == pool.y
        pool = recount(pool, correct, pool.origin == chunk, self.never)
        self.coreset = pool.subset(draw_reserved(pool.counts, pool.origin, self.size, self.reserve, self.rng))
        return 0.0


class QuantizedScoredInFloat:
    """The backprop row (straight-through, every quantized layer), scored by the float graph with its dequantized
    weights: no activation quantization at scoring (the training graph has none either)."""

    def __init__(self, method: Any) -> None:
        self.method = method
        self.name = "qfloat"
        self.state, self.runner = method.state, method.runner
        self._open()

    @property
    def coreset(self) -> Any:
        return self.method.coreset

    def _open(self) -> None:
        self.session = inference_session(dequantized_float_model(self.method.model, self.method.state), threads=qv.THREADS, arena=False)

    def logits(self, x: Examples) -> np.ndarray:
        return np.concatenate([self.session.run(["logits"], dict(x[s:s + 16].arrays))[0] for s in range(0, len(x), 16)])

    def accuracy(self, x: Examples, y: np.ndarray) -> float:
        return float((self.logits(x).argmax(-1) == y).mean())

    def step(self, x: Examples, y: np.ndarray, chunk: int) -> float:
        offline = float(self.method.step(x, y, chunk))
        self._open()
        return offline


class RangesRefreshed:
    """The backprop row with its activation ranges re-estimated after each calibration: the quantized layers' float
    inputs under the new codes, on the pool it trained on (coreset + chunk), give new per-tensor grids (as
    `edgeplug quantize` draws them from its calibration texts, same percentile and bits); the fine-tuned encoder's
    activations otherwise meet the ranges of the model it started from."""

    def __init__(self, method: Any) -> None:
        self.method = method
        self.name = "ranges"
        self.state = method.state

    @property
    def coreset(self) -> Any:
        return self.method.coreset

    @property
    def runner(self) -> Any:
        return self.method.runner

    def accuracy(self, x: Examples, y: np.ndarray) -> float:
        return float(self.method.accuracy(x, y))

    def step(self, x: Examples, y: np.ndarray, chunk: int) -> float:
        pool = self.method.coreset.pooled(x, y, chunk)
        offline = float(self.method.step(x, y, chunk))
        free = self.state.copy()
        free.activation_grids = {node: None for node in free.activation_grids}
        percentile = float(self.method.options["activation_percentile"])
        for layer, values in activation_samples(QuantizedRunner(self.method.model, free, threads=qv.THREADS), pool.x).items():
            if not layer.first:
                self.state.activation_grids[layer.node] = activation_grid(values, 8 if layer.last else self.state.bits, percentile)
        self.method.runner = QuantizedRunner(self.method.model, self.state, probes=[], threads=qv.THREADS)
        self.method.runner.prepare([], pool.x[:1])
        return offline


def variant(spec: str, folder: Path, data: dict[str, Any], settings: dict[str, Any]) -> Any:
    kind, *rest = spec.split(":")
    if kind == "none":
        return qv.make_method("none", folder, data["train"], 0, settings)
    if kind == "float-none":  # the float model, never stepped
        return FloatBackprop(folder, 0, 0.0, 0, 0.0)
    lr, epochs = float(rest[0]), int(rest[1])
    if kind == "float":
        return FloatBackprop(folder, 0, lr, epochs, float(settings.get("coreset_reserve", 0.0)))
    if kind == "floatq":
        return FloatThenQuantized(folder, 0, lr, epochs, float(settings.get("coreset_reserve", 0.0)))
    if kind == "ranges":
        method = qv.make_method("backprop", folder, data["train"], 0, {**settings, "backprop": lr})
        method.options["backprop_epochs"] = epochs
        return RangesRefreshed(method)
    if kind == "qfloat":
        method = qv.make_method("backprop", folder, data["train"], 0, {**settings, "backprop": lr})
        method.options["backprop_epochs"] = epochs
        return QuantizedScoredInFloat(method)
    row = {"q": "backprop", "head": "backprop_head"}[kind]
    method = qv.make_method(row, folder, data["train"], 0, {**settings, row: lr})
    method.options["backprop_epochs"] = epochs
    return method


def logits_of(method: Any, x: Examples) -> np.ndarray:
    return method.logits(x) if hasattr(method, "logits") else method.runner.logits(x)


def run(spec: str, folder: Path, data: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    method = variant(spec, folder, data, settings)
    start = {k: v.copy() for k, v in method.state.codes.items()} if hasattr(method, "state") else {}
    last = max((layer for layer in getattr(method, "runner", None).layers), key=lambda layer: layer.last).node if start else None
    rows = []
    scores: dict[int | None, float] = {}

    def score(domain: int | None) -> float:
        """Validation accuracy on the domain's texts (None: the tweets); scored once for a row that never changes."""
        if domain in scores:
            return scores[domain]
        value = method.accuracy(*(data["val0"] if domain is None else data["val_tests"][domain]))
        if spec in ("none", "float-none"):
            scores[domain] = value
        return value

    for k, (x, y, domain) in enumerate(data["val_chunks"], start=1):
        pool = method.coreset.pooled(x, y, k)
        before = logits_of(method, pool.x)
        tick = time.perf_counter()
        if spec != "float-none":
            method.step(x, y, k)
        seconds = time.perf_counter() - tick
        after = logits_of(method, pool.x)
        row = {"chunk": k, "domain": qv.STREAM[domain], "seconds": seconds,
               "pool_loss_before": float(cross_entropy(before, pool.y).mean()), "pool_loss_after": float(cross_entropy(after, pool.y).mean()),
               "chunk_acc_before": float((before[-len(y):].argmax(-1) == y).mean()),
               "chunk_acc_after": float((after[-len(y):].argmax(-1) == y).mean()),
               "new": score(domain), "original": score(None)}
        if start:
            moved = {node: int((method.state.codes[node] != codes).sum()) for node, codes in start.items()}
            sizes = {node: codes.size for node, codes in start.items()}
            row["moved_classifier"] = moved[last] / sizes[last]
            encoder = [node for node in start if node != last]
            row["moved_encoder"] = sum(moved[n] for n in encoder) / sum(sizes[n] for n in encoder)
        row["four"] = qv.four_domain(row["new"], row["original"])
        rows.append(row)
        print(f"  [{spec}] chunk {k} ({row['domain']}): pool loss {row['pool_loss_before']:.3f} -> {row['pool_loss_after']:.3f}, "
              f"chunk acc {row['chunk_acc_before']:.3f} -> {row['chunk_acc_after']:.3f}, moved "
              f"{row.get('moved_classifier', float('nan')):.4f}/{row.get('moved_encoder', float('nan')):.5f}, "
              f"new {row['new']:.3f} tweets {row['original']:.3f} ({seconds:.1f} s)", flush=True)
    summary = {key: float(np.mean([r[key] for r in rows])) for key in ("new", "original", "four", "pool_loss_before", "pool_loss_after")}
    print(f"  [{spec}] mean: {json.dumps(summary)}", flush=True)
    return {"chunks": rows, "summary": summary}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Why backprop calibration hardly beats none on the VADER stream (validation stream)", "",
             f"Command: `{result['command']}` ({result['minutes']:.0f} min, load average {result['load']:.1f} on 2 shared cores).", "",
             result["note"], "",
             "| variant | four domains | new | tweets | pool loss before → after (mean over chunks) | chunk accuracy before → after | "
             "codes moved from the start after the last chunk: classifier / encoder | s per calibration (median) |",
             "|---|---|---|---|---|---|---|---|"]
    for spec, r in result["variants"].items():
        s, rows = r["summary"], r["chunks"]
        moved = (f"{rows[-1]['moved_classifier']:.2%} / {rows[-1]['moved_encoder']:.3%}" if "moved_encoder" in rows[-1] else "-")
        lines.append(f"| {spec} | {s['four']:.3f} | {s['new']:.3f} | {s['original']:.3f} | {s['pool_loss_before']:.3f} → "
                     f"{s['pool_loss_after']:.3f} | {np.mean([c['chunk_acc_before'] for c in rows]):.3f} → "
                     f"{np.mean([c['chunk_acc_after'] for c in rows]):.3f} | {moved} | {np.median([c['seconds'] for c in rows]):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeplug-bench-qcore-vader"))
    parser.add_argument("--settings", type=Path, help="a qcore_vader checkpoint (NAME.partial.json): its lrs (coreset_reserve)")
    parser.add_argument("--variants", nargs="+", default=["none", "q:1e-5:3"])
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument("--name", default="qcore_vader_diag")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    shape = argparse.Namespace(train=600, val_check=200, test=400, chunk=40, chunks_per_domain=3, drift_examples=120, length=48)
    data = qv.make_data(shape, 0)
    settings = {"plain": False}
    if args.settings:
        settings.update({k: v for k, v in json.loads(args.settings.read_text())["lrs"].items() if k == "coreset_reserve"})
    folder = args.work / "out"
    staged = args.results / f"{args.name}.partial.json"
    result: dict[str, Any] = json.loads(staged.read_text()) if staged.is_file() else {"variants": {}}
    result["minutes"] = result.get("minutes", 0.0)
    for spec in args.variants:  # the tables are rewritten after each variant: a stopped run still reports
        if spec in result["variants"]:
            continue
        tick = time.perf_counter()
        result["variants"][spec] = run(spec, folder, data, settings)
        result.update({"command": "python bench/qcore_vader_diag.py " + " ".join(sys.argv[1:]), "note": args.note,
                       "minutes": result["minutes"] + (time.perf_counter() - tick) / 60, "load": os.getloadavg()[0],
                       "settings": settings})
        staged.write_text(json.dumps(result))
        (args.results / f"{args.name}.json").write_text(json.dumps(result, indent=1))
        (args.results / f"{args.name}.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
