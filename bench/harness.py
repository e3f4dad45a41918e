"""Shared machinery of the bench: rows from recipe files, training in fresh child processes, results.

A row is either a recipe file `bench/recipes/<name>.yaml` (an edgeplug recipe plus a
`bench:` section the harness strips before validation) or a built-in PyTorch eager
baseline. For every run (episode or seed) of a workload, every row trains in a fresh
child process (`python bench/harness.py --child JOB.json`), runs interleaved run by run
so that background load hits all rows alike. The child reports query accuracy, the
median train-step time and its own peak RSS (VmHWM from /proc/self/status).

Static columns come from `edgeplug.profiling.static_profile` on the row's artifacts;
with `--measure` the profiler's controlled `measure` runs too. Both are optional: if
`edgeplug.profiling` cannot be imported, those columns say "n/a".
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RECIPES = BENCH / "recipes"
RESULTS = BENCH / "results"
MIB = 2**20

# `bench:` keys a recipe file may set.
BENCH_KEYS = {"label", "baseline", "order", "export", "workloads", "core_passes", "lr", "calibration"}


@dataclasses.dataclass
class Row:
    name: str
    label: str
    kind: str  # "ort" or "torch"
    order: float
    export: str = "eval"  # fewshot: which EfficientNet export the recipe is applied to
    workloads: tuple[str, ...] = ("fewshot", "scratch")
    baseline: bool = False
    recipe_file: Path | None = None
    recipe: dict[str, Any] | None = None  # the edgeplug recipe document, `bench:` stripped
    lr: float | None = None  # overrides the workload's lr when set in the recipe's bench section
    torch_trainable: str = "all"  # torch rows: "all" or "classifier"
    mirrors: str | None = None  # torch rows: the recipe whose optimizer/schedule they copy
    aliases: tuple[str, ...] = ()
    calibration: bool = False  # rewrite once per run with that run's training set as calibration data
    # filled while running
    rewrite_seconds: list[float] = dataclasses.field(default_factory=list)
    artifacts: dict[str, str] = dataclasses.field(default_factory=dict)  # model key -> artifact dir
    report: dict[str, Any] | None = None
    static: dict[str, Any] | None = None
    measured: dict[str, Any] | None = None
    runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)


def load_recipe_rows(directory: Path = RECIPES) -> list[Row]:
    """Every `*.yaml` under bench/recipes is a row; its `bench:` section says how to show and run it."""
    rows = []
    for path in sorted(directory.glob("*.yaml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        bench = document.pop("bench", {}) or {}
        unknown = set(bench) - BENCH_KEYS
        if unknown:
            raise SystemExit(f"{path}: unknown bench keys {sorted(unknown)} (allowed: {sorted(BENCH_KEYS)})")
        workloads = bench.get("workloads", ["fewshot", "scratch"])
        rows.append(Row(
            name=path.stem, label=bench.get("label", path.stem), kind="ort", order=float(bench.get("order", 100)),
            export=bench.get("export", "eval"), workloads=tuple(workloads), baseline=bool(bench.get("baseline", False)),
            recipe_file=path, recipe=document, lr=bench.get("lr"),
            aliases=(bench["core_passes"],) if "core_passes" in bench else (),
            calibration=bool(bench.get("calibration", False)),
        ))
    return rows


def torch_rows(recipe_rows: list[Row]) -> list[Row]:
    """PyTorch eager full fine-tune and last layer: same optimizer as full.yaml / last_layer.yaml."""
    by_name = {row.name: row for row in recipe_rows}
    rows = []
    for name, trainable, mirrors, label in (
        ("torch_full", "all", "full", "PyTorch eager full fine-tune"),
        ("torch_last_layer", "classifier", "last_layer", "PyTorch eager last layer only"),
    ):
        if mirrors in by_name:
            rows.append(Row(name=name, label=label, kind="torch", order=by_name[mirrors].order + 0.5,
                            workloads=by_name[mirrors].workloads, torch_trainable=trainable, mirrors=mirrors,
                            recipe=by_name[mirrors].recipe, lr=by_name[mirrors].lr))
    return rows


def select_rows(workload: str, only: str | None, no_torch: bool) -> list[Row]:
    recipe_rows = load_recipe_rows()
    rows = recipe_rows + ([] if no_torch else torch_rows(recipe_rows))
    rows = [row for row in rows if workload in row.workloads]
    if only:
        wanted = [name.strip() for name in only.split(",") if name.strip()]
        known = {alias: row for row in rows for alias in row.aliases}
        known.update({row.name: row for row in rows})  # a row's own name wins over another row's alias
        missing = [name for name in wanted if name not in known]
        if missing:
            raise SystemExit(f"--only: no row {missing} for workload {workload} (rows: {', '.join(sorted(known))})")
        rows = [known[name] for name in wanted]
    return sorted(rows, key=lambda row: (row.order, row.name))


# -- child process ---------------------------------------------------------------------------------

def peak_rss_bytes() -> int:
    """VmHWM of this process. Not ru_maxrss: Linux carries it across exec, so a child
    started by a large parent reports the parent's peak; VmHWM belongs to this image only."""
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc/self/status (this benchmark needs Linux)")


def child_ort(job: dict[str, Any]) -> dict[str, Any]:
    from edgeplug.trainer import Trainer

    # The torch baseline writes no checkpoints; by default neither does the ORT row, so both
    # measure training alone (--checkpoints keeps Trainer's epoch-end checkpoints).
    trainer = Trainer(job["artifacts"], seed=job["seed"], lr=job["lr"], progress=False, checkpoints=bool(job.get("checkpoints")))
    support, query = trainer.dataset(job["train"]), trainer.dataset(job["eval"])
    rss_before = peak_rss_bytes()
    fit = trainer.fit(support, epochs=job["epochs"], batch_size=job["batch_size"], resume=False)
    rss_training = peak_rss_bytes()
    metrics = trainer.evaluate(query)
    return {
        "accuracy": metrics.accuracy, "loss": metrics.loss, "steps": fit.steps_run,
        "median_step_seconds": fit.median_step_seconds, "train_loss": fit.epochs[-1].train.loss,
        "rss_before_training_bytes": rss_before, "peak_rss_bytes": rss_training, "peak_rss_with_eval_bytes": peak_rss_bytes(),
    }


def child_main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    if job["kind"] == "ort":
        result = child_ort(job)
    else:
        sys.path.insert(0, str(BENCH))
        import torch_baseline

        result = torch_baseline.verify(job) if job["kind"] == "torch-verify" else torch_baseline.train(job, peak_rss_bytes)
    Path(job["result"]).write_text(json.dumps(result) + "\n", encoding="utf-8")


def run_child(job: dict[str, Any], work: Path) -> Any:
    job_path = work / f"job-{job['tag']}.json"
    job["result"] = str(work / f"result-{job['tag']}.json")
    job_path.write_text(json.dumps(job, indent=1), encoding="utf-8")
    Path(job["result"]).unlink(missing_ok=True)
    done = subprocess.run([sys.executable, str(Path(__file__)), "--child", str(job_path)], check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed (exit {done.returncode}): {sys.executable} {__file__} --child {job_path}")
    return json.loads(Path(job["result"]).read_text(encoding="utf-8"))


# -- the run ----------------------------------------------------------------------------------------

def profiling_module() -> Any:
    try:
        import edgeplug.profiling as profiling
    except ImportError as error:
        print(f"note: edgeplug.profiling not importable ({error}); static/measured profiler columns will be n/a", flush=True)
        return None
    return profiling


def prepare_rows(rows: list[Row], setup: Any, work: Path, measure: bool, measure_steps: int) -> None:
    """Rewrite every (ORT row, model) pair once, or once per run for rows that take calibration
    data; static profile (and --measure) on the first."""
    from edgeplug.data import load_npz
    from edgeplug.pipeline import rewrite
    from edgeplug.recipe import recipe_from_dict

    profiling = profiling_module()
    for row in rows:
        if row.kind != "ort":
            continue
        assert row.recipe is not None
        recipe = recipe_from_dict(row.recipe, source=str(row.recipe_file))
        first_run: dict[str, Any] = {}
        for run in setup.runs:
            first_run.setdefault(_artifact_key(setup, row, run), run)
        keys = sorted(first_run, key=str)
        for key in keys:
            run = first_run[key]
            artifacts = work / f"artifacts-{setup.name}-{row.name}-{key}"
            calibration = load_npz(run.train) if row.calibration else None
            started = time.perf_counter()
            report = rewrite(setup.models[_model_key(setup, row, run)], recipe, artifacts, force=True, calibration=calibration).report
            row.rewrite_seconds.append(time.perf_counter() - started)
            row.artifacts[key] = str(artifacts)
            row.report = row.report or report
        first = row.artifacts[keys[0]]
        trainable = row.report["parameters"]["trainable_values"] if row.report else None
        print(f"rewrote {row.name}: {trainable:,} trainable values ({len(keys)} model(s))", flush=True)
        if profiling is not None:
            try:
                row.static = profiling.static_profile(first, batch_size=setup.batch_size).to_dict()
                row.static["backward_macs_by_node"] = {n["name"]: n["backward_macs"] for n in row.static["nodes"] if n["backward_macs"]}
                row.static.pop("nodes", None)
                row.static.pop("retained", None)
            except Exception as error:  # the profiler is under development; keep the bench running
                print(f"warning: static_profile({row.name}) failed: {type(error).__name__}: {error}", flush=True)
            if measure:
                try:
                    row.measured = profiling.measure(first, batch_size=setup.batch_size, steps=measure_steps).to_dict()
                except Exception as error:
                    print(f"warning: measure({row.name}) failed: {type(error).__name__}: {error}", flush=True)


def _model_key(setup: Any, row: Row, run: Any) -> str:
    """Which source model a run trains (scratch: one per seed; fewshot: the export kind)."""
    return f"seed-{run.model_seed}" if setup.name == "scratch" else row.export


def _artifact_key(setup: Any, row: Row, run: Any) -> str:
    """Which artifact folder a run trains: per run when the rewrite reads the run's data."""
    key = _model_key(setup, row, run)
    return f"{key}-run{run.index}" if row.calibration else key


def untrained_accuracy(rows: list[Row], setup: Any) -> float | None:
    from edgeplug.trainer import Trainer

    for row in rows:
        if row.kind == "ort" and row.export == "eval" and row.artifacts:
            key = _artifact_key(setup, row, setup.runs[0])
            return Trainer(row.artifacts[key], progress=False).evaluate(setup.runs[0].eval).accuracy
    return None


def run_workload(setup: Any, rows: list[Row], work: Path, args: Any) -> dict[str, Any]:
    started = time.perf_counter()
    prepare_rows(rows, setup, work, args.measure, args.measure_steps)
    untrained = untrained_accuracy(rows, setup)
    verify = {}
    if any(row.kind == "torch" for row in rows):
        for run in setup.runs[:1]:
            model = setup.model_for("eval", run)
            verify[str(model.name)] = run_child({"kind": "torch-verify", "tag": f"{setup.name}-verify", "onnx": str(model),
                                                 "eval": str(run.eval), "torch_model": setup.torch_model, "seed": run.seed}, work)
            print(f"torch model vs ONNX ({model.name}): max abs diff {verify[str(model.name)]:.2e}", flush=True)
    for run in setup.runs:
        for row in rows:
            lr = row.lr if row.lr is not None else setup.lr
            common = {"tag": f"{setup.name}-{row.name}-{run.index}", "seed": run.seed, "train": str(run.train),
                      "eval": str(run.eval), "epochs": setup.epochs, "batch_size": setup.batch_size, "lr": lr}
            if row.kind == "ort":
                job = {"kind": "ort", "artifacts": row.artifacts[_artifact_key(setup, row, run)],
                       "checkpoints": args.checkpoints, **common}
            else:
                assert row.recipe is not None
                job = {"kind": "torch", "onnx": str(setup.model_for("eval", run)), "torch_model": setup.torch_model,
                       "trainable": row.torch_trainable, "optimizer": row.recipe.get("optimizer", {"name": "adamw"}), **common}
            result = run_child(job, work)
            row.runs.append(result)
            print(f"{setup.name} run {run.index} {row.name:<28} acc {result['accuracy']:.3f}  "
                  f"step {result['median_step_seconds'] * 1000:7.1f} ms  rss {result['peak_rss_bytes'] / MIB:5.0f} MiB "
                  f"(+{(result['peak_rss_bytes'] - result['rss_before_training_bytes']) / MIB:.0f})", flush=True)
    baseline = next((row for row in rows if row.name == args.baseline), None) or next((row for row in rows if row.baseline), rows[0])
    summarise(rows, baseline)
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    meta = {
        "workload": setup.name, "title": setup.title, "command": command, "description": setup.description,
        "batch_size": setup.batch_size, "epochs": setup.epochs, "lr": setup.lr, **setup.meta,
        "baseline": baseline.name, "untrained_accuracy": untrained, "torch_vs_onnx_max_abs_diff": verify,
        "checkpoints_during_training": bool(args.checkpoints), "profiler_measure": bool(args.measure),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    return {"meta": meta, "rows": [dataclasses.asdict(row) | {"recipe_file": str(row.recipe_file.relative_to(ROOT)) if row.recipe_file else None} for row in rows]}


def summarise(rows: list[Row], base: Row) -> None:
    for row in rows:
        acc = [run["accuracy"] for run in row.runs]
        steps = [run["median_step_seconds"] for run in row.runs]
        peaks = [run["peak_rss_bytes"] for run in row.runs]
        added = [run["peak_rss_bytes"] - run["rss_before_training_bytes"] for run in row.runs]
        trainable = (row.report or {}).get("parameters", {}).get("trainable_values") or (row.runs[0].get("trainable_values") if row.runs else None)
        row.summary = {
            "accuracy_mean": float(np.mean(acc)), "accuracy_std": float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0,
            "accuracy_min": float(min(acc)), "accuracy_max": float(max(acc)),
            "median_step_seconds": statistics.median(steps), "step_seconds_min": min(steps), "step_seconds_max": max(steps),
            "peak_rss_bytes": statistics.median(peaks), "peak_rss_min": min(peaks), "peak_rss_max": max(peaks),
            "rss_added_bytes": statistics.median(added),
            "rss_before_training_bytes": statistics.median(run["rss_before_training_bytes"] for run in row.runs),
            "trainable_values": trainable,
            "retained_activation_bytes": (row.static or {}).get("retained_activation_bytes"),
            "total_training_bytes": (row.static or {}).get("total_training_bytes"),
            "rewrite_seconds": statistics.median(row.rewrite_seconds) if row.rewrite_seconds else None,
            "fine_tune_seconds": statistics.median(run["steps"] * run["median_step_seconds"] for run in row.runs),
            "backward_macs": (row.static or {}).get("backward_macs"),
            **shortcut_summary(row),
        }
    b = base.summary
    for row in rows:
        s = row.summary
        for key, ratio in (("median_step_seconds", "step_ratio"), ("peak_rss_bytes", "rss_ratio"), ("rss_added_bytes", "rss_added_ratio"),
                           ("retained_activation_bytes", "retained_ratio"), ("total_training_bytes", "total_ratio")):
            s[ratio] = s[key] / b[key] if s.get(key) is not None and b.get(key) else None


def shortcut_summary(row: Row) -> dict[str, Any]:
    """activation-shortcut rows: what the pass kept instead of the compressed layers' inputs (static,
    counted by the pass at the workload batch size), and the step's static figures corrected for it.

    The profiler reads shapes from the eval model, so it cannot size the compressed tensors (they exist
    only in the training graph) and counts them as nothing; its backward MACs come from the forward ops and
    the gradients that exist, so they do not see the cheaper weight gradients either. Both are corrected here
    from the pass's own counts: retained + kept; backward - what the profiler gave the compressed layers + the
    pass's count for them."""
    entry = next((p for p in (row.report or {}).get("passes", []) if p["name"] == "activation-shortcut"), None)
    if entry is None:
        return {"shortcut": None}
    d = entry["details"]
    retained = (row.static or {}).get("retained_activation_bytes")
    backward = (row.static or {}).get("backward_macs")
    by_node = (row.static or {}).get("backward_macs_by_node", {})
    counted = sum(by_node.get(layer["node"], 0) for layer in d["layers"])  # what the profiler gave those layers
    return {
        "shortcut": {"method": d["method"], "layers": len(d["layers"]), "vanilla_bytes": d["vanilla_bytes"],
                     "compressed_bytes": d["compressed_bytes"], "compression": d["compression"],
                     "backward_macs": d["backward_macs"], "vanilla_backward_macs": d["vanilla_backward_macs"],
                     "inputs_freed": d["inputs_freed"],
                     "ranks": {layer["node"]: layer.get("ranks") for layer in d["layers"]} if d["method"] == "asi" else None},
        "retained_activation_bytes": None if retained is None else retained + d["compressed_bytes"],
        "retained_profiler_bytes": retained,
        "backward_macs": None if backward is None else backward - counted + d["backward_macs"],
    }


def shortcut_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The activation-shortcut table (only when some row uses the pass)."""
    if not any(row["summary"].get("shortcut") for row in rows):
        return []
    lines = ["", "activation-shortcut: inputs of the compressed layers (static, counted by the pass at the workload batch "
             "size; kept = core + factors or pooled input) and the backward MACs of those layers' gradients "
             "(onnxruntime's vanilla ConvGrad/Gemm vs the rewritten nodes; dX included in both):", "",
             "| row | accuracy | layers | their inputs, vanilla (KiB) | kept (KiB) | smaller by | backward MACs of the layers, vanilla / shortcut (M) "
             "| step backward MACs (M) | retained activations (MiB) | peak RSS (MiB) | RSS added (MiB) | median step (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        s = row["summary"]
        short = s.get("shortcut")
        macs = s.get("backward_macs")
        layers = (f"| {short['layers']} {short['method']} | {short['vanilla_bytes'] / 1024:,.1f} | {short['compressed_bytes'] / 1024:,.2f} "
                  f"| {short['compression']:.1f}x | {short['vanilla_backward_macs'] / 1e6:,.1f} / {short['backward_macs'] / 1e6:,.1f} ") if short else "| - | - | - | - | - "
        lines.append(f"| {row['label']} (`{row['name']}`) | {s['accuracy_mean']:.3f} ± {s['accuracy_std']:.3f} {layers}"
                     f"| {'n/a' if macs is None else f'{macs / 1e6:,.0f}'} | {_mib(s['retained_activation_bytes'], 2)} "
                     f"| {_mib(s['peak_rss_bytes'], 0)} | {_mib(s['rss_added_bytes'], 0)} | {s['median_step_seconds'] * 1000:.1f} |")
    lines += ["", "Retained activations of shortcut rows = the profiler's count (which cannot size tensors that exist only in "
              "the training graph) + the kept bytes; step backward MACs = the profiler's count with what it gives the "
              "compressed layers replaced by the pass's count. Compressed rows keep the ReLU6 (Clip) masks' inputs, "
              "which are the conv outputs, as vanilla does: only the conv inputs are compressed."]
    return lines


# -- output ---------------------------------------------------------------------------------------

def _mib(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value / MIB:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def markdown(result: dict[str, Any]) -> str:
    meta, rows = result["meta"], result["rows"]
    lines = [f"# {meta['title']}", "", f"Command: `{meta['command']}`  "]
    lines += [text + "  " for text in meta["description"]]
    lines += [
        (f"Optimizer: from `bench/recipes/full.yaml` for the baselines ({rows[0]['recipe']['optimizer']['name'] if rows[0].get('recipe') else '?'}); "
         "the torch rows use torch.optim with onnxruntime-training's defaults (AdamW betas 0.9/0.999, eps 1e-6, no weight decay)."
         f" Each training runs in a fresh process; rows are interleaved run by run. Epoch-end checkpoints: "
         f"{'on' if meta['checkpoints_during_training'] else 'off (as in the torch rows)'}.  "),
        f"Machine: {meta['machine']}; shared with other jobs: times are medians, compare within this table only.  ",
        f"Wall time of this workload: {meta['wall_seconds']:.0f} s.",
        "",
        "| row | accuracy (mean ± std) | retained activations (MiB) | total training bytes (MiB) | peak RSS (MiB) "
        "| RSS added by training (MiB) | median step (ms) | trainable values | retained / full | total / full | RSS / full | RSS added / full | step / full |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row["summary"]
        trainable = f"{s['trainable_values']:,}" if s.get("trainable_values") else "n/a"
        lines.append(
            f"| {row['label']} (`{row['name']}`) | {s['accuracy_mean']:.3f} ± {s['accuracy_std']:.3f} "
            f"| {_mib(s['retained_activation_bytes'], 2)} | {_mib(s['total_training_bytes'], 2)} | {_mib(s['peak_rss_bytes'], 0)} "
            f"| {_mib(s['rss_added_bytes'], 0)} | {s['median_step_seconds'] * 1000:.1f} | {trainable} "
            f"| {_ratio(s['retained_ratio'])} | {_ratio(s['total_ratio'])} | {_ratio(s['rss_ratio'])} | {_ratio(s['rss_added_ratio'])} | {_ratio(s['step_ratio'])} |"
        )
    lines += [
        "",
        f"Ratios are to `{meta['baseline']}`. Accuracy: mean ± sample std over {len(rows[0]['runs'])} runs "
        f"(episodes/seeds) on the held-out query/test set"
        + (f"; before any training (the initial weights, eval-mode export) {meta['untrained_accuracy']:.3f}." if meta.get("untrained_accuracy") is not None else "."),
        "",
        "- **retained activations / total training bytes**: static, from `edgeplug.profiling.static_profile` at the "
        "workload's batch size (total = parameters + gradients + optimizer state + retained activations). n/a for torch rows.",
        "- **peak RSS**: VmHWM of the training child at the end of training (median over runs); it includes the "
        "interpreter, numpy, the runtime (onnxruntime or torch), the model and the data. **RSS added by training** = "
        "peak − VmHWM just before the first step (after the model, sessions and data were loaded).",
        "- **median step**: median over runs of each run's median time of one training step (forward, backward, "
        "optimizer step, gradient reset).",
    ]
    if meta.get("torch_vs_onnx_max_abs_diff"):
        lines.append("- torch baseline model vs the ONNX model, same input: max abs difference of the logits "
                     + ", ".join(f"{v:.1e} ({k})" for k, v in meta["torch_vs_onnx_max_abs_diff"].items()) + ".")
    if any(row.get("measured") for row in rows):
        lines += ["", "Profiler `measure` (fresh processes, synthetic batch, median over steps after warm-up):", "",
                  "| row | train peak RSS (MiB) | inference peak RSS (MiB) | runtime baseline RSS (MiB) | median step (ms) | median inference (ms) |",
                  "|---|---|---|---|---|---|"]
        for row in rows:
            m = row.get("measured")
            if m:
                lines.append(f"| `{row['name']}` | {_mib(m['train_peak_rss_bytes'], 0)} | {_mib(m['inference_peak_rss_bytes'], 0)} "
                             f"| {_mib(m['baseline_rss_bytes'], 0)} | {m['median_step_seconds'] * 1000:.1f} | {m['median_inference_seconds'] * 1000:.1f} |")
    calibrated = [row for row in rows if row.get("calibration")]
    if calibrated:
        lines += ["", "Rewrite time of rows that read the run's support set (the selection runs on the device, once per "
                  "episode), next to the fine-tuning it prepares (steps × median step):", "",
                  "| row | rewrite (s, median) | fine-tuning (s, median) | rewrite / fine-tuning | rewrite / full fine-tune |",
                  "|---|---|---|---|---|"]
        base = next(row for row in rows if row["name"] == meta["baseline"])["summary"]
        for row in calibrated:
            s = row["summary"]
            lines.append(f"| `{row['name']}` | {s['rewrite_seconds']:.2f} | {s['fine_tune_seconds']:.2f} "
                         f"| {s['rewrite_seconds'] / s['fine_tune_seconds']:.2f} | {s['rewrite_seconds'] / base['fine_tune_seconds']:.2f} |")
    fbn = [(row["name"], p["summary"]) for row in rows for p in (row.get("report") or {}).get("passes", []) if p["name"] == "freeze-bn"]
    if fbn:
        lines += ["", "freeze-bn summaries from report.json:", ""] + [f"- `{name}`: {summary}" for name, summary in fbn]
    lines += shortcut_markdown(rows)
    lines += ["", "Per-run numbers: the `.json` file next to this one (`rows[].runs`)."]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    figure, axes = plt.subplots(1, 2, figsize=(14, 5.8))
    colours = plt.cm.tab20(np.linspace(0, 1, max(len(rows), 2)))
    for colour, row in zip(colours, rows):
        s = row["summary"]
        marker = "s" if row["kind"] == "torch" else ("o" if row.get("export", "eval") == "eval" else "^")
        for axis, x, lo, hi, scale in (
            (axes[0], s["peak_rss_bytes"], s["peak_rss_min"], s["peak_rss_max"], 1 / MIB),
            (axes[1], s["median_step_seconds"], s["step_seconds_min"], s["step_seconds_max"], 1000),
        ):
            axis.errorbar(x * scale, s["accuracy_mean"], yerr=s["accuracy_std"], xerr=[[(x - lo) * scale], [(hi - x) * scale]],
                          fmt=marker, color=colour, capsize=4, markersize=8, label=row["name"])
            axis.annotate(row["name"], (x * scale, s["accuracy_mean"]), textcoords="offset points", xytext=(6, 4), fontsize=7)
    axes[0].set_xlabel("peak RSS of the training process (MiB; bars: min..max over runs)")
    axes[1].set_xlabel("median train step (ms; bars: min..max over runs)")
    for axis in axes:
        axis.set_ylabel("accuracy (bars: ± std over runs)")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    meta = result["meta"]
    figure.suptitle(f"{meta['title']} (o: ORT, ^: ORT on BN export, s: PyTorch eager)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_results(result: dict[str, Any], results: Path, name: str) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    (results / f"{name}.md").write_text(markdown(result), encoding="utf-8")
    plot(result, results / f"{name}.png")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(sys.argv[2])
    else:
        raise SystemExit("harness.py is the bench's machinery; run python bench/run.py (see bench/README.md)")
