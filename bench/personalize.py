"""Bench of the personalize pass: backprop-free personalisation under per-domain distortions of digits.

A CNN (Conv-BN-ReLU x3, GAP, linear) is trained with edgeplug on clean scikit-learn
digits (source half of the images), then each *domain* distorts images with its own
contrast, brightness, gamma, blur, noise, one-pixel shift and (half of them)
inversion. The generator trains on many source domains (source images); unseen
target domains use the other half of the images: per target domain the device has
`--device-samples` unlabelled images and the rest is the test set.

Rows, all evaluated with the same device model and test sets:
  none        the model as it is
  stats       device re-estimates batch-norm statistics (forward only)
  prototype   device builds a T3A-like prototype classifier (forward only)
  generated   device: statistics + 8-bit anchors (forward only); cloud: one generator forward pass
  fta         device fine-tunes the same slots with the labels of its samples (edgeplug Trainer, backprop)
  fta_stats   device re-estimates statistics, rebuilds the training artifacts with them, then fine-tunes as fta

Every device-side personalisation runs in a fresh child process (`--child`), which
reports its wall time and peak RSS (VmHWM). Writes bench/results/personalize.{md,json,png}.

    nice python bench/personalize.py            # ~12 min on 2 shared cores
    nice python bench/personalize.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
RESULTS = BENCH / "results"
METHODS = ("none", "stats", "prototype", "generated", "fta", "fta_stats")
LABELS = {"none": "no adaptation", "stats": "stats re-estimation", "prototype": "prototype classifier (T3A-like)",
          "generated": "generated parameters (ours)", "fta": "fine-tuning with labels (FTA)",
          "fta_stats": "stats re-estimation + FTA", "augmented": "base model trained with placement augmentation, no adaptation"}


# -- data --------------------------------------------------------------------------------------

def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def draw_domain(rng: np.random.Generator) -> dict[str, Any]:
    return {"contrast": float(rng.uniform(0.5, 1.5)), "brightness": float(rng.uniform(-0.3, 0.3)),
            "gamma": float(np.exp(rng.uniform(np.log(0.6), np.log(1.7)))), "invert": bool(rng.random() < 0.5),
            "blur": float(rng.uniform(0.0, 0.6)), "noise": float(rng.uniform(0.0, 0.1)),
            "shift": [int(rng.integers(-1, 2)), int(rng.integers(-1, 2))]}


def distort(images: np.ndarray, domain: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    x = np.clip(images, 0, 1) ** domain["gamma"]
    if domain["blur"] > 0.05:
        x = gaussian_filter(x, sigma=(0, domain["blur"], domain["blur"]), mode="constant")
    x = np.roll(x, domain["shift"], axis=(1, 2))
    if domain["invert"]:
        x = 1.0 - x
    x = domain["contrast"] * x + domain["brightness"] + rng.standard_normal(x.shape) * domain["noise"]
    return x.astype(np.float32)[:, None]


# -- setup: base model, artifacts, generator -----------------------------------------------------

def recipe(passes: list[dict[str, Any]], lr: float) -> Any:
    from edgeplug.recipe import recipe_from_dict

    return recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": lr}, "passes": passes})


def build_cnn(seed: int, channels: tuple[int, ...] = (16, 32, 32)) -> Any:
    """Conv-BN-ReLU x3 (stride 1, 2, 2), global average pooling, linear head; He init from numpy seed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def param(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    previous, width = "image", 1
    for i, size in enumerate(channels):
        stride = 2 if i > 0 else 1
        weight = param(f"features.{i}.conv.weight", rng.standard_normal((size, width, 3, 3)) * np.sqrt(2.0 / (9 * width)))
        bias = param(f"features.{i}.conv.bias", np.zeros(size))
        nodes.append(helper.make_node("Conv", [previous, weight, bias], [f"conv{i}"], name=f"features.{i}.conv",
                                      pads=[1, 1, 1, 1], strides=[stride, stride]))
        bn = [param(f"features.{i}.bn.{p}", v) for p, v in
              (("weight", np.ones(size)), ("bias", np.zeros(size)), ("running_mean", np.zeros(size)), ("running_var", np.ones(size)))]
        nodes.append(helper.make_node("BatchNormalization", [f"conv{i}", *bn], [f"bn{i}"], name=f"features.{i}.bn",
                                      epsilon=1e-5, momentum=0.9))
        nodes.append(helper.make_node("Relu", [f"bn{i}"], [f"relu{i}"], name=f"features.{i}.relu"))
        previous, width = f"relu{i}", size
    bound = 1.0 / np.sqrt(width)
    nodes += [
        helper.make_node("GlobalAveragePool", [previous], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", param("classifier.weight", rng.uniform(-bound, bound, (10, width))),
                                  param("classifier.bias", rng.uniform(-bound, bound, 10))], ["logits"], name="classifier", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeplug-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def base_model(work: Path, images: np.ndarray, labels: np.ndarray, epochs: int) -> Path:
    """Train on clean source images, then set BN running statistics to the source data's (precise BN)."""
    import onnx

    import edgeplug
    from edgeplug.modelio import save_model
    from edgeplug_plugins.personalize import baselines
    from edgeplug_plugins.personalize.device import DeviceModel, personalised_model

    onnx.save(build_cnn(0), str(work / "cnn.onnx"))
    edgeplug.rewrite(work / "cnn.onnx", recipe([], 0.01), work / "base-train", force=True)
    edgeplug.Trainer(work / "base-train", progress=False).fit({"image": images[:, None], "y": labels}, epochs=epochs, batch_size=32)
    edgeplug.export(work / "base-train", work / "trained.onnx")
    edgeplug.rewrite(work / "trained.onnx", recipe([{"name": "personalize"}], 0.01), work / "calibrate", force=True)
    device = DeviceModel(work / "calibrate")
    save_model(personalised_model(device, baselines.statistics(device, images[:, None])), work / "base.onnx")
    return work / "base.onnx"


PERSONALIZE_RECIPE = [{"name": "personalize", "options": {"slots": ["classifier", "normalization"]}},
                      {"name": "freeze-bn", "options": {"layers": "all"}}]


# -- children: one device-side personalisation each ------------------------------------------------

def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(job: dict[str, Any]) -> dict[str, Any]:
    """Run one device-side method; return its wall time and peak RSS. Imports count: a device loads them too."""
    started = time.perf_counter()
    method, art, folder = job["method"], Path(job["artifacts"]), Path(job["folder"])
    import edgeplug_plugins.personalize as plugin
    from edgeplug import cli
    from edgeplug.plugins import default_host

    if "personalize" not in default_host().plugin_names():
        default_host().register(plugin, name="personalize", version="bench")
    device_data = str(folder / "device.npz")
    if method in ("stats", "prototype"):
        status = cli.main(["personalize", "baseline", str(art), "--data", device_data, "--method", method,
                           "-o", str(folder / f"{method}.npz")])
    elif method == "generated":
        status = cli.main(["personalize", "anchors", str(art), "--data", device_data, "-o", str(folder / "anchors.npz"),
                           "--generator", job["generator"], "--statistics", str(folder / "device-stats.npz")])
    elif method in ("fta", "fta_stats"):
        status = fine_tune(art, folder, job, with_statistics=method == "fta_stats")
    else:
        raise SystemExit(f"unknown method {method}")
    return {"status": status, "seconds": time.perf_counter() - started, "peak_rss": vm_hwm()}


def fine_tune(art: Path, folder: Path, job: dict[str, Any], *, with_statistics: bool) -> int:
    """FTA: train the slot parameters with labels (backprop on the device), then save them as a slot file.

    `with_statistics`: first re-estimate the BN statistics on the device samples and rebuild the training
    artifacts from the model with those statistics (the fine-tune then starts where `stats` ends)."""
    import onnx
    from onnx import numpy_helper

    import edgeplug
    from edgeplug.modelio import save_model
    from edgeplug_plugins.personalize import baselines
    from edgeplug_plugins.personalize.device import DeviceModel, personalised_model
    from edgeplug_plugins.personalize.manifest import load_manifest
    from edgeplug_plugins.personalize.slotfile import write_slots

    data = dict(np.load(folder / "device-labelled.npz"))
    name = "fta_stats" if with_statistics else "fta"
    copy = folder / f"{name}-artifacts"
    shutil.rmtree(copy, ignore_errors=True)
    if with_statistics:
        device = DeviceModel(art)
        stats = baselines.statistics(device, data["x"])
        save_model(personalised_model(device, stats), folder / "stats-model.onnx")
        edgeplug.rewrite(folder / "stats-model.onnx", recipe(PERSONALIZE_RECIPE, job["fta_lr"]), copy)
    else:
        stats = {}
        shutil.copytree(art, copy, ignore=shutil.ignore_patterns("checkpoints"))
    trainer = edgeplug.Trainer(copy, progress=False, lr=job["fta_lr"], seed=0)
    trainer.fit({job.get("input", "image"): data["x"], "y": data["y"]}, epochs=job["fta_epochs"], batch_size=job["fta_batch"])
    edgeplug.export(copy, folder / f"{name}.onnx")
    manifest, _ = load_manifest(art)
    names = {s.name for s in manifest.parameter_slots()}
    values = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(folder / f"{name}.onnx")).graph.initializer if t.name in names}
    write_slots(folder / f"{name}.npz", {**stats, **values}, manifest, name)
    return 0


def run_child(job: dict[str, Any], work: Path) -> dict[str, Any]:
    path = work / f"job-{job['method']}.json"
    path.write_text(json.dumps(job))
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(path)], capture_output=True,
                            text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"child {job['method']} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- the run -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--source-domains", type=int, default=192)
    parser.add_argument("--target-domains", type=int, default=12)
    parser.add_argument("--device-samples", type=int, default=256)
    parser.add_argument("--count", type=int, default=8, help="anchors per device")
    parser.add_argument("--steps", type=int, default=6000, help="generator training steps")
    parser.add_argument("--base-epochs", type=int, default=15)
    parser.add_argument("--fta-epochs", type=int, default=60)
    parser.add_argument("--fta-lr", type=float, default=0.03)
    parser.add_argument("--fta-batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 12 source, 3 target domains, 300 steps")
    parser.add_argument("--workload", choices=["digits", "hapt"], default="digits",
                        help="hapt: UCI HAPT, source domains = UCI's 21 training users, targets = the 9 others")
    parser.add_argument("--placements", type=int, default=0, metavar="K",
                        help="hapt: each source user also under K random phone placements, new users also measured placed")
    parser.add_argument("--augment-copies", type=int, default=4, help="hapt with --placements: placed copies of the training "
                        "windows for the placement-augmented base model")
    parser.add_argument("--draws", type=int, default=8, help="device-sized draws per source domain for the generator")
    parser.add_argument("--reuse-generator", action="store_true", help="hapt: reuse the generator trained in --work by an earlier "
                        "run with the same settings (the rest is redone)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeplug-bench-personalize"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--name", default="personalize")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(Path(args.child).read_text()))))
        return
    if args.quick:
        args.source_domains, args.target_domains, args.steps, args.fta_epochs = 12, 3, 300, 10
    if args.workload == "hapt":
        run_hapt(args)
    else:
        run(args)


def run(args: argparse.Namespace) -> None:
    import edgeplug
    from edgeplug_plugins.personalize.device import DeviceModel, accuracy
    from edgeplug_plugins.personalize.generator import (
        GeneratorOptions,
        load_domains,
        train_generator,
    )

    started = time.perf_counter()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    images, labels = digits()
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(images))
    source, target = order[: len(order) // 2], order[len(order) // 2:]
    print(f"base model: training on {len(source)} clean source images", flush=True)
    base = base_model(work, images[source], labels[source], args.base_epochs)
    art = work / "art"
    edgeplug.rewrite(base, recipe(PERSONALIZE_RECIPE, args.fta_lr), art, force=True)
    device = DeviceModel(art)
    clean = accuracy(device.logits(images[target][:, None]), labels[target])
    print(f"clean target-image accuracy {clean:.4f}", flush=True)

    domains = [draw_domain(rng) for _ in range(args.source_domains + args.target_domains)]
    source_domains, target_domains = domains[: args.source_domains], domains[args.source_domains:]
    xs = [distort(images[source], d, rng) for d in source_domains]
    arrays = {"x": np.concatenate(xs), "y": np.tile(labels[source], len(xs)),
              "domain": np.repeat(np.arange(len(xs)), len(source))}
    np.savez(work / "domains.npz", **arrays)
    options = GeneratorOptions(steps=args.steps, device_samples=args.device_samples, count=args.count, seed=args.seed, lr=1e-3)
    cloud_started = time.perf_counter()
    info = train_generator(art, load_domains(arrays, device, "domains"), work / "generator", options, force=True,
                           echo=lambda text: print("  " + text, flush=True))
    generator_seconds = time.perf_counter() - cloud_started

    from edgeplug_plugins.personalize.generator import Generator

    generator = Generator(work / "generator")
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    for number, domain in enumerate(target_domains):
        folder = work / f"target-{number}"
        folder.mkdir()
        x = distort(images[target], domain, rng)
        y = labels[target]
        device_idx, test_idx = np.arange(args.device_samples), np.arange(args.device_samples, len(target))
        np.savez(folder / "device.npz", x=x[device_idx])
        np.savez(folder / "device-labelled.npz", x=x[device_idx], y=y[device_idx])
        x_test, y_test = x[test_idx], y[test_idx]
        raw_bytes = int(x[device_idx].nbytes)
        line = []
        for method in METHODS:
            entry = {"domain": number, **personalise(method, device, art, folder, work, generator, args,
                                                     x_test, y_test, raw_bytes)}
            rows[method].append(entry)
            line.append(f"{method} {entry['accuracy']:.3f}")
        print(f"target domain {number} (invert={domain['invert']}): " + ", ".join(line), flush=True)

    result = summarise(args, rows, info, generator_seconds, clean, time.perf_counter() - started, target_domains)
    write_results(result, args.results, args.name)


# -- UCI HAPT: real people as domains ----------------------------------------------------------------

def run_hapt(args: argparse.Namespace) -> None:
    """Source domains = UCI's 21 training users (the base model was pretrained on them); target domains = the 9
    held-out users. Per target user the device holds up to --device-samples unlabelled windows of its first
    recording; its test set is its other recording(s).

    With --placements K, every source user is also a source domain under K random phone placements
    (`hapt.random_placement`: the phone turned, flipped and tilted on the belt, per-axis gains), the slots
    include the first convolution's weights (a placement mixes the input axes, which no per-channel slot can
    undo) and the anchors also read the raw input's per-channel statistics; the 9 new users are measured as
    recorded and again each under its own random placement, beside a base model trained with the same
    placement augmentation (the obvious way not to need adaptation)."""
    import edgeplug
    from edgeplug_plugins.personalize.device import DeviceModel, accuracy
    from edgeplug_plugins.personalize.generator import Generator, GeneratorOptions, load_domains, train_generator

    sys.path.insert(0, str(BENCH))
    import hapt
    import hapt_model

    started = time.perf_counter()
    work = args.work
    reuse = bool(args.reuse_generator) and (work / "generator" / "generator.json").is_file()
    kept = work.parent / f"{work.name}.generator"
    if reuse:  # keep the trained generator aside while the rest of the work folder is redone
        shutil.rmtree(kept, ignore_errors=True)
        shutil.move(str(work / "generator"), str(kept))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if reuse:
        shutil.move(str(kept), str(work / "generator"))
    windows = hapt.load()
    base = hapt_model.pretrained(echo=lambda text: print("  " + text, flush=True))
    placed = args.placements > 0
    passes = [dict(step) for step in PERSONALIZE_RECIPE]
    if placed:
        passes[0] = {"name": "personalize", "options": {"slots": ["classifier", "normalization", "conv0.weight"],
                                                         "features": [hapt_model.INPUT, "conv0", "conv1", "conv2", "features"]}}
    art = work / "art"
    edgeplug.rewrite(base, recipe(passes, args.fta_lr), art, force=True)
    device = DeviceModel(art)
    source = windows.select(users=hapt_model.SOURCE_USERS)
    rng = np.random.default_rng(args.seed)
    xs, ys, ids, source_placements = [source.x], [source.y], [source.users * 100], []
    for user in hapt_model.SOURCE_USERS:
        mine = source.select(users=[user])
        for k in range(1, args.placements + 1):
            placement = hapt.random_placement(rng)
            source_placements.append({"user": user, **placement.to_dict()})
            xs.append(placement.apply(mine.x))
            ys.append(mine.y)
            ids.append(np.full(len(mine), user * 100 + k))
    arrays = {"x": np.concatenate(xs), "y": np.concatenate(ys), "domain": np.concatenate(ids)}
    del xs
    options = GeneratorOptions(steps=args.steps, device_samples=args.device_samples, count=args.count, seed=args.seed, lr=1e-3,
                               draws=args.draws)
    if reuse:
        info = json.loads((work / "generator" / "generator.json").read_text(encoding="utf-8"))
        generator_seconds = float(info["training"].get("seconds", 0.0))
        print(f"  reusing the generator in {work / 'generator'} (trained in {generator_seconds:.0f} s)", flush=True)
    else:
        cloud_started = time.perf_counter()
        info = train_generator(art, load_domains(arrays, device, "domains"), work / "generator", options, force=True,
                               echo=lambda text: print("  " + text, flush=True))
        generator_seconds = time.perf_counter() - cloud_started
    del arrays
    generator = Generator(work / "generator")
    augmented = None
    if placed:
        print("  placement-augmented base model", flush=True)
        augmented = DeviceModel(_plain_artifacts(hapt_model.pretrained(hapt_model.Settings(placements=args.augment_copies),
                                                                   echo=lambda text: print("  " + text, flush=True)), work))
    conditions = {"as recorded": {user: hapt.AS_RECORDED for user in hapt_model.NEW_USERS}}
    if placed:
        target_rng = np.random.default_rng([args.seed, 1])
        conditions["placed"] = {user: hapt.random_placement(target_rng) for user in hapt_model.NEW_USERS}
    methods = [*METHODS, "augmented"] if placed else list(METHODS)
    results = {}
    for condition, placements in conditions.items():
        rows: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        targets = []
        for user in hapt_model.NEW_USERS:
            placement = placements[user]
            folder = work / f"{condition.replace(' ', '-')}-user-{user}"
            folder.mkdir()
            first, rest = windows.select(users=[user], experiments=[0]), windows.select(users=[user])
            rest = rest.take(rest.experiments > 0)
            picked = np.sort(rng.choice(len(first), min(args.device_samples, len(first)), replace=False))
            device_x, test_x = placement.apply(first.x[picked]), placement.apply(rest.x)
            np.savez(folder / "device.npz", x=device_x)
            np.savez(folder / "device-labelled.npz", x=device_x, y=first.y[picked])
            targets.append({"user": user, "device_windows": int(len(picked)), "test_windows": len(rest), "placement": placement.to_dict()})
            line = []
            for method in methods:
                if method == "augmented":
                    assert augmented is not None
                    entry: dict[str, Any] = {"accuracy": accuracy(augmented.logits(test_x), rest.y)}
                else:
                    entry = personalise(method, device, art, folder, work, generator, args, test_x, rest.y, int(device_x.nbytes),
                                        input_name=hapt_model.INPUT)
                entry["domain"] = user
                rows[method].append(entry)
                line.append(f"{method} {entry['accuracy']:.3f}")
            print(f"{condition}, user {user} ({placement.name}): " + ", ".join(line), flush=True)
        clean = float(np.mean([r["accuracy"] for r in rows["none"]]))
        results[condition] = summarise(args, rows, info, generator_seconds, clean, time.perf_counter() - started, targets)
    result = dict(results["as recorded"])  # a copy: it also holds every condition's result
    result["workload"] = "hapt"
    if placed:
        result["conditions"] = results
        result["source_placements"] = source_placements
    result["seconds"] = time.perf_counter() - started
    write_results(result, args.results, args.name)


def _plain_artifacts(model: Path, work: Path) -> Path:
    """An artifact folder whose device model is `model` unchanged (personalize with the classifier slot only)."""
    import edgeplug

    folder = work / "augmented-art"
    edgeplug.rewrite(model, recipe([{"name": "personalize", "options": {"slots": ["classifier"], "statistics": False}}], 0.01),
                     folder, force=True)
    return folder


def personalise(method: str, device: Any, art: Path, folder: Path, work: Path, generator: Any, args: argparse.Namespace,
                x_test: np.ndarray, y_test: np.ndarray, raw_bytes: int, input_name: str = "image") -> dict[str, Any]:
    """One row for one target domain: run the device side in a child, evaluate the resulting slots."""
    from edgeplug_plugins.personalize.anchors import read_anchors
    from edgeplug_plugins.personalize.device import accuracy
    from edgeplug_plugins.personalize.slotfile import read_slots

    entry: dict[str, Any] = {}
    slots: dict[str, np.ndarray] = {}
    if method != "none":
        job = {"method": method, "artifacts": str(art), "folder": str(folder), "generator": str(work / "generator"),
               "fta_epochs": args.fta_epochs, "fta_lr": args.fta_lr, "fta_batch": args.fta_batch, "input": input_name}
        measured = run_child(job, work)
        entry.update(device_seconds=measured["seconds"], device_peak_rss=measured["peak_rss"])
    if method in ("stats", "prototype", "fta", "fta_stats"):
        slots = read_slots(folder / f"{method}.npz", device.manifest)[0]
    if method == "generated":
        packed, meta = read_anchors(folder / "anchors.npz", device.manifest.fingerprint)
        cloud = time.perf_counter()
        generated = generator.generate(packed, meta)
        entry["cloud_seconds"] = time.perf_counter() - cloud
        slots = {**read_slots(folder / "device-stats.npz", device.manifest)[0], **generated}
        entry.update(upload_bytes=(folder / "anchors.npz").stat().st_size, raw_bytes=raw_bytes,
                     download_bytes=sum(v.nbytes for v in generated.values()))
    entry["accuracy"] = accuracy(device.logits(x_test, slots), y_test)
    return entry


def summarise(args: argparse.Namespace, rows: dict[str, list[dict[str, Any]]], info: dict[str, Any], generator_seconds: float,
              clean: float, seconds: float, target_domains: list[dict[str, Any]]) -> dict[str, Any]:
    table = {}
    for method, entries in rows.items():
        accs = [e["accuracy"] for e in entries]
        summary: dict[str, Any] = {"label": LABELS[method], "accuracy_mean": float(np.mean(accs)),
                                   "accuracy_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0}
        for key in ("device_seconds", "device_peak_rss", "upload_bytes", "raw_bytes", "cloud_seconds", "download_bytes"):
            values = [e[key] for e in entries if key in e]
            if values:
                summary[key + "_median"] = float(statistics.median(values))
        table[method] = summary
    generated = table["generated"]
    paired = {}
    for method in rows:
        if method != "generated":
            paired[method] = paired_interval([e["accuracy"] for e in rows["generated"]], [e["accuracy"] for e in rows[method]])
    return {
        "paired_generated_minus": paired,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "clean_accuracy": clean, "seconds": seconds, "generator_training_seconds": generator_seconds,
        "generator": {k: info["training"][k] for k in ("domains", "validation_domains", "best_step", "validation_accuracy",
                                                        "validation_accuracy_untrained")},
        "rows": table, "per_domain": rows, "target_domains": target_domains,
        "targets": {
            "beats_none_and_forward_only": generated["accuracy_mean"] > max(table[m]["accuracy_mean"] for m in ("none", "stats", "prototype")),
            "gap_to_fta_points": 100 * (max(table["fta"]["accuracy_mean"], table["fta_stats"]["accuracy_mean"]) - generated["accuracy_mean"]),
            "upload_ratio": generated["raw_bytes_median"] / generated["upload_bytes_median"],
        },
    }


def paired_interval(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of a - b over the paired target domains with a 95% t interval (bench.protocol.stats)."""
    sys.path.insert(0, str(ROOT))
    from bench.protocol.stats import paired_t

    d = paired_t(a, b)
    return {"mean": d.mean, "low": d.low, "high": d.high, "n": d.n, "p_value": d.p_value}


def write_results(result: dict[str, Any], folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / f"{name}.md").write_text(markdown(result))
    plot(result, folder / f"{name}.png")
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    if result.get("workload") == "hapt":
        placed = bool(s.get("placements"))
        head = ["# personalize: backprop-free personalisation of unseen people (UCI HAPT)", "",
                f"`nice python bench/personalize.py --workload hapt --device-samples {s['device_samples']} --steps {s['steps']}"
                + (f" --placements {s['placements']}" if placed else "")
                + (" --reuse-generator" if s.get("reuse_generator") else "") + "` — base model: the HAPT 1D-CNN pretrained with "
                "edgeplug on UCI's 21 training users (bench/hapt_model.py); the generator trains over those 21 users as source "
                "domains" + (f", each also under {s['placements']} random phone placements (hapt.random_placement: turned by a "
                              "multiple of 90 degrees about the screen's normal, facing in or out, tilted up to 15 degrees, per-axis "
                              "gains 1 +- 0.05; slots: classifier, batch-norm affine and the first convolution's weights; anchors also "
                              "read the raw input's per-channel mean and std)" if placed else "")
                + f"; the 9 held-out users are the target domains: per user up to {s['device_samples']} unlabelled windows of its "
                f"first recording on the device, its other recording(s) the test set"
                + ("; measured as recorded and again with each user's phone under its own random placement" if placed else "")
                + f". Run took {result['seconds']:.0f} s on {result['machine']['cpus']} shared cores "
                f"(load {result['machine']['load_average'][0]:.1f}).", ""]
    else:
        head = ["# personalize: backprop-free personalisation on distorted digits", "",
                f"`nice python bench/personalize.py` — {s['source_domains']} source domains (generator training), "
                f"{s['target_domains']} unseen target domains; per target domain {s['device_samples']} unlabelled device images, "
                f"the remaining target-half images are the test set. Base CNN clean accuracy {result['clean_accuracy']:.3f}. "
                f"Run took {result['seconds']:.0f} s on {result['machine']['cpus']} shared cores (load {result['machine']['load_average'][0]:.1f}).", ""]
    if "conditions" not in result:
        return "\n".join([*head, *_table(result)])
    lines = list(head)
    for condition, part in result["conditions"].items():
        lines += [f"## New users, phone {condition}", "", *_table(part)]
        lines += ["Per user: " + "; ".join(f"{t['user']} ({t['placement']['name']})" for t in part["target_domains"]), ""]
    return "\n".join(lines)


def _table(result: dict[str, Any]) -> list[str]:
    lines = [
        "| method | target accuracy (mean ± std over domains) | device time (median) | device peak RSS (median) | upload |",
        "|---|---|---|---|---|",
    ]
    for method, row in result["rows"].items():
        seconds = f"{row['device_seconds_median']:.2f} s" if "device_seconds_median" in row else "-"
        rss = f"{row['device_peak_rss_median'] / 2**20:.0f} MiB" if "device_peak_rss_median" in row else "-"
        upload = (f"{row['upload_bytes_median']:,.0f} B (raw samples {row['raw_bytes_median']:,.0f} B)"
                  if "upload_bytes_median" in row else ("none; labels + backprop on device" if method.startswith("fta") else "-"))
        lines.append(f"| {row['label']} | {row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f} | {seconds} | {rss} | {upload} |")
    t, g = result["targets"], result["generator"]
    if "paired_generated_minus" in result:
        lines += ["", "| generated minus | mean difference [95% t interval] over target domains |", "|---|---|"]
        for method, d in result["paired_generated_minus"].items():
            lines.append(f"| {result['rows'][method]['label']} | {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] (n = {d['n']}) |")
    lines += [
        "",
        f"- generated beats no adaptation and both forward-only baselines: **{t['beats_none_and_forward_only']}**",
        f"- gap to the better FTA row: **{t['gap_to_fta_points']:.1f} points** (positive: FTA ahead; target: within 2)",
        f"- upload vs raw device samples: **{t['upload_ratio']:.1f}x smaller** (target: >= 20x)",
        f"- generator: trained on {g['domains']} source domains ({g['validation_domains']} held out: validation accuracy "
        f"{g['validation_accuracy_untrained']:.3f} untrained -> {g['validation_accuracy']:.3f}, best step {g['best_step']}), "
        f"{result['generator_training_seconds']:.0f} s in the cloud; one generation "
        f"{result['rows']['generated'].get('cloud_seconds_median', 0) * 1000:.1f} ms",
        "- device time and peak RSS: each personalisation in a fresh process (`--child`), from interpreter start "
        "to the slot file written, including imports and model load; VmHWM. Times are noisy on the shared machine.",
        "",
    ]
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = list(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    parts = result.get("conditions", {"": result})
    width = 0.8 / len(parts)
    for number, (condition, part) in enumerate(parts.items()):
        shown = [n for n in names if n in part["rows"]]
        left.bar([names.index(n) + number * width for n in shown], [part["rows"][n]["accuracy_mean"] for n in shown], width,
                 yerr=[part["rows"][n]["accuracy_std"] for n in shown], label=condition or None)
    if len(parts) > 1:
        left.legend(fontsize=8)
    left.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=20, fontsize=8)
    left.set_ylabel("target-domain accuracy")
    left.set_ylim(0, 1)
    measured = [n for n in names if "device_peak_rss_median" in rows[n]]
    right.scatter([rows[n]["device_seconds_median"] for n in measured], [rows[n]["device_peak_rss_median"] / 2**20 for n in measured])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from plotting import label_points

    label_points(right, [(rows[n]["device_seconds_median"], rows[n]["device_peak_rss_median"] / 2**20, n) for n in measured])
    right.set_xlabel("device time per personalisation (s, fresh process)")
    right.set_ylabel("device peak RSS (MiB)")
    fig.suptitle("personalize: unseen UCI HAPT users" if result.get("workload") == "hapt" else "personalize: digits under per-domain distortions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
