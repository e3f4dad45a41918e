#!/usr/bin/env python
"""activation-shortcut: measured memory and step time at a fixed batch, against vanilla training of the same layers.

The accuracy rows run through the image family (`bench/run.py images`, rows shortcut_*); their batch is
min(16, training shots), so this script measures memory and time where the issue asks: EfficientNet-Lite0/Lite1
at 224 px, batch 16, on real images (the four image domains, four images each), through the benchmark protocol:
every (row, session setting) in a fresh process (`bench.protocol.isolation.run_fresh`), rows interleaved per
repeat, memory at the ready point (`MemoryProbe`, the peak reset before step 1), one onnxruntime thread. The
frozen-prefix cache is off in every row (it refuses folders with carried state, so it would run for vanilla
only).

    nice python bench/shortcut_memory.py --backbones lite0,lite1 --repeats 2

Writes bench/results/shortcut_memory.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.protocol.isolation import run_fresh  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK_LAYERS = {4: 14, 8: 26}  # last N blocks of EfficientNet-Lite + head conv + classifier: `trainable` layers
METHODS = {
    "vanilla": None,
    "asi": {"method": "asi", "op_types": ["Conv"], "compression": 20},
    "asi_uncentred": {"method": "asi", "op_types": ["Conv"], "compression": 20, "center": False},
    "gf": {"method": "gradient-filter", "op_types": ["Conv"], "patch": 7},
}


def images(size: int, count: int, seed: int) -> dict[str, np.ndarray]:
    """`count` real images from the four domains in turn (elpv, textures, faces, digits), labels 0..9."""
    from bench.images.data import DOMAINS, load_pools

    pools = load_pools(DOMAINS, size)
    rng = np.random.default_rng(seed)
    x = np.concatenate([pool.to_input(rng.choice(len(pool.images), count // len(pools), replace=False)) for pool in pools])
    return {"x": x.astype(np.float32), "y": rng.integers(0, 10, len(x)).astype(np.int64)}


def recipe(blocks: int, method: str, batch: int, memory: str) -> dict[str, Any]:
    passes: list[dict[str, Any]] = [{"name": "new-head", "options": {"classes": 10, "init": "random"}},
                                    {"name": "trainable", "options": {"layers": BLOCK_LAYERS[blocks]}}]
    if METHODS[method] is not None:
        passes.append({"name": "activation-shortcut", "options": {**METHODS[method], "batch_size": batch}})
    return {"loss": "cross-entropy", "optimizer": {"name": "sgd", "lr": 0.001}, "training": {"memory": memory}, "passes": passes}


def build(job: dict[str, Any], context: Any) -> dict[str, Any]:
    """In a fresh process: rewrite one row (the calibration batch is the training batch)."""
    import edgeplug
    from edgeplug.recipe import recipe_from_dict

    data = dict(np.load(job["data"]))
    started = time.perf_counter()
    result = edgeplug.rewrite(job["model"], recipe_from_dict(job["recipe"]), job["out"], calibration={k: v[: job["batch"]] for k, v in data.items()},
                              force=True)
    entry = next((p for p in result.report["passes"] if p["name"] == "activation-shortcut"), None)
    details = entry["details"] if entry else {}
    keep = ("vanilla_bytes", "compressed_bytes", "compression", "backward_macs", "vanilla_backward_macs", "inputs_freed")
    layers = details.get("layers", [])
    return {"seconds": time.perf_counter() - started, "summary": entry["summary"] if entry else None,
            **{k: details[k] for k in keep if k in details},
            "forward_extra_macs": sum(la.get("forward_extra_macs", 0) for la in layers), "layers": len(layers)}


def train(job: dict[str, Any], context: Any) -> dict[str, Any]:
    """In a fresh process: `steps` training steps at the batch size; memory from the ready point."""
    from bench.protocol.ort_rows import ready_hook
    from edgeplug.trainer import Trainer

    trainer = Trainer(job["artifacts"], checkpoints=False, progress=False, threads=context.pinning.threads, cache_prefix=False,
                      memory=job["memory"])
    hook = ready_hook(context.probe)
    trainer.host.register(hook, name="bench-ready")
    data = trainer.dataset(job["data"])
    fit = trainer.fit(data, epochs=job["epochs"], batch_size=job["batch"], resume=False)
    context.probe.finish_once()
    memory = context.probe.result()
    return {**(memory or {}), "median_step_seconds": fit.median_step_seconds, "step_seconds": fit.step_seconds, "steps": fit.steps_run}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default="lite0,lite1")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2, help="epochs over 3 batches of real images (steps = 3 x epochs)")
    p.add_argument("--blocks", default="8,4")
    p.add_argument("--methods", default="vanilla,asi,asi_uncentred,gf")
    p.add_argument("--memory", default="lean,arena", help="session settings measured (training.memory)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/edgeplug-shortcut-memory"))
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--name", default="shortcut_memory")
    args = p.parse_args(argv)
    from bench.images import backbones

    records: list[dict[str, Any]] = []
    started, load_before = time.perf_counter(), os.getloadavg()
    for backbone in args.backbones.split(","):
        work = args.work / backbone
        model = backbones.exported(args.work / "models", backbone, args.image_size)
        data_path = work / "data.npz"
        work.mkdir(parents=True, exist_ok=True)
        np.savez(data_path, **images(args.image_size, 3 * args.batch, seed=0))
        rows = [(blocks, method, memory) for blocks in map(int, args.blocks.split(",")) for method in args.methods.split(",")
                for memory in args.memory.split(",")]
        built: dict[tuple[int, str], dict[str, Any]] = {}
        for blocks, method in dict.fromkeys((blocks, method) for blocks, method, _ in rows):
            # one folder per (blocks, method): the session setting is the trainer's (Trainer(memory=)), not the build's
            tag = f"b{blocks}-{method}"
            job = {"model": str(model), "recipe": recipe(blocks, method, args.batch, "lean"), "out": str(work / tag), "data": str(data_path),
                   "batch": args.batch}
            built[(blocks, method)] = run_fresh("bench.shortcut_memory:build", job, work=work / "jobs", tag=f"build-{tag}").result
            print(f"{backbone} {tag}: built ({built[(blocks, method)].get('summary')})", flush=True)
        for repeat in range(args.repeats):
            order = np.random.default_rng([repeat, 7]).permutation(len(rows))
            for index in order:
                blocks, method, memory = rows[index]
                tag = f"b{blocks}-{method}-{memory}"
                job = {"artifacts": str(work / f"b{blocks}-{method}"), "data": str(data_path), "batch": args.batch, "epochs": args.epochs,
                       "memory": memory}
                fresh = run_fresh("bench.shortcut_memory:train", job, work=work / "jobs", tag=f"train-{tag}-{repeat}")
                record = {**fresh.result, "backbone": backbone, "blocks": blocks, "method": method, "sessions": memory, "repeat": repeat,
                          "cpu_seconds": fresh.cpu_seconds, **{f"static_{k}": v for k, v in built[(blocks, method)].items()}}
                records.append(record)
                print(f"{backbone} {tag} #{repeat}: RSS added {record['rss_added_bytes'] / 2**20:.0f} MiB, "
                      f"median step {record['median_step_seconds']:.2f} s", flush=True)
    meta = {"args": {k: str(v) for k, v in vars(args).items()}, "seconds": time.perf_counter() - started,
            "load_average": {"start": load_before, "end": os.getloadavg()}}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n", encoding="utf-8")
    (args.results / f"{args.name}.md").write_text(markdown(records, meta), encoding="utf-8")
    print(markdown(records, meta))


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """One table per backbone: medians over repeats; savings against vanilla of the same blocks and session setting."""
    def median(rows: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(r[key] for r in rows))

    lines = ["# activation-shortcut: measured memory and step time", "",
             f"Batch {meta['args']['batch']}, {meta['args']['image_size']} px, real images, one onnxruntime thread, "
             f"{meta['args']['repeats']} repeats in fresh processes (medians), frozen-prefix cache off. "
             "Counted saving = the compressed layers' input bytes minus what ASI / gradient filtering keeps; "
             "measured saving = vanilla's RSS added minus the row's, same blocks and session setting. Peak RSS = the process's "
             "whole peak (sessions included).", ""]
    if "load_average" in meta:
        load = meta["load_average"]
        lines += [f"Load average (1/5/15 min) {'/'.join(f'{v:.1f}' for v in load['start'])} at the start, "
                  f"{'/'.join(f'{v:.1f}' for v in load['end'])} at the end (2 cores, shared).", ""]
    for backbone in dict.fromkeys(r["backbone"] for r in records):
        lines += [f"## {backbone}", "",
                  "| blocks | method | sessions | peak RSS (MiB) | RSS added (MiB) | measured saving (MiB) | counted saving (MiB) | measured / counted | "
                  "kept inputs | backward MACs vs vanilla | forward extra MACs | median step (s) | step vs vanilla |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        groups: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
        for r in records:
            if r["backbone"] == backbone:
                groups.setdefault((r["blocks"], r["method"], r["sessions"]), []).append(r)
        for (blocks, method, memory), rows in groups.items():
            added = median(rows, "rss_added_bytes") / 2**20
            peak = median(rows, "peak_rss_bytes") / 2**20
            step = median(rows, "median_step_seconds")
            base = groups.get((blocks, "vanilla", memory))
            first = rows[0]
            if method == "vanilla" or base is None:
                lines.append(f"| {blocks} | {method} | {memory} | {peak:.0f} | {added:.0f} | | | | | | | {step:.2f} | |")
                continue
            base_added = median(base, "rss_added_bytes") / 2**20
            counted = (first.get("static_vanilla_bytes", 0) - first.get("static_compressed_bytes", 0)) / 2**20
            measured = base_added - added
            macs = first.get("static_backward_macs", 0) / max(first.get("static_vanilla_backward_macs", 1), 1)
            lines.append(f"| {blocks} | {method} | {memory} | {peak:.0f} | {added:.0f} | {measured:.0f} | {counted:.0f} | {measured / counted:.0%} | "
                         f"{first.get('static_compression', 0):.1f}x less | {1 / macs:.2f}x fewer | "
                         f"{first.get('forward_extra_macs', first.get('static_forward_extra_macs', 0)) / 1e9:.2f} G | {step:.2f} | "
                         f"{step / median(base, 'median_step_seconds'):.2f}x |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
