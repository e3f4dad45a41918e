#!/usr/bin/env python
"""new-head's prototype scale and linear-probe penalty: which makes the best start for training the head.

The penultimate features of pretrained EfficientNet-Lite0 (ImageNet weights, eval-mode
export, the same file as bench/new_head.py) are computed once for every digit image by
plain onnxruntime inference, through new-head's own feature code. Per episode (the
bench/protocol sampler: 2..5 ways, 4..8 shots, validation shots split off) the head is
initialised by new-head's `prototypes` at each scale, `linear-probe` at each L2 penalty,
and `random` and trained on the frozen features the way last-layer training does it:
softmax cross-entropy, AdamW (what generate_artifacts builds: betas 0.9/0.999, eps 1e-6,
no weight decay), full batches, `--steps` steps, lr chosen per row and episode on the
validation shots from a grid. Only the head trains, so this is last-layer training with
the backbone's features precomputed: seconds instead of hours, 30+ episodes.

    python bench/new_head_scale.py --episodes 40      # bench/results/new_head_scale.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from new_head import digits_images, export_efficientnet_1000  # noqa: E402
from protocol import episodes as episodes_module  # noqa: E402
from protocol import lr_search, stats  # noqa: E402

from edgeplug.data import Dataset  # noqa: E402
from edgeplug_plugins.new_head import inits  # noqa: E402
from edgeplug_plugins.new_head.features import penultimate_features  # noqa: E402
from edgeplug_plugins.new_head.locate import find_head  # noqa: E402

RESULTS = BENCH / "results"
SCALES = [1.0, 3.0, 10.0, 30.0, 100.0]
PROBE_L2 = [0.001, 0.01, 0.1, 1.0]
GRID = [1e-3, 1e-2, 1e-1]


def adamw(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray, lr: float, steps: int,
          decay: float = 0.0, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Full-batch AdamW on softmax cross-entropy (onnxruntime-training's AdamW defaults)."""
    params = [weight.copy(), bias.copy()]
    moments = [[np.zeros_like(p), np.zeros_like(p)] for p in params]
    onehot = np.eye(weight.shape[0])[y]
    for t in range(1, steps + 1):
        logits = x @ params[0].T + params[1]
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        delta = (probs - onehot) / len(y)
        grads = [delta.T @ x, delta.sum(axis=0)]
        for p, g, m in zip(params, grads, moments, strict=True):
            m[0] = 0.9 * m[0] + 0.1 * g
            m[1] = 0.999 * m[1] + 0.001 * g * g
            p *= 1 - lr * decay
            p -= lr * (m[0] / (1 - 0.9**t)) / (np.sqrt(m[1] / (1 - 0.999**t)) + eps)
    return params[0], params[1]


def evaluate(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    logits = x @ weight.T + bias
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float((logits.argmax(axis=1) == y).mean()), float(-log_probs[np.arange(len(y)), y].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeplug-new-head-scale-"))
    model_path = export_efficientnet_1000(work, args.image_size)
    model = onnx.load(str(model_path))
    x, y = digits_images(args.image_size)
    head = find_head(model, model.graph.output[0].name)
    started = time.perf_counter()
    features = penultimate_features(model, head, Dataset({"input": x}, y), 64)
    feature_seconds = time.perf_counter() - started
    domain = episodes_module.Domain("digits", y)
    config = episodes_module.EpisodeConfig(ways=(2, 5), shots=(4, 8), query=20, validation=0.25)
    rows: dict[str, list[float]] = {}
    choices: dict[str, list[float]] = {}
    initial: dict[str, list[float]] = {}
    for episode in episodes_module.sample_episodes([domain], args.episodes, config, seed=0):
        train_x, train_y = features[episode.train], episode.train_labels
        val_x, val_y = features[episode.validation], episode.validation_labels
        query_x, query_y = features[episode.query], episode.query_labels
        heads = {f"prototypes scale {s:g}": inits.prototypes(train_x, train_y, episode.ways, s) for s in SCALES}
        for l2 in PROBE_L2:
            heads[f"linear probe l2 {l2:g}"] = inits.linear_probe(train_x, train_y, episode.ways, l2)
        heads["random"] = inits.random(episode.ways, train_x.shape[1], seed=0)
        for name, start in heads.items():
            initial.setdefault(name, []).append(evaluate(start.weight, start.bias, query_x, query_y)[0])

            def train_and_validate(lr: float, start: inits.HeadInit = start) -> lr_search.Candidate:
                w, b = adamw(start.weight, start.bias, train_x, train_y, lr, args.steps)
                val_acc, val_loss = evaluate(w, b, val_x, val_y)
                query_acc, query_loss = evaluate(w, b, query_x, query_y)
                return lr_search.Candidate(lr, val_acc, val_loss, query_acc, query_loss)

            choice = lr_search.search_lr(GRID, train_and_validate)
            rows.setdefault(name, []).append(float(choice.chosen.query_accuracy))
            choices.setdefault(name, []).append(choice.lr)
    names = list(rows)
    lines = [f"# new-head: prototype scale and probe penalty, training the head ({args.episodes} episodes)", "",
             f"- Features: EfficientNet-Lite0 (ImageNet, eval-mode export, {args.image_size}x{args.image_size}), "
             f"penultimate (1280) by onnxruntime inference of all {len(y)} sklearn digits images ({feature_seconds:.0f} s).",
             f"- Episodes: 2..5 ways, 4..8 shots (25% validation shots), 20 query images per class; head trained by "
             f"full-batch AdamW (eps 1e-6, no weight decay, as onnxruntime-training builds it) for {args.steps} steps, lr per row and episode from {GRID} chosen on "
             "the validation shots.", "",
             "| head init | query accuracy before training | after training the head, mean [95% CI] | lr chosen (counts) |",
             "|---|---|---|---|"]
    for name in names:
        s = stats.summary(rows[name])
        counts = ", ".join(f"{lr:g}: {choices[name].count(lr)}" for lr in GRID)
        lines.append(f"| {name} | {np.mean(initial[name]):.3f} | {s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}] | {counts} |")
    lines += ["", "Paired differences after training (a − b; Student t 95%):", "", "| a | b | verdict |", "|---|---|---|"]
    reference = "prototypes scale 10"
    for name in names:
        if name != reference:
            diff = stats.paired_t(rows[name], rows[reference], names=(name, reference))
            lines.append(f"| {name} | {reference} | {stats.verdict(diff)} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "new_head_scale.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (RESULTS / "new_head_scale.json").write_text(json.dumps({"args": vars(args), "query_accuracy": rows, "initial": initial,
                                                             "lr": choices}, indent=1) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
