"""Sensor workload of the benchmark protocol (#16): the pretrained HAPT 1D-CNN meets new people.

Each of the 9 users held out of pretraining (`hapt_model.NEW_USERS`) is a domain; episodes
(`bench.protocol.episodes`) draw 3-6 of the activities that user has enough windows of, 2-8
shots each, a query set disjoint from the support set, and validation shots held out of the
support set. Windows are taken without overlap (stride 128) so that no support window shares
samples with a query window. Every row starts from the same head: the `new-head` pass with
prototypes of the training shots (`init: prototypes`, `classes` = ways); the learning rate of
each trained row is chosen per episode on the validation shots from a small grid
(`bench.protocol.lr_search`), never on the query set. Rows:

    head only     new-head prototypes, no training (the forward-only starting point)
    last layer    + the classifier trains (`trainable: {layers: classifier}`)
    full          + every parameter trains (BatchNorm in inference mode: `freeze-bn`)

Paired 95% t intervals over episodes (`bench.protocol.stats`) compare the rows; a
difference whose interval holds zero names no winner. This is the workload other passes
plug rows into (`ROWS`); the fresh-process memory/time columns come from the protocol's
row runners.

    python bench/hapt_fewshot.py --quick        # 1 episode per user (~5 min on 2 loaded cores)
    python bench/hapt_fewshot.py                # 30 episodes per user
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import hapt  # noqa: E402
import hapt_model  # noqa: E402

from bench.protocol.episodes import Domain, Episode, EpisodeConfig, sample_episodes  # noqa: E402
from bench.protocol.lr_search import Candidate, search_lr  # noqa: E402
from bench.protocol.stats import paired_t, summary, verdict  # noqa: E402

ROWS: dict[str, list[dict[str, Any]]] = {
    "head only": [],
    "last layer": [{"name": "trainable", "options": {"layers": "classifier"}}],
    "full": [{"name": "freeze-bn", "options": {"layers": "all"}}],
}
TRAINED_GRID = {"last layer": [1e-3, 1e-2, 1e-1], "full": [1e-4, 1e-3, 1e-2]}
CONFIG = EpisodeConfig(ways=(3, 6), shots=(2, 8), query=10, validation=0.25)


def domains() -> tuple[list[Domain], dict[str, hapt.Windows]]:
    """One domain per new user, over non-overlapping windows."""
    windows = hapt.load(stride=hapt.WINDOW)
    out, data = [], {}
    for user in hapt_model.NEW_USERS:
        own = windows.select(users=[user])
        name = f"user{user}"
        out.append(Domain(name, own.y, class_names=dict(enumerate(hapt.ACTIVITIES))))
        data[name] = own
    return out, data


def _recipe(passes: list[dict[str, Any]], ways: int, lr: float) -> Any:
    from edgeplug.recipe import recipe_from_dict

    return recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": lr},
                             "passes": [{"name": "new-head", "options": {"classes": ways, "init": "prototypes"}}, *passes]})


def _evaluate(folder: Path, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Accuracy and cross-entropy of the folder's exported model (plain onnxruntime)."""
    import onnx

    import edgeplug

    exported = folder / "exported.onnx"
    edgeplug.export(folder, exported)
    (logits,) = hapt_model.batched(onnx.load(str(exported)), x, [hapt_model.OUTPUT])
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float((logits.argmax(1) == y).mean()), float(-log_p[np.arange(len(y)), y].mean())


def run_episode(episode: Episode, data: hapt.Windows, base: Path, work: Path, epochs: int) -> dict[str, Any]:
    import edgeplug

    x = data.x
    train = {"x": x[episode.train], "y": episode.train_labels}
    val, query = (x[episode.validation], episode.validation_labels), (x[episode.query], episode.query_labels)
    out: dict[str, Any] = {"episode": episode.describe(), "domain": episode.domain, "ways": episode.ways, "shots": episode.shots,
                           "rows": {}}
    for row, passes in ROWS.items():
        folder = work / f"e{episode.index}-{row.replace(' ', '_')}"
        shutil.rmtree(folder, ignore_errors=True)
        edgeplug.rewrite(base, _recipe(passes, episode.ways, 1e-3), folder, calibration=train, force=True)
        if row not in TRAINED_GRID:
            accuracy, loss = _evaluate(folder, *query)
            out["rows"][row] = {"query_accuracy": accuracy, "query_loss": loss}
            continue

        def train_and_validate(lr: float, folder: Path = folder) -> Candidate:
            copy = folder.with_name(f"{folder.name}-lr{lr:g}")
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(folder, copy)
            fit = edgeplug.Trainer(copy, progress=False, lr=lr, seed=episode.index).fit(
                train, epochs=epochs, batch_size=min(16, len(train["y"])), resume=False)
            v_acc, v_loss = _evaluate(copy, *val)
            q_acc, q_loss = _evaluate(copy, *query)
            shutil.rmtree(copy, ignore_errors=True)
            return Candidate(lr, v_acc, v_loss, q_acc, q_loss, {"median_step_seconds": fit.median_step_seconds})

        choice = search_lr(TRAINED_GRID[row], train_and_validate)
        out["rows"][row] = {"query_accuracy": choice.chosen.query_accuracy, "query_loss": choice.chosen.query_loss,
                            "lr": choice.to_dict(), "median_step_seconds": choice.chosen.extra["median_step_seconds"]}
        shutil.rmtree(folder, ignore_errors=True)
    return out


def markdown(result: dict[str, Any]) -> str:
    episodes = result["episodes"]
    rows = list(ROWS)
    accs = {row: [e["rows"][row]["query_accuracy"] for e in episodes] for row in rows}
    lines = ["# Sensor few-shot workload: the HAPT 1D-CNN on new people (UCI HAPT)", "",
             f"`{result['command']}`: {len(episodes)} episodes over {len(result['domains'])} held-out users "
             f"({result['per_domain']} each), {CONFIG.ways[0]}-{CONFIG.ways[1]} ways, {CONFIG.shots[0]}-{CONFIG.shots[1]} shots, "
             f"query {CONFIG.query} per class, validation share {CONFIG.validation}; non-overlapping 2.56 s windows. "
             f"Every row starts from the new-head pass's prototype head; trained rows: AdamW, {result['epochs']} epochs, batch "
             "<= 16, lr chosen per episode on the validation shots. Query accuracy: mean and 95% t interval over episodes. "
             f"Run took {result['seconds']:.0f} s (load {result['load']:.1f}).", "",
             "| row | query accuracy | lr chosen (count) |", "|---|---|---|"]
    for row in rows:
        s = summary(accs[row])
        chosen = [e["rows"][row]["lr"]["chosen_lr"] for e in episodes if "lr" in e["rows"][row]]
        counts = ", ".join(f"{lr:g}: {chosen.count(lr)}" for lr in sorted(set(chosen))) or "-"
        lines.append(f"| {row} | {s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}] | {counts} |")
    lines += ["", "| comparison | paired difference of query accuracy [95% CI] |", "|---|---|"]
    for a, b in (("last layer", "head only"), ("full", "head only"), ("full", "last layer")):
        lines.append(f"| {a} - {b} | {verdict(paired_t(accs[a], accs[b], names=(a, b)))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-domain", type=int, default=30, help="episodes per held-out user")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1 episode per user, 10 epochs")
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeplug-bench-hapt-fewshot"))
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.per_domain, args.epochs = 1, 10
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    base = hapt_model.pretrained(echo=print)
    pool, data = domains()
    episodes = sample_episodes(pool, args.per_domain, CONFIG, seed=args.seed)
    results = []
    for episode in episodes:
        results.append(run_episode(episode, data[episode.domain], base, args.work, args.epochs))
        print(f"{episode.describe()}: " + ", ".join(f"{row} {r['query_accuracy']:.3f}" for row, r in results[-1]["rows"].items()),
              flush=True)
    import os

    result = {"command": "python bench/hapt_fewshot.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "domains": [d.name for d in pool], "per_domain": args.per_domain, "epochs": args.epochs,
              "seconds": time.perf_counter() - started, "load": os.getloadavg()[0], "episodes": results}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "hapt_fewshot.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (args.results / "hapt_fewshot.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
