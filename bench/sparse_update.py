"""sparse-update on the device: what the selection costs next to the fine-tuning it prepares, and what the
frozen-prefix cache saves per epoch.

Per episode of the image family (bench/images; same data, backbone export and new-head as `bench/run.py
images`), each in a fresh process with pinned threads (bench/protocol/isolation):

- `select`: `edgeplug.rewrite` with new-head + sparse-update tinytrain at the budget, the episode's training
  shots as calibration data; peak RSS of the process and the pass's own seconds (report.json);
- `rewrite_static`: the same with strategy static (no probe pass): the rewrite without the criterion;
- `train_cached` / `train_uncached`: `edgeplug.Trainer` on the tinytrain folder, `--epochs` epochs at
  `--batch-size`, with and without the frozen-prefix cache: fit time, per-epoch seconds, median step,
  peak RSS; the trained weights of the two must be bit-identical.

    python bench/sparse_update.py --episodes 2 --image-size 128 --budget-kib 28672
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.images import backbones  # noqa: E402
from bench.images.data import DOMAINS, load_pools  # noqa: E402
from bench.protocol.episodes import EpisodeConfig, sample_episodes  # noqa: E402
from bench.protocol.isolation import interleaved, run_fresh  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _arrays(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return {"x": archive["x"], "y": archive["y"]}


def _recipe(strategy: str, job: dict[str, Any]) -> dict[str, Any]:
    options = {"strategy": strategy, "memory_budget_bytes": job["budget"], "batch_size": job["batch_size"]}
    if strategy == "tinytrain":
        options.update({k: job[k] for k in ("criterion", "calibration_batch") if job.get(k) is not None})
    return {"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": job["lr"]}, "passes": [
        {"name": "new-head", "options": {"classes": job["classes"]}},
        {"name": "sparse-update", "options": options}]}


def select_job(job: dict[str, Any], context: Any) -> dict[str, Any]:
    """One rewrite in this fresh process: peak RSS and time, the pass's report."""
    import onnx

    from bench.protocol.measure import proc_status, reset_peak
    from edgeplug.pipeline import rewrite
    from edgeplug.recipe import recipe_from_dict
    from edgeplug_plugins.sparse_update.sparse_update_pass import SparseUpdatePass

    data = _arrays(job["train"])
    onnx.load(job["model"])  # the model read once, as a device would have it in memory
    context.probe.ready()
    # the pass's own peak: VmHWM reset when it starts, read when it returns (the rest of the rewrite, new-head,
    # generate_artifacts and the smoke load of the written folder, is not the selection)
    original, selection = SparseUpdatePass.rewrite_forward, {}

    def measured(self: Any, state: Any, pass_context: Any) -> Any:
        before = proc_status()
        selection["reset"] = reset_peak()
        selection["rss_before_bytes"] = before["VmRSS"]
        result = original(self, state, pass_context)
        selection["peak_rss_bytes"] = max(proc_status()["VmHWM"], before["VmRSS"]) if selection["reset"] else None
        return result

    SparseUpdatePass.rewrite_forward = measured  # type: ignore[method-assign]
    started, cpu = time.perf_counter(), time.process_time()
    report = rewrite(job["model"], recipe_from_dict(_recipe(job["strategy"], job)), job["out"], force=True, calibration=data).report
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    memory = context.probe.finish()
    details = next(p for p in report["passes"] if p["name"] == "sparse-update")["details"]
    return {"memory": memory, "selection_memory": selection, "rewrite_seconds": wall, "rewrite_cpu_seconds": cpu,
            "pass_seconds": details["seconds"],
            "feasible": details["feasible"], "probe": details.get("probe"), "summary": next(
                p["summary"] for p in report["passes"] if p["name"] == "sparse-update"),
            "layers": [(layer["node"], layer["kind"], layer["axis"], layer["ratio"]) for layer in details["layers"]],
            "plan_sha256": plan_digest(details),
            "predicted": details["predicted"], "predicted_all_layers": details["predicted_all_layers"]}


def plan_digest(details: dict[str, Any]) -> str:
    """What the selection chose, as one digest: every trained layer's axis and channels, the bias-only layers,
    the trainable parameters. Equal digests = the same plan (runs with other probe settings compare by it)."""
    plan = {"layers": [(layer["node"], layer["axis"], layer["channels"]) for layer in details["layers"]],
            "bias_only": details["bias_only"], "trainable": details["trainable"]}
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def train_job(job: dict[str, Any], context: Any) -> dict[str, Any]:
    """Fine-tune the folder with or without the frozen-prefix cache; times, memory, a digest of the weights."""
    from bench.protocol.ort_rows import ready_hook
    from edgeplug.trainer import Trainer

    trainer = Trainer(job["folder"], seed=0, lr=job["lr"], checkpoints=False, progress=False, threads=context.pinning.threads,
                      cache_prefix=job["cache"])
    hook = ready_hook(context.probe)
    trainer.host.register(hook, name="bench-ready")
    train = trainer.dataset(job["train"])
    started, cpu = time.perf_counter(), time.process_time()
    fit = trainer.fit(train, epochs=job["epochs"], batch_size=job["batch_size"], resume=False)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    memory = context.probe.finish()
    digest = hashlib.sha256()
    for name in sorted(trainer.report["parameters"]["trainable"]):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(trainer._state.parameters[name].data).tobytes())  # noqa: SLF001 - bench
    query = trainer.evaluate(job["query"])
    return {"memory": memory, "fit_seconds": wall, "fit_cpu_seconds": cpu, "epoch_seconds": [e.seconds for e in fit.epochs],
            "median_step_seconds": fit.median_step_seconds, "steps": fit.steps_run, "prefix_cache": fit.prefix_cache,
            "weights_sha256": digest.hexdigest(), "query_accuracy": query.accuracy, "train_loss": fit.epochs[-1].train.loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=2, help="episodes per domain")
    parser.add_argument("--domains", default=",".join(DOMAINS))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--backbone", default="lite0")
    parser.add_argument("--ways", default="5,5")
    parser.add_argument("--shots", default="8,8")
    parser.add_argument("--budget-kib", type=int, default=28672)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--criterion", choices=["auto", "paper", "budget"], default=None, help="tinytrain's criterion (default: the pass's)")
    parser.add_argument("--calibration-batch", type=int, default=None, help="probe chunk size (default: the pass's)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeplug-bench-sparse"))
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default="sparse_update_overhead")
    args = parser.parse_args()

    ways = tuple(int(v) for v in args.ways.split(","))
    shots = tuple(int(v) for v in args.shots.split(","))
    config = EpisodeConfig(ways=ways, shots=shots, query=10, validation=0.0)
    pools = {pool.domain.name: pool for pool in load_pools(args.domains.split(","), args.image_size)}
    episodes = sample_episodes([pool.domain for pool in pools.values()], args.episodes, config, seed=0)
    model = backbones.exported(args.work / "models", args.backbone, args.image_size)
    load_before, started = os.getloadavg(), time.perf_counter()
    records: list[dict[str, Any]] = []
    kinds = ["select", "rewrite_static", "train_cached", "train_uncached"]
    for episode, kind in interleaved(episodes, kinds, seed=1):
        folder = args.work / f"{episode.domain}-{episode.index}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for split, indices, labels in (("train", episode.train, episode.train_labels), ("query", episode.query, episode.query_labels)):
            paths[split] = folder / f"{split}.npz"
            if not paths[split].is_file():
                np.savez(paths[split], x=pools[episode.domain].to_input(indices), y=labels)
        batch = min(args.batch_size, len(episode.train))
        job = {"model": str(model), "train": str(paths["train"]), "query": str(paths["query"]), "classes": episode.ways,
               "budget": args.budget_kib * 1024, "batch_size": batch, "lr": args.lr, "epochs": args.epochs,
               "criterion": args.criterion, "calibration_batch": args.calibration_batch}
        if kind in ("train_cached", "train_uncached") and not (folder / "tinytrain" / "report.json").is_file():
            run_fresh("bench.sparse_update:select_job", {**job, "strategy": "tinytrain", "out": str(folder / "tinytrain")},
                      work=folder / "jobs", tag="select-first", threads=args.threads)
        if kind == "select":
            result = run_fresh("bench.sparse_update:select_job", {**job, "strategy": "tinytrain", "out": str(folder / "tinytrain")},
                               work=folder / "jobs", tag=kind, threads=args.threads)
        elif kind == "rewrite_static":
            result = run_fresh("bench.sparse_update:select_job", {**job, "strategy": "static", "out": str(folder / "static")},
                               work=folder / "jobs", tag=kind, threads=args.threads)
        else:
            result = run_fresh("bench.sparse_update:train_job", {**job, "folder": str(folder / "tinytrain"),
                                                                  "cache": kind == "train_cached"},
                               work=folder / "jobs", tag=kind, threads=args.threads)
        records.append({"domain": episode.domain, "episode": episode.index, "kind": kind, "train_size": len(episode.train),
                        "batch_size": batch, "cpu_seconds": result.cpu_seconds, "wall_seconds": result.wall_seconds, **result.result})
        print(f"{episode.domain}-{episode.index} {kind}: {result.wall_seconds:.1f} s", flush=True)
    meta = {"command": "python " + " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
            "load_before": load_before, "load_after": os.getloadavg(), "wall_seconds": time.perf_counter() - started}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1, default=str) + "\n")
    (args.results / f"{args.name}.md").write_text(report(meta, records, args))
    print(f"wrote {args.results / args.name}.{{md,json}}")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(meta: dict[str, Any], records: list[dict[str, Any]], args: argparse.Namespace) -> str:
    by = {}
    for r in records:
        by.setdefault((r["domain"], r["episode"]), {})[r["kind"]] = r
    mib = 2**20
    lines = [f"# sparse-update on the device: selection overhead and the frozen-prefix cache ({args.image_size} px)", "",
             f"Command: `{meta['command']}`  ",
             f"EfficientNet-{args.backbone.title()} at {args.image_size} px (bench/images export), new-head (prototypes) + sparse-update "
             f"tinytrain at {args.budget_kib} KiB (criterion {args.criterion or 'default'}, calibration batch "
             f"{args.calibration_batch or 'default'}), batch min({args.batch_size}, shots), {args.epochs} epochs at lr {args.lr}, "
             f"{args.ways} ways x {args.shots} shots; every job in a fresh process, {args.threads} thread(s). Load average "
             f"{meta['load_before'][0]:.1f} at start, {meta['load_after'][0]:.1f} at the end; wall {meta['wall_seconds']:.0f} s.", "",
             "| episode | train shots | layers probed / chosen | selection (pass) s | tinytrain rewrite s | static rewrite s | "
             "fine-tune s (uncached) | fine-tune s (cached, incl. fill) | selection / fine-tune | selection peak RSS MiB (rewrite) | "
             "fine-tune peak RSS MiB (uncached / cached) | epoch s uncached | epoch s cached (after fill) | cache fill s | "
             "median step ms uncached / cached | bit-identical | plan |", "|" + "---|" * 17]
    ratios_time, ratios_mem, ratios_rewrite = [], [], []
    for (domain, index), kinds in sorted(by.items()):
        s, st, c, u = (kinds.get(k) for k in ("select", "rewrite_static", "train_cached", "train_uncached"))
        if not (s and c and u):
            continue
        selection = s["pass_seconds"]["selection_total"]
        ratios_time.append(selection / u["fit_seconds"])
        selection_peak = s["selection_memory"].get("peak_rss_bytes") or float("nan")
        ratios_mem.append(selection_peak / u["memory"]["peak_rss_bytes"])
        ratios_rewrite.append(s["memory"]["peak_rss_bytes"] / u["memory"]["peak_rss_bytes"])
        fill = (c.get("prefix_cache") or {}).get("seconds")
        cached_epochs = c["epoch_seconds"]
        lines.append(
            f"| {domain}-{index} | {s['train_size'] if 'train_size' in s else c['train_size']} | {s['probe']['probed'] if s.get('probe') else '-'} / "
            f"{len(s['layers'])} | {selection:.2f} | {s['rewrite_seconds']:.1f} | {st['rewrite_seconds'] if st else float('nan'):.1f} | "
            f"{u['fit_seconds']:.1f} | {c['fit_seconds']:.1f} | {selection / u['fit_seconds']:.2f} | "
            f"{selection_peak / mib:.0f} ({s['memory']['peak_rss_bytes'] / mib:.0f}) | {u['memory']['peak_rss_bytes'] / mib:.0f} / {c['memory']['peak_rss_bytes'] / mib:.0f} | "
            f"{_median(u['epoch_seconds']):.2f} | {_median(cached_epochs):.2f} | {fill if fill is not None else float('nan'):.2f} | "
            f"{u['median_step_seconds'] * 1000:.0f} / {c['median_step_seconds'] * 1000:.0f} | "
            f"{'yes' if c['weights_sha256'] == u['weights_sha256'] else 'NO'} | {s.get('plan_sha256', '-')[:12]} |")
    lines += ["", f"Median selection / uncached fine-tuning time: {_median(ratios_time):.3f}; median selection peak / fine-tuning peak RSS: "
              f"{_median(ratios_mem):.2f}; median whole-rewrite peak / fine-tuning peak RSS: {_median(ratios_rewrite):.2f}.", "",
              "Selection = the sparse-update pass (report.json `seconds.selection_total`: feasibility, probe pass over the "
              "training shots, selection, split); its peak RSS is the process's high-water mark while the pass ran (reset when "
              "it started), in parentheses the whole `edgeplug.rewrite` (new-head, both passes, generate_artifacts, the "
              "smoke load of the written folder). Fine-tune peak RSS = the "
              "whole training process (the cache fill included). Epoch times from `FitResult.epochs` (the first cached "
              "epoch follows the fill; the fill itself is `prefix_cache.seconds`). Plan = the first 12 hex digits of "
              "`plan_sha256` (layers, axes, channels, bias-only layers, trainable parameters): runs with other probe "
              "settings chose the same plan where they agree."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
