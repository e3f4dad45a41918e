#!/usr/bin/env python
"""The JavaScript runtime (onnxruntime-web, WebAssembly, in Node) against the Python trainer.

Two questions, on the digits example CNN and on pretrained EfficientNet-Lite0 (224 px):

1. **Parity**: for every built-in pass whose folders train on this runtime, the same
   folder trained by `edgeplug train` (Python) and `edgeplug train --runtime node`
   (one WebAssembly thread): the largest relative difference of the step losses, the
   largest difference of the final trainable parameters (relative to each tensor's
   largest value), and the accuracy of both exported models on the query set.
2. **Cost**: step time and peak memory of Node with 1 and 2 WebAssembly threads vs
   Python (onnxruntime-training's default threads, 2 cores), runs interleaved, every
   run in a fresh process. Memory is the process's peak resident set (VmHWM /
   Node's maxRSS) over the same run: load, open, train.

Data: scikit-learn's digits (BSD-3-Clause, shipped in scikit-learn). Few-shot: 5 shots
per class from one half, the other half is the query set; EfficientNet sees the 8x8
digits upscaled to 224x224, 3 channels. Needs `runtimes/web`'s npm packages (`npm ci`)
and, for EfficientNet, an exported model (`tests/fixtures/make_efficientnet_lite0.py
OUT --mode eval --num-classes 10`, needs the bench extra with torch) or `--effnet`.

    python bench/web_runtime.py --effnet /tmp/effnet_eval_224_10.onnx [--quick]

Writes bench/results/web_runtime.{json,md}.
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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeplug import rewrite, tensorfile  # noqa: E402
from edgeplug.checkpoints import DEVICE_STATE, latest_checkpoint  # noqa: E402
from edgeplug.recipe import recipe_from_dict  # noqa: E402

EXAMPLE = ROOT / "examples" / "digits_fewshot"
RESULTS = ROOT / "bench" / "results"

# recipe rows: (label, recipe, needs calibration data). Every built-in pass whose folders train without Python.
DIGITS_ROWS: list[tuple[str, dict[str, Any], bool]] = [
    ("example: trainable{2} + freeze-bn", {"optimizer": {"name": "adamw", "lr": 0.01},
                                           "passes": [{"name": "trainable", "options": {"layers": 2}}, {"name": "freeze-bn", "options": {"layers": "all"}}]}, False),
    ("full fine-tune, SGD, cosine + warm-up", {"optimizer": {"name": "sgd", "lr": 0.05, "schedule": {"name": "cosine", "warmup_steps": 3}}, "passes": []}, False),
    ("sparse-update (tinytrain, 50 kB)", {"optimizer": {"name": "adamw", "lr": 0.01},
                                          "passes": [{"name": "sparse-update", "options": {"strategy": "tinytrain", "memory_budget_bytes": 50000, "batch_size": 10}}]}, True),
    ("sparse-update + quantize-frozen (int8)", {"optimizer": {"name": "adamw", "lr": 0.01},
                                               "passes": [{"name": "sparse-update", "options": {"strategy": "tinytrain", "memory_budget_bytes": 50000, "batch_size": 10}},
                                                          {"name": "quantize-frozen"}]}, True),
    ("new-head (prototypes) + last layer", {"optimizer": {"name": "adamw", "lr": 0.01},
                                            "passes": [{"name": "new-head", "options": {"classes": 10}}, {"name": "trainable", "options": {"layers": 1}}]}, True),
    ("lls (lls-m, staged)", {"optimizer": {"name": "adamw", "lr": 0.01}, "passes": [{"name": "lls", "options": {"variant": "lls-m"}}]}, False),
    ("qcore (float artifacts)", {"optimizer": {"name": "adamw", "lr": 0.01}, "passes": [{"name": "qcore", "options": {"bits": 4}}]}, False),
    ("activation-shortcut (asi)", {"optimizer": {"name": "adamw", "lr": 0.01},
                                   "passes": [{"name": "activation-shortcut", "options": {"last": 2, "method": "asi", "compression": 20}}]}, True),
]
EFFNET_ROWS: list[tuple[str, dict[str, Any], bool]] = [
    ("last layer", {"optimizer": {"name": "adamw", "lr": 0.001}, "passes": [{"name": "trainable", "options": {"layers": "classifier"}}]}, False),
    ("last 5 layers + freeze-bn", {"optimizer": {"name": "adamw", "lr": 0.001, "schedule": {"name": "linear"}},
                                   "passes": [{"name": "trainable", "options": {"layers": 5}}, {"name": "freeze-bn", "options": {"layers": "all"}}]}, False),
    ("sparse-update (tinytrain, 1.5 MB)", {"optimizer": {"name": "adamw", "lr": 0.001},
                                           "passes": [{"name": "sparse-update", "options": {"strategy": "tinytrain", "memory_budget_bytes": 1500000, "batch_size": 10}}]}, True),
    ("sparse-update + quantize-frozen (int8)", {"optimizer": {"name": "adamw", "lr": 0.001},
                                               "passes": [{"name": "sparse-update", "options": {"strategy": "tinytrain", "memory_budget_bytes": 1500000, "batch_size": 10}},
                                                          {"name": "quantize-frozen"}]}, True),
    ("full fine-tune", {"optimizer": {"name": "adamw", "lr": 0.0001}, "passes": []}, False),
]


def digits_images(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as 3-channel images of `image_size` px in [-1, 1] (nearest-neighbour upscaling)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    factor = image_size // 8
    images = (digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0).repeat(factor, axis=1).repeat(factor, axis=2)
    return np.ascontiguousarray(np.repeat(images[:, None], 3, axis=1)), digits.target.astype(np.int64)


def fewshot(x: np.ndarray, y: np.ndarray, shots: int, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    pool, query = order[: len(y) // 2], order[len(y) // 2 :]
    support = np.concatenate([pool[y[pool] == c][:shots] for c in range(10)])
    return {"x": x[support], "y": y[support]}, {"x": x[query], "y": y[query]}


def workload(name: str, work: Path, effnet: Path | None) -> tuple[Path, str, Path, Path]:
    """(model, input name, support .npz, query .npz)."""
    from sklearn.datasets import load_digits

    if name == "digits":
        digits = load_digits()
        x = (digits.images.astype(np.float32) / 16.0)[:, None]
        model, input_name = EXAMPLE / "pretrained_cnn.onnx", "image"
    else:
        assert effnet is not None
        x, _ = digits_images(224)
        digits = load_digits()
        model, input_name = effnet, "input"
    support, query = fewshot(x, digits.target.astype(np.int64), shots=5)
    paths = []
    for label, data in (("support", support), ("query", query)):
        path = work / f"{name}-{label}.npz"
        np.savez(path, **{input_name: data["x"], "y": data["y"]})
        paths.append(path)
    return model, input_name, paths[0], paths[1]


def cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeplug.cli", *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


def train(folder: Path, support: Path, *, runtime: str, epochs: int, batch: int, threads: int = 1, metrics: Path,
          checkpoints: bool = True) -> dict[str, Any]:
    args = ["train", str(folder), "--data", str(support), "--epochs", str(epochs), "--batch-size", str(batch), "--restart",
            "--metrics", str(metrics)]
    args += ["--runtime", "node", "--threads", str(threads)] if runtime == "node" else ["--no-progress"]
    if not checkpoints:
        args.append("--no-checkpoints")
    run = cli(*args)
    if run.returncode != 0:
        raise RuntimeError(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}")
    return json.loads(metrics.read_text())


def trained(folder: Path) -> dict[str, np.ndarray]:
    """Trainable parameters of the newest checkpoint, every artifact set (keys prefixed by the set)."""
    from edgeplug import _ort

    checkpoint = latest_checkpoint(folder)
    assert checkpoint is not None
    if (checkpoint / DEVICE_STATE).is_file():
        tensors, _ = tensorfile.load(checkpoint / DEVICE_STATE)
        return {key.replace(":param:", ":"): value for key, value in tensors.items() if ":param:" in key}
    api = _ort.training_api()
    states = sorted((checkpoint / "state").iterdir()) if (checkpoint / "state").is_dir() else [checkpoint / "state"]
    out = {}
    for number, path in enumerate(states):
        state = api.CheckpointState.load_checkpoint(str(path))
        out.update({f"{number}:{name}": np.array(p.data) for name, p in state.parameters if p.requires_grad})
    return out


def logits(model: Path, query: Path, input_name: str) -> np.ndarray:
    import onnxruntime

    data = np.load(query)
    session = onnxruntime.InferenceSession(str(model))
    return np.concatenate([session.run(None, {input_name: data[input_name][i : i + 64]})[0] for i in range(0, len(data["y"]), 64)])


def parity_row(name: str, label: str, recipe: dict[str, Any], calibration: bool, model: Path, input_name: str,
               support: Path, query: Path, work: Path, epochs: int, batch: int) -> dict[str, Any]:
    row: dict[str, Any] = {"workload": name, "recipe": label}
    folder = work / f"{name}-{len(list(work.iterdir()))}"
    arrays = dict(np.load(support)) if calibration else None
    try:
        rewrite(model, recipe_from_dict({"loss": "cross-entropy", **recipe}), folder, calibration=arrays)
    except Exception as error:  # a pass that refuses this model: say so in the table
        row["error"] = f"rewrite: {error}"
        return row
    report = json.loads((folder / "report.json").read_text())["device_runtime"]
    row["sets"] = len(report["artifact_sets"])
    if report["needs_python"]:
        node = cli("train", str(folder), "--data", str(support), "--runtime", "node")
        row["refused"] = node.stderr.strip()
        return row
    results = {}
    for runtime in ("python", "node"):
        copy = work / f"{folder.name}-{runtime}"
        shutil.copytree(folder, copy)
        results[runtime] = train(copy, support, runtime=runtime, epochs=epochs, batch=batch, metrics=copy / "metrics.json")
        exported = copy / "trained.onnx"
        done = cli("export", str(copy), "-o", str(exported))
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        row[f"{runtime}_logits"] = logits(exported, query, input_name)
        row[f"{runtime}_accuracy"] = float((row[f"{runtime}_logits"].argmax(1) == np.load(query)["y"]).mean())
    a_logits, b_logits = row.pop("python_logits"), row.pop("node_logits")
    row["prediction_disagreements"] = int((a_logits.argmax(1) != b_logits.argmax(1)).sum())
    row["max_logit_diff"] = float(np.abs(a_logits - b_logits).max())
    top2 = np.sort(a_logits, axis=1)[:, -2:]
    disagree = a_logits.argmax(1) != b_logits.argmax(1)
    row["disagreement_top2_gap"] = float((top2[:, 1] - top2[:, 0])[disagree].max()) if disagree.any() else None
    a, b = np.array(results["python"]["step_losses"]), np.array(results["node"]["step_losses"])
    row["steps"] = len(a)
    row["loss_first_last"] = [float(a[0]), float(a[-1])]
    row["max_rel_loss_diff"] = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-30)))
    row["max_abs_loss_diff"] = float(np.max(np.abs(a - b)))
    pa, pb = trained(work / f"{folder.name}-python"), trained(work / f"{folder.name}-node")
    assert set(pa) == set(pb), (sorted(pa)[:3], sorted(pb)[:3])
    row["max_param_diff"] = max(float(np.abs(pa[k] - pb[k]).max() / max(np.abs(pa[k]).max(), 1e-12)) for k in pa)
    row["trainable_values"] = int(sum(v.size for v in pa.values()))
    return row


def bootstrap_median_ratio(a: list[float], b: list[float], rng: np.random.Generator, n: int = 2000) -> tuple[float, float, float]:
    """Median(b)/median(a) with a 95% bootstrap interval (steps resampled within each run set)."""
    aa, bb = np.array(a), np.array(b)
    ratios = [np.median(rng.choice(bb, len(bb))) / np.median(rng.choice(aa, len(aa))) for _ in range(n)]
    return float(np.median(bb) / np.median(aa)), float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def cost_rows(name: str, label: str, recipe: dict[str, Any], model: Path, support: Path, work: Path, batch: int,
              epochs: int, repeats: int) -> dict[str, Any]:
    folder = work / f"cost-{len(list(work.glob('cost-*')))}"
    rewrite(model, recipe_from_dict({"loss": "cross-entropy", **recipe}), folder)
    runs: dict[str, list[dict[str, Any]]] = {"python": [], "node-1": [], "node-2": []}
    loads = []
    for repeat in range(repeats):  # interleaved: every runtime once per repeat
        for key in runs:
            runtime, threads = ("python", 1) if key == "python" else ("node", int(key[-1]))
            loads.append(os.getloadavg()[0])
            result = train(folder, support, runtime=runtime, threads=threads, epochs=epochs, batch=batch,
                           metrics=work / f"cost-{name}-{key}-{repeat}.json", checkpoints=False)
            runs[key].append(result)
    rng = np.random.default_rng(0)
    summary: dict[str, Any] = {"workload": name, "recipe": label, "batch": batch, "repeats": repeats,
                               "load_average": [round(min(loads), 2), round(max(loads), 2)]}
    python_steps = [t for r in runs["python"] for t in r["step_seconds"][1:]]  # the first step warms up
    for key, results in runs.items():
        steps = [t for r in results for t in r["step_seconds"][1:]]
        summary[key] = {"median_step_ms": round(1000 * statistics.median(steps), 2), "steps": len(steps),
                        "peak_rss_mib": round(statistics.median(r["peak_rss_bytes"] for r in results) / 2**20, 1)}
        if key != "python":
            ratio, low, high = bootstrap_median_ratio(python_steps, steps, rng)
            summary[key]["time_vs_python"] = [round(ratio, 2), round(low, 2), round(high, 2)]
    return summary


def markdown(parity: list[dict[str, Any]], costs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# JavaScript runtime (onnxruntime-web 1.19.2, WebAssembly in Node) vs Python (onnxruntime-training 1.19.2)", "",
             f"`python bench/web_runtime.py {' '.join(meta['argv'])}` — {meta['date']}, Node {meta['node']}, 2 cores shared "
             f"with other jobs (load averages per table below). Parity runs: one WebAssembly thread, {meta['epochs']} epochs "
             f"(digits CNN) / {meta['effnet_epochs']} (EfficientNet-Lite0, 224 px) at batch {meta['batch']} on a 50-image "
             f"support set (5 per class), exported models scored on the {meta['query']}-image query set.", "",
             "## Parity: the same folder trained by both runtimes", "",
             "| model | recipe | sets | steps | loss first → last | max rel. loss diff | max abs. loss diff | max param diff (rel.) | exported acc. Python | exported acc. Node | predictions that differ (top-2 gap) | max logit diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in parity:
        if "refused" in r or "error" in r:
            lines.append(f"| {r['workload']} | {r['recipe']} | – | – | – | – | – | – | – | {'refused: ' + r['refused'] if 'refused' in r else r['error']} | – | – |")
            continue
        lines.append(f"| {r['workload']} | {r['recipe']} | {r['sets']} | {r['steps']} | {r['loss_first_last'][0]:.4f} → {r['loss_first_last'][1]:.4f} "
                     f"| {r['max_rel_loss_diff']:.1e} | {r['max_abs_loss_diff']:.1e} | {r['max_param_diff']:.1e} | {r['python_accuracy']:.4f} | {r['node_accuracy']:.4f} "
                     f"| {r.get('prediction_disagreements', '–')}" + (f" ({r['disagreement_top2_gap']:.1e})" if r.get('disagreement_top2_gap') is not None else "")
                     + f" | {r.get('max_logit_diff', float('nan')):.1e} |")
    lines += ["", "## Cost: step time and peak memory", "",
              "Median step time over all timed steps (first step of each run dropped), WebAssembly/Python ratio of the medians "
              "with a 95% bootstrap interval; peak RSS = the process's peak resident memory over the whole run (median of the "
              "repeats). Runs interleaved, fresh process each.", "",
              "| model | recipe | batch | Python ms | Node 1 thread ms (× Python, 95% CI) | Node 2 threads ms (× Python, 95% CI) | peak RSS MiB Python / Node 1 / Node 2 | load avg |",
              "|---|---|---|---|---|---|---|---|"]
    for c in costs:
        def cell(key: str) -> str:
            r = c[key]["time_vs_python"]
            return f"{c[key]['median_step_ms']} ({r[0]}×, {r[1]}–{r[2]})"
        lines.append(f"| {c['workload']} | {c['recipe']} | {c['batch']} | {c['python']['median_step_ms']} | {cell('node-1')} | {cell('node-2')} "
                     f"| {c['python']['peak_rss_mib']} / {c['node-1']['peak_rss_mib']} / {c['node-2']['peak_rss_mib']} | {c['load_average'][0]}–{c['load_average'][1]} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--effnet", type=Path, help="EfficientNet-Lite0 ONNX (eval export, 10 classes, 224 px)")
    parser.add_argument("--epochs", type=int, default=3, help="parity epochs on the digits CNN")
    parser.add_argument("--effnet-epochs", type=int, default=1, help="parity epochs on EfficientNet-Lite0")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each cost run (digits)")
    parser.add_argument("--effnet-repeats", type=int, default=2, help="interleaved repeats of each EfficientNet cost run")
    parser.add_argument("--quick", action="store_true", help="fewer rows and repeats (a smoke run)")
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-digits-cost", action="store_true")
    parser.add_argument("--effnet-cost", nargs="*", default=[EFFNET_ROWS[0][0], EFFNET_ROWS[-1][0]], metavar="LABEL",
                        help="EfficientNet rows to time (labels; default: last layer and full fine-tune)")
    parser.add_argument("--output", type=Path, default=RESULTS / "web_runtime")
    parser.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                        help="write the tables from earlier runs' JSON files (e.g. a --skip-cost and a --skip-parity run)")
    args = parser.parse_args()
    if args.combine:
        runs = [json.loads(path.read_text()) for path in args.combine]
        meta = {**runs[0]["meta"], "argv": [" + ".join(" ".join(run["meta"]["argv"]) for run in runs)]}
        parity = [row for run in runs for row in run["parity"]]
        costs = [row for run in runs for row in run["cost"]]
        args.output.with_suffix(".json").write_text(json.dumps({"meta": meta, "parity": parity, "cost": costs}, indent=1) + "\n")
        args.output.with_suffix(".md").write_text(markdown(parity, costs, meta))
        print(f"wrote {args.output.with_suffix('.md')}")
        return 0
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    parity: list[dict[str, Any]] = []
    costs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgeplug-bench-web-") as scratch:
        work = Path(scratch)
        workloads = {"digits CNN": workload("digits", work, None)}
        if args.effnet:
            workloads["EfficientNet-Lite0"] = workload("effnet", work, args.effnet)
        query_size = len(np.load(workloads["digits CNN"][3])["y"])
        for name, (model, input_name, support, query) in workloads.items():
            rows = DIGITS_ROWS if name == "digits CNN" else EFFNET_ROWS
            for label, recipe, calibration in (rows[:2] if args.quick else rows) if not args.skip_parity else []:
                started = time.perf_counter()
                epochs = args.epochs if name == "digits CNN" else args.effnet_epochs
                try:
                    row = parity_row(name, label, recipe, calibration, model, input_name, support, query, work, epochs, args.batch)
                except RuntimeError as error:  # a runtime failed on this folder: a row that says so, not a crashed bench
                    row = {"workload": name, "recipe": label, "error": str(error)}
                row["seconds"] = round(time.perf_counter() - started, 1)
                print(json.dumps(row), flush=True)
                parity.append(row)
        if not args.skip_cost:
            repeats = 1 if args.quick else args.repeats
            model, _, support, _ = workloads["digits CNN"]
            if not args.skip_digits_cost:
                costs.append(cost_rows("digits CNN", DIGITS_ROWS[0][0], DIGITS_ROWS[0][1], model, support, work, 10, 4, repeats))
                print(json.dumps(costs[-1]), flush=True)
            if args.effnet:
                model, _, support, _ = workloads["EfficientNet-Lite0"]
                for label, recipe, _ in [row for row in (EFFNET_ROWS[0], EFFNET_ROWS[-1]) if row[0] in args.effnet_cost]:
                    costs.append(cost_rows("EfficientNet-Lite0", label, recipe, model, support, work, 16, 1,
                                           1 if args.quick else args.effnet_repeats))
                    print(json.dumps(costs[-1]), flush=True)
    meta = {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "node": node,
            "epochs": args.epochs, "effnet_epochs": args.effnet_epochs, "batch": args.batch, "query": query_size}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps({"meta": meta, "parity": parity, "cost": costs}, indent=1) + "\n")
    args.output.with_suffix(".md").write_text(markdown(parity, costs, meta))
    print(f"wrote {args.output.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
