"""QCore bench: forward-only continual calibration of a quantized CNN on a drifting digits stream.

Subject 0 is scikit-learn's digits as they are; subject k (1..10) applies its own
rotation, zoom, shift, contrast, brightness, blur and noise, growing with k. The
float model trains on subject 0 and is quantized by `edgeplug quantize`; then 10
chunks (one per subject) arrive. Per chunk we record accuracy on the new subject's
held-out images and on subject 0's, for: no recalibration, QCore (forward only),
QCore without flips (norm statistics + coreset only), backprop calibration on coreset
+ chunk, and experience replay (backprop on a random reservoir buffer of the same size
+ chunk). Time per calibration is measured in-process; peak memory of one calibration
in a fresh subprocess per method.

    nice python bench/qcore.py            # bits 8, 4, 2; a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import edgeplug
from edgeplug_plugins.qcore.backprop import backprop_artifacts, backprop_train
from edgeplug_plugins.qcore.build import DriftData, build, read_options, rebuild
from edgeplug_plugins.qcore.calibrate import Calibrator, refresh_norms
from edgeplug_plugins.qcore.coreset import Coreset, draw_reserved, recount
from edgeplug_plugins.qcore.qmodel import QuantizedRunner, QuantState

SUBJECTS = 10
CHUNK = 40
HAPT_CHUNK = 60
HAPT_DRIFT_USERS = (26, 27, 28, 29, 30)  # training users whose windows only feed the flip networks' targets
METHODS = ["none", "qcore", "qcore_all", "qcore_noflip", "qcore_heldout", "backprop", "replay"]
# QCore variants: option overrides of the folder's options (qcore = the defaults: last-layer flips)
VARIANTS: dict[str, dict[str, Any]] = {"qcore": {"flip_layers": "last"}, "qcore_all": {"flip_layers": "all"},
                                       "qcore_noflip": {"flip_rounds": 0}, "qcore_heldout": {"guard_split": 0.3},
                                       "qcore_descent": {"flip_proposal": "descent", "flip_search": True}}
BENCH = Path(__file__).resolve().parent
THREADS = 1  # onnxruntime intra-op threads of every method (pinned: 2 shared cores)


def cnn(seed: int = 0) -> onnx.ModelProto:
    """x[N,1,8,8] -> Conv8+BN+ReLU -> Conv16/2+BN+ReLU -> Flatten -> Gemm10."""
    rng = np.random.default_rng(seed)

    def init(name: str, value: Any) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value, np.float32), name)

    inits = [init("conv0.weight", rng.standard_normal((8, 1, 3, 3)) * np.sqrt(2 / 9)), init("conv0.bias", np.zeros(8)),
             init("bn0.scale", np.ones(8)), init("bn0.bias", np.zeros(8)), init("bn0.mean", np.zeros(8)), init("bn0.var", np.ones(8)),
             init("conv1.weight", rng.standard_normal((16, 8, 3, 3)) * np.sqrt(2 / 72)), init("conv1.bias", np.zeros(16)),
             init("bn1.scale", np.ones(16)), init("bn1.bias", np.zeros(16)), init("bn1.mean", np.zeros(16)), init("bn1.var", np.ones(16)),
             init("fc.weight", rng.standard_normal((256, 10)) / 16), init("fc.bias", np.zeros(10))]
    nodes = [helper.make_node("Conv", ["x", "conv0.weight", "conv0.bias"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c0", "bn0.scale", "bn0.bias", "bn0.mean", "bn0.var"], ["n0"], name="bn0"),
             helper.make_node("Relu", ["n0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("BatchNormalization", ["c1", "bn1.scale", "bn1.bias", "bn1.mean", "bn1.var"], ["n1"], name="bn1"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("Flatten", ["r1"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], name="fc")]
    graph = helper.make_graph(nodes, "digits_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench-qcore")
    model.ir_version = 8
    return model


def subject_params(k: int, rng: np.random.Generator) -> dict[str, float]:
    s = 0.3 + 0.7 * k / SUBJECTS
    return {"angle": float(rng.choice([-1, 1]) * s * rng.uniform(10, 25)), "zoom": float(1 + s * rng.uniform(-0.15, 0.15)),
            "dx": float(s * rng.uniform(-1, 1)), "dy": float(s * rng.uniform(-1, 1)),
            "contrast": float(1 - s * rng.uniform(0.2, 0.5)), "brightness": float(s * rng.uniform(0.0, 0.3)),
            "blur": float(s * rng.uniform(0.0, 0.7)), "noise": float(s * rng.uniform(0.03, 0.12))}


def distort(images: np.ndarray, p: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    out = []
    theta = np.deg2rad(p["angle"])
    matrix = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) / p["zoom"]
    centre = np.array([3.5, 3.5])
    offset = centre - matrix @ centre - np.array([p["dy"], p["dx"]])
    for image in images:
        warped = ndimage.affine_transform(image, matrix, offset=offset, order=1, mode="constant")
        if p["blur"] > 0:
            warped = ndimage.gaussian_filter(warped, p["blur"])
        out.append(warped)
    result = np.stack(out) * p["contrast"] + p["brightness"] + p["noise"] * rng.standard_normal(images.shape)
    return result.astype(np.float32)


def make_data(seed: int) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    images, labels = (digits.images / 16.0)[order], digits.target[order].astype(np.int64)
    train, test, pool = slice(0, 1000), slice(1000, 1397), slice(1397, None)
    data: dict[str, Any] = {"train": (images[train][:, None].astype(np.float32), labels[train]),
                            "test0": (images[test][:, None].astype(np.float32), labels[test]), "chunks": [], "tests": [], "params": []}
    for k in range(1, SUBJECTS + 1):
        params = subject_params(k, rng)
        picked = rng.choice(np.arange(len(labels))[pool], CHUNK, replace=False)
        data["chunks"].append((distort(images[picked], params, rng)[:, None], labels[picked]))
        data["tests"].append((distort(images[test], params, rng)[:, None], labels[test]))
        data["params"].append(params)
    # the flip networks learn from drifts like the deployed ones: 6 other subjects' distortions of training images
    drift_rng = np.random.default_rng(seed + 1000)
    xs, ys, domains = [], [], []
    for j in range(6):
        params = subject_params(int(drift_rng.integers(1, SUBJECTS + 1)), drift_rng)
        picked = drift_rng.choice(1000, 100, replace=False)
        xs.append(distort(images[train][picked], params, drift_rng)[:, None])
        ys.append(labels[train][picked])
        domains.append(np.full(100, j))
    data["drift"] = DriftData(np.concatenate(xs).astype(np.float32), np.concatenate(ys), np.concatenate(domains))
    return data


def make_hapt_data(seed: int) -> dict[str, Any]:
    """UCI HAPT: the float model trains on UCI's 21 training users (every 5th labelled stretch held out as the
    original users' test set), except HAPT_DRIFT_USERS, whose windows are the flip networks' drift data (real
    people the float model never saw, like the deployed drift); each of the 9 new users is one chunk of HAPT_CHUNK labelled windows drawn from
    its first recording, and its test set is its other recording(s) (no window shared or overlapping)."""
    sys.path.insert(0, str(BENCH))
    import hapt
    import hapt_model

    windows = hapt.load()
    train, held = hapt_model.source_split(windows, [u for u in hapt_model.SOURCE_USERS if u not in HAPT_DRIFT_USERS])
    drift = windows.select(users=HAPT_DRIFT_USERS)
    rng = np.random.default_rng(seed)
    data: dict[str, Any] = {"train": (train.x, train.y), "test0": (held.x, held.y), "chunks": [], "tests": [], "params": [],
                            "drift": DriftData(drift.x, drift.y, drift.users)}
    for user in hapt_model.NEW_USERS:
        first, rest = windows.select(users=[user], experiments=[0]), windows.select(users=[user])
        rest = rest.take(rest.experiments > 0)
        picked = rng.choice(len(first), min(HAPT_CHUNK, len(first)), replace=False)
        data["chunks"].append((first.x[picked], first.y[picked]))
        data["tests"].append((rest.x, rest.y))
        data["params"].append({"user": user, "chunk": int(len(picked)), "test": len(rest)})
    return data


WORKLOADS: dict[str, dict[str, Any]] = {
    "digits": {"results": "qcore", "epochs": 10, "batch_size": 32, "title": "a drifting digits stream"},
    "hapt": {"results": "qcore_hapt", "epochs": 15, "batch_size": 64, "title": "new users of UCI HAPT"},
}


def workload_model(workload: str) -> onnx.ModelProto:
    if workload == "hapt":
        sys.path.insert(0, str(BENCH))
        import hapt_model

        return hapt_model.build_cnn()
    return cnn()


def prepare(bits: int, data: dict[str, Any], work: Path, epochs: int, workload: str = "digits", batch_size: int = 32,
            records_from: Path | None = None, reflip: bool = False) -> Path:
    """Rewrite + `edgeplug quantize` at `bits`. With `records_from` (a folder built at another bit-width), the
    float model and forgetting records are taken from it and only quantization, coreset and flip networks
    are redone (`rebuild`): every bit-width then starts from the same float model. `reflip`: rebuild in place."""
    folder = work / f"bits{bits}"
    echo = lambda t: print(f"  [{bits} bits] {t}", flush=True)  # noqa: E731
    x, y = data["train"]
    drift = data.get("drift")
    if reflip and (folder / "qcore" / "records.npz").is_file():
        summary = rebuild(folder, {"x": x, "y": y}, echo=echo, drift_data=drift)
        (work / f"build{bits}.json").write_text(json.dumps(summary), encoding="utf-8")
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    lr = 0.003 if workload == "hapt" else 0.01
    recipe = {"version": 1, "loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": lr},
              "passes": [{"name": "qcore", "options": {"bits": bits, "coreset_size": 0.02, **({"backprop_lr": 0.05} if bits == 2 else {})}}]}
    (work / f"recipe{bits}.yaml").write_text(json.dumps(recipe), encoding="utf-8")
    edgeplug.rewrite(workload_model(workload), work / f"recipe{bits}.yaml", folder)
    if records_from is not None:
        (folder / "qcore").mkdir()
        for name in ("float.onnx", "records.npz"):
            shutil.copy(records_from / "qcore" / name, folder / "qcore" / name)
        summary = rebuild(folder, {"x": x, "y": y}, echo=echo, drift_data=drift)
    else:
        summary = build(folder, {"x": x, "y": y}, epochs=epochs, batch_size=batch_size, echo=echo, drift_data=drift)
    (work / f"build{bits}.json").write_text(json.dumps(summary), encoding="utf-8")
    return folder


class Method:
    """One recalibration method run over the stream from the same starting point."""

    def __init__(self, name: str, folder: Path, train: tuple[np.ndarray, np.ndarray], seed: int) -> None:
        self.name = name
        qdir = folder / "qcore"
        self.options = read_options(folder)
        self.state = QuantState.load(qdir / "state.initial.npz")
        self.model = onnx.load(str(qdir / "float.onnx"))
        self.rng = np.random.default_rng(seed)
        core = Coreset.load(qdir / "coreset.npz")
        self.size = len(core)
        if name == "replay":  # random buffer of the same size from the training data, then a reservoir over the stream
            picked = self.rng.choice(len(train[1]), self.size, replace=False)
            core = Coreset(train[0][picked], train[1][picked], np.zeros(self.size, np.int64), np.ones(self.size, bool), np.zeros(self.size, np.int64))
            self.seen = len(train[1])
        self.coreset = core
        self.never = int(json.loads((qdir / "build.json").read_text())["never_learned_count"])
        self.train_layers: list[str] | None = None  # backprop rows: the layer nodes that train (None: every quantized one)
        # backprop rows: latent float weights kept across the stream (straight-through; None: plain, requantized each chunk)
        self.latent: dict[str, np.ndarray] | None = None
        if name in VARIANTS:
            options = dict(self.options, **VARIANTS[name])
            self.calibrator = Calibrator(qdir, options, state=self.state, coreset=core, threads=THREADS)
            self.runner = self.calibrator.runner
        else:  # the norm-statistics sessions built and run once before any calibration, as the Calibrator does
            self.runner = QuantizedRunner(self.model, self.state, probes=[], threads=THREADS)
            self.runner.prepare([], core.x[:1])

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(self.runner.correct(x, y).mean())

    def step(self, x: np.ndarray, y: np.ndarray, chunk: int) -> float:
        """Calibrate on one chunk; returns the seconds spent on what a device would not do (building the
        backprop baseline's training artifacts, which a device ships prebuilt): 0 for QCore."""
        if self.name == "none":
            return 0.0
        if self.name in VARIANTS:
            self.calibrator.step(x, y, chunk)
            return 0.0
        pool = self.coreset.pooled(x, y, chunk)
        # the same guarded statistics step as QCore (held-out rows drawn the same way), then backprop on everything
        share = float(self.options["guard_split"])
        held = np.sort(self.rng.choice(len(y), size=min(len(y) - 1, int(round(share * len(y)))), replace=False))
        check = self.coreset.pooled(x[held], y[held], chunk) if len(held) else pool
        refresh_norms(self.runner, pool, check, chunk, float(self.options["norm_momentum"]), bool(self.options["flip_guard"]))
        with tempfile.TemporaryDirectory(prefix="qcore-bench-backprop-") as scratch:
            self.before_offline()
            tick = time.perf_counter()
            artifacts = backprop_artifacts(self.model, self.state, Path(scratch), lr=float(self.options["backprop_lr"]),
                                           layers=self.train_layers)
            offline = time.perf_counter() - tick
            self.after_offline()
            tuned = backprop_train(artifacts, self.model, self.state, pool.x, pool.y, epochs=int(self.options["backprop_epochs"]),
                                   lr=float(self.options["backprop_lr"]), seed=chunk, threads=THREADS, latent=self.latent)
        self.state.codes.update(tuned.codes)
        if self.name == "backprop":  # the coreset is kept by forgetting, as QCore keeps it
            pool = recount(pool, self.runner.correct(pool.x, pool.y), pool.origin == chunk, self.never)
            reserve = float(self.options.get("coreset_reserve", 0.0))  # the qcore row's coreset policy, when given
            self.coreset = pool.subset(draw_reserved(pool.counts, pool.origin, self.size, reserve, self.rng))
        else:  # reservoir sampling: every example seen so far equally likely to be in the buffer
            keep = self.coreset
            for i in range(len(y)):
                self.seen += 1
                j = int(self.rng.integers(self.seen))
                if j < self.size:
                    keep.x[j], keep.y[j] = x[i], y[i]
            self.coreset = keep
        return offline

    def before_offline(self) -> None:
        """Called before the offline part of a calibration (the memory worker closes its window here)."""

    def after_offline(self) -> None:
        """Called once the offline part of a calibration is done (the memory worker opens a window here)."""


def run_stream(bits: int, folder: Path, data: dict[str, Any], seed: int, methods: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in methods:
        method = Method(name, folder, data["train"], seed)
        rows = []
        for k, (x, y) in enumerate(data["chunks"], start=1):
            tick = time.perf_counter()
            offline = method.step(x, y, k)
            seconds = time.perf_counter() - tick - offline
            rows.append({"chunk": k, "new": method.accuracy(*data["tests"][k - 1]), "original": method.accuracy(*data["test0"]),
                         "seconds": seconds, "offline_seconds": offline})
        results[name] = {"chunks": rows, "mean_new": float(np.mean([r["new"] for r in rows])),
                         "mean_original": float(np.mean([r["original"] for r in rows])),
                         "median_seconds": float(statistics.median(r["seconds"] for r in rows)),
                         "median_offline_seconds": float(statistics.median(r["offline_seconds"] for r in rows))}
        print(f"  [{bits} bits] {name:<13} new {results[name]['mean_new']:.3f}  original {results[name]['mean_original']:.3f}  "
              f"median {results[name]['median_seconds']:.3f} s/calibration", flush=True)
    return results


def interleaved_timing(folder: Path, data: dict[str, Any], seed: int, repeats: int, methods: list[str]) -> dict[str, list[float]]:
    """Seconds per calibration of chunk 1 from the initial state, methods alternating, `repeats` times each:
    the side-by-side ratio the stream's medians cannot give on a machine whose load changes by the minute."""
    times: dict[str, list[float]] = {m: [] for m in methods}
    x, y = data["chunks"][0]
    for _ in range(repeats):
        for name in methods:
            method = Method(name, folder, data["train"], seed)
            method.accuracy(x, y)  # sessions warm, as in the memory worker
            tick = time.perf_counter()
            offline = method.step(x, y, 1)
            times[name].append(time.perf_counter() - tick - offline)
    return times


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(method: str, folder: str, data_path: str) -> None:
    """Calibrations of chunks 1 and 2 in this fresh process; prints their peak RSS as JSON.

    The high-water mark is reset (/proc/self/clear_refs) once the model and data are
    loaded and the sessions are warm, and again before chunk 2: chunk 1's window holds
    one-time costs of the process (first use of library paths), chunk 2's is the steady
    state of a device calibrating chunk after chunk. The backprop rows build their
    training artifacts in the middle of each calibration (the offline part, not counted):
    their calibration is measured in two windows, before the build and after it, each from
    the resident size at its start (memory the build freed but the process kept may serve
    the training: if anything this understates backprop). `added` is the larger window's
    peak over its start.
    """
    arrays = np.load(data_path)
    train = (arrays["train_x"], arrays["train_y"])
    m = Method(method, Path(folder), train, 0)
    m.accuracy(arrays["x1"], arrays["y1"])  # sessions built and warm before the measured part
    windows: list[list[int]] = []  # [start RSS, peak] of each counted window

    def open_window() -> None:
        windows.append([_status_kib("VmRSS") * 1024, 0])
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS

    def close_window() -> None:
        windows[-1][1] = _status_kib("VmHWM") * 1024

    m.before_offline, m.after_offline = close_window, open_window  # type: ignore[method-assign]
    out: dict[str, Any] = {}
    for k in (1, 2):
        windows.clear()
        open_window()
        tick = time.perf_counter()
        offline = m.step(arrays[f"x{k}"], arrays[f"y{k}"], k)
        seconds = time.perf_counter() - tick - offline
        close_window()
        out[f"chunk{k}"] = {"peak_rss": max(peak for _, peak in windows), "loaded_rss": windows[0][0],
                            "added": max(peak - start for start, peak in windows), "windows": [list(w) for w in windows],
                            "seconds": seconds, "offline_seconds": offline}
    print(json.dumps({**out["chunk2"], "first_chunk": out["chunk1"]}))


def measure_memory(folder: Path, data: dict[str, Any], work: Path, methods: list[str]) -> dict[str, Any]:
    path = work / "chunks12.npz"
    np.savez(path, x1=data["chunks"][0][0], y1=data["chunks"][0][1], x2=data["chunks"][1][0], y2=data["chunks"][1][1],
             train_x=data["train"][0], train_y=data["train"][1])
    out = {}
    # glibc maps large buffers and gives them back when freed (as edgeplug's staged trainer sets it), for every row
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    for method in [m for m in ("none", "qcore", "qcore_all", "backprop", "replay") if m in methods]:
        proc = subprocess.run([sys.executable, __file__, "--worker", method, str(folder), str(path)],
                              capture_output=True, text=True, check=True, env=env)
        out[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def paired_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of a - b with a 95% t interval over the paired items (chunks = new subjects): bench.protocol.stats."""
    sys.path.insert(0, str(BENCH.parent))
    from bench.protocol.stats import paired_t

    d = paired_t(a, b)
    return d.mean, d.low, d.high


def markdown(result: dict[str, Any]) -> str:
    workload = result.get("workload", "digits")
    subjects = len(result["subjects"])
    if workload == "hapt":
        setting = (f"UCI HAPT, 1D-CNN (bench/hapt_model.py) trained by `edgeplug quantize` on UCI's 21 training users "
                   f"({result['train_examples']} windows); {subjects} new users arrive one after the other, each as one chunk of "
                   f"labelled windows from its first recording; accuracy after its calibration on its other recording(s) "
                   f"(new user) and on held-out stretches of the 21 training users (original)")
    else:
        setting = (f"{subjects} chunks of {CHUNK} labelled images, one per new subject; training data {result['train_examples']} "
                   "images of subject 0; accuracy measured after each chunk's calibration on the new subject's 397 held-out "
                   "images and on subject 0's")
    lines = [f"# QCore: continual calibration on {WORKLOADS[workload]['title']}", "",
             f"Command: `{result['command']}`. {setting}; coreset/buffer {result['buffer']} examples "
             f"({result['buffer'] / result['train_examples']:.1%} of the training data). Accuracy = mean over the chunks. "
             "Paired differences: mean over chunks (new subjects) with a 95% t interval. "
             f"Times: median per calibration in one process, side by side, one onnxruntime thread for every method (2 shared "
             f"cores, load {result.get('load', 0):.1f}: noisy). Backprop and replay count what a device does: the guarded "
             "norm-statistics step, opening their training artifacts, the training steps (no checkpoint written) and "
             "requantizing; building the artifacts (rewrite) is offline, as a device ships them, and shown apart. "
             "Peak RSS: one calibration of chunk 1 in a fresh subprocess per method, high-water mark reset after loading the "
             "model and data; backprop's artifact build is left out of the window (the 'none' row is the loaded process).", ""]
    for bits, block in result["bits"].items():
        lines += [f"## {bits} bits", "", f"Quantized model {block['build']['quantized_bytes']} bytes vs float {block['build']['float_bytes']} bytes "
                  f"({block['build']['quantized_bytes'] / block['build']['float_bytes']:.1%}); float-model records at "
                  f"{block['build']['record_bits']} bits: final accuracy {[r[-1] for r in block['build']['record_accuracy']]}.", "",
                  "| method | new subject | original | median s / calibration | offline s (artifacts) | peak RSS MiB | "
                  "peak RSS added by 1 calibration, MiB |", "|---|---|---|---|---|---|---|"]
        for name in [m for m in METHODS if m in block["stream"]]:
            r = block["stream"][name]
            mem = block["memory"].get(name)
            added = mem.get("added", mem["peak_rss"] - mem["loaded_rss"]) if mem else 0
            lines.append(f"| {name} | {r['mean_new']:.3f} | {r['mean_original']:.3f} | {r['median_seconds']:.3f} | "
                         f"{r.get('median_offline_seconds', 0):.2f} | "
                         + (f"{mem['peak_rss'] / 2**20:.0f} | {added / 2**20:.1f}" if mem else "- | -") + " |")
        if "timing" in block:
            t = {m: statistics.median(v) for m, v in block["timing"].items()}
            lines += ["", f"Interleaved timing, chunk 1 from the initial state, {len(block['timing']['backprop'])} runs each: "
                      + ", ".join(f"{m} median {t[m]:.3f} s" for m in t if m != "backprop")
                      + f", backprop {t['backprop']:.3f} s: "
                      + ", ".join(f"{m} **{t['backprop'] / t[m]:.1f}x** faster" for m in t if m != "backprop")
                      + f" (load {result.get('load', 0):.1f})."]
        ran = [m for m in METHODS if m in block["stream"]]
        if "qcore" in ran:
            lines += ["", "| qcore minus | new subject: mean [95% CI] | original: mean [95% CI] |", "|---|---|---|"]
            q = block["stream"]["qcore"]["chunks"]
            for other in [m for m in ran if m != "qcore"]:
                o = block["stream"][other]["chunks"]
                cells = []
                for key in ("new", "original"):
                    mean, low, high = paired_interval([r[key] for r in q], [r[key] for r in o])
                    cells.append(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]")
                lines.append(f"| {other} | {cells[0]} | {cells[1]} |")
        lines += ["", "Per chunk, accuracy on the new subject:", "", "| chunk | " + " | ".join(ran) + " |", "|---" * (len(ran) + 1) + "|"]
        for k in range(subjects):
            label = result["subjects"][k].get("user", k + 1) if workload == "hapt" else k + 1
            lines.append(f"| {label} | " + " | ".join(f"{block['stream'][m]['chunks'][k]['new']:.3f}" for m in ran) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from plotting import accuracy_axis

    blocks = result["bits"]
    fig, axes = plt.subplots(1, len(blocks), figsize=(5 * len(blocks), 4), squeeze=False)
    for axis, (bits, block) in zip(axes[0], blocks.items()):
        for name in [m for m in METHODS if m in block["stream"]]:
            rows = block["stream"][name]["chunks"]
            line, = axis.plot([r["chunk"] for r in rows], [r["new"] for r in rows], marker="o", label=f"{name} (new)")
            axis.plot([r["chunk"] for r in rows], [r["original"] for r in rows], linestyle="--", color=line.get_color(), alpha=0.5)
        accuracy_axis(axis, [r[key] for name in METHODS if name in block["stream"] for r in block["stream"][name]["chunks"]
                             for key in ("new", "original")])
        axis.set_title(f"{bits} bits: new subject (solid), original (dashed)")
        axis.set_xlabel("chunk / subject")
        axis.set_ylabel("accuracy")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="digits")
    parser.add_argument("--epochs", type=int, default=None, help="float-model epochs (default: the workload's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--reuse", action="store_true", help="reuse the quantized folders in --work (skip rewrite + quantize)")
    parser.add_argument("--timing", type=int, default=0, metavar="N",
                        help="also time N interleaved calibrations of chunk 1 per method (qcore, backprop), side by side")
    parser.add_argument("--reflip", action="store_true", help="keep the float models and records in --work, redo quantization, "
                        "coreset and flip networks (edgeplug quantize --reuse-records)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeplug-bench-qcore"))
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "FOLDER", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    spec = WORKLOADS[args.workload]
    data = make_hapt_data(args.seed) if args.workload == "hapt" else make_data(args.seed)
    result: dict[str, Any] = {"command": "python bench/qcore.py " + " ".join(sys.argv[1:]), "workload": args.workload,
                              "train_examples": len(data["train"][1]), "subjects": data["params"], "bits": {}}
    first: Path | None = None
    for bits in args.bits:
        if args.reuse:
            folder = args.work / f"bits{bits}"
        else:
            folder = prepare(bits, data, args.work, args.epochs or spec["epochs"], args.workload, spec["batch_size"],
                             records_from=first, reflip=args.reflip)
        first = first or folder
        build_summary = json.loads((args.work / f"build{bits}.json").read_text())
        result["buffer"] = build_summary["coreset_size"]
        stream = run_stream(bits, folder, data, args.seed, args.methods)
        memory = measure_memory(folder, data, args.work, args.methods)
        result["bits"][str(bits)] = {"build": build_summary, "stream": stream, "memory": memory}
        if args.timing:
            result["bits"][str(bits)]["timing"] = interleaved_timing(folder, data, args.seed, args.timing,
                                                                     [m for m in ("qcore", "qcore_all", "backprop") if m in args.methods])
    result["load"] = os.getloadavg()[0]
    write_results(args.results, spec["results"], result, markdown, plot)


def write_results(folder: Path, stem: str, result: dict[str, Any], markdown: Callable[[dict[str, Any]], str],
                  plot: Callable[[dict[str, Any], Path], None]) -> None:
    """STEM.json, STEM.md (`markdown(result)`) and STEM.png (`plot`) under `folder`; prints the Markdown."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    text = markdown(result)
    (folder / f"{stem}.md").write_text(text, encoding="utf-8")
    plot(result, folder / f"{stem}.png")
    print(text)


if __name__ == "__main__":
    main()
