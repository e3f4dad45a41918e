#!/usr/bin/env python
"""Full-data text comparison: LoRA last 2 + int8 frozen vs full fine-tuning on one fixed TREC split.

Few-shot episodes (bench/results/text.md) vary by ~10 points from one episode to the next, so
they cannot show a 1-point margin. Here one seeded split of TREC (6 coarse classes, 64 tokens)
serves every row: a training subset, a validation subset (each row picks its learning rate on
it from its own 2-value grid) and every remaining question as the test set. The rows are the
protocol's own (`bench.protocol`): the `new-head` prototypes head fitted on the training
subset, the hand-built onnxruntime-training full fine-tune (`full_manual_ort`), edgeplug
recipe rows from bench/recipes; same epochs, batch 16, sample order. Each row records its
chosen candidate's correct test predictions per chunk of `--chunk` test texts (the test order
is a seeded shuffle), and the difference of two rows gets a paired interval over those chunks
(percentile bootstrap and t): the chunks are the same test texts for every row.

    nice python bench/text_full.py --train 1200 --validation 400 --work /tmp/text-full
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.protocol import stats  # noqa: E402
from bench.protocol.driver import Family, Settings, run_family, write_json  # noqa: E402
from bench.protocol.episodes import Episode  # noqa: E402
from bench.protocol.rows import Row, select_rows  # noqa: E402
from bench.text import data, minilm  # noqa: E402
from bench.text.family import LENGTHS  # noqa: E402

GRIDS = {"full_manual_ort": (3e-5, 1e-4), "lora_last2_int8": (3e-4, 1e-3), "last_layer": (1e-3, 1e-2)}
"""Each row's learning-rate grid (2 values): full fine-tuning of a pretrained BERT wants a smaller rate than adapters or a head."""
REFERENCE = "full_manual_ort"
MARGIN = 0.01


def split(corpus: data.Corpus, train: int, validation: int, test: int | None, seed: int) -> Episode:
    order = np.random.default_rng([seed, 25]).permutation(len(corpus))
    tr, va = order[:train], order[train:train + validation]
    te = order[train + validation:] if test is None else order[train + validation:train + validation + test]
    labels = corpus.labels
    return Episode(0, corpus.name, 0, (seed,), tuple(range(len(corpus.class_names))), train // len(corpus.class_names),
                   tr, labels[tr], va, labels[va], te, labels[te], tuple(corpus.class_names))


def with_schedule(row: Row, schedule: dict[str, Any] | None) -> Row:
    """The row with `schedule` as its recipe's optimizer.schedule (recipe rows; built-in rows read Settings.schedule)."""
    if schedule is None or row.recipe is None:
        return row
    recipe = dict(row.recipe)
    recipe["optimizer"] = {**dict(recipe.get("optimizer") or {}), "schedule": dict(schedule)}
    return dataclasses.replace(row, recipe=recipe)


def compare(records: dict[str, dict[str, Any]], a: str, b: str, chunk: int, seed: int) -> dict[str, Any] | None:
    ca, cb = records.get(a, {}).get("query_chunk_correct"), records.get(b, {}).get("query_chunk_correct")
    if not ca or not cb:
        return None
    size = records[a]["query_size"]
    sizes = np.array([min(chunk, size - i) for i in range(0, size, chunk)], dtype=float)
    # per-chunk accuracy difference weighted by chunk size = mean per-text difference (ratio kept exact by scaling)
    da = np.asarray(ca) / sizes * sizes / sizes.mean()
    db = np.asarray(cb) / sizes * sizes / sizes.mean()
    boot = stats.paired_bootstrap(da, db, names=(a, b), seed=seed)
    t = stats.paired_t(da, db, names=(a, b))
    return {"a": a, "b": b, "chunks": len(sizes), "texts": size, "bootstrap": boot.to_dict(), "t": t.to_dict(),
            "within_margin_shown": bool(min(boot.low, t.low) >= -MARGIN)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="trec")
    p.add_argument("--train", type=int, default=1200)
    p.add_argument("--validation", type=int, default=400)
    p.add_argument("--test", type=int, help="test texts (default: every remaining text)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chunk", type=int, default=16, help="test texts per chunk of the paired interval")
    p.add_argument("--rows", default="full_manual_ort,lora_last2_int8", help=f"comma-separated; grids: {GRIDS}")
    p.add_argument("--grid", action="append", default=[], metavar="ROW=LR,LR", help="a row's learning-rate grid instead of GRIDS")
    p.add_argument("--against", type=Path, help=f"an earlier run's JSON (same split and seed) whose `{REFERENCE}` record the rows "
                   "are compared with when this run does not train it")
    p.add_argument("--also", default="", metavar="ROW,ROW", help="rows of the --against run compared with every row of this run "
                   f"too (besides `{REFERENCE}`), e.g. the recipe a one-variable row changes")
    p.add_argument("--schedule", type=json.loads, metavar="JSON",
                   help='learning-rate schedule for every row (edgeplug recipe optimizer.schedule, e.g. \'{"name": "linear", '
                   '"warmup_steps": 8}\'): recipe rows get it in their recipe, the hand-built row applies the same per-step lr; '
                   "default: constant (a recipe's own schedule stays)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny-encoder", action="store_true", help="toy encoder (pipeline check, not a benchmark)")
    p.add_argument("--work", type=Path, default=Path("/tmp/text-full"))
    p.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--name", default="text_full")
    p.add_argument("--render", type=Path, help="only rewrite the Markdown of this result JSON")
    args = p.parse_args()
    if args.render is not None:
        args.render.with_suffix(".md").write_text(markdown(json.loads(args.render.read_text(encoding="utf-8"))), encoding="utf-8")
        return

    corpus = data.load(args.corpus)
    length = min(LENGTHS[args.corpus], 64) if args.tiny_encoder else LENGTHS[args.corpus]
    episode = split(corpus, args.train, args.validation, args.test, args.seed)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    grids = dict(GRIDS)
    for item in args.grid:
        row, _, values = item.partition("=")
        grids[row] = tuple(float(v) for v in values.split(","))
    rows = [with_schedule(dataclasses.replace(r, lr_grid=grids.get(r.name, r.lr_grid)), args.schedule)
            for r in select_rows("text", names, torch=False)]

    def write_episode(ep: Episode, folder: Path) -> dict[str, Path]:
        paths = {}
        for name, indices, labels in ep.splits():
            tokens = data.tokenize([corpus.texts[i] for i in indices], length)
            if args.tiny_encoder:
                tokens["input_ids"] = tokens["input_ids"] % 128
            paths[name] = folder / f"{name}.npz"
            np.savez(paths[name], input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], y=labels)
        return paths

    per_epoch = -(-args.train // args.batch_size)
    settings = Settings(steps=args.epochs * per_epoch, batch_size=args.batch_size, grid=(1e-4, 1e-3), seed=args.seed,
                        schedule=args.schedule)
    family = Family(
        name="text", title=f"Full-data text: MiniLM-L6 on {args.corpus}" + (" (TOY ENCODER)" if args.tiny_encoder else ""),
        model=minilm.exported(args.work / "models", tiny=args.tiny_encoder), episodes=[episode], write_episode=write_episode,
        settings=settings, meta={"corpora": [args.corpus], "lengths": {args.corpus: length}, "dims": {"sequence": length}})
    reference, also = None, {}
    if args.also and args.against is None:
        raise SystemExit("--also takes rows from the --against run: give --against")
    if args.against is not None:  # checked before training: the same split and epochs, else the comparison means nothing
        earlier = json.loads(args.against.read_text(encoding="utf-8"))
        if earlier["meta"]["split"] != {**earlier["meta"]["split"], "seed": args.seed, "train": args.train, "validation": args.validation,
                                         "epochs": args.epochs}:
            raise SystemExit(f"{args.against}: another split or epoch count")
        if earlier["meta"]["split"].get("schedule") != args.schedule:
            raise SystemExit(f"{args.against}: another learning-rate schedule ({earlier['meta']['split'].get('schedule')})")
        reference = next(r for r in earlier["records"] if r["row"] == REFERENCE)
        also = {n: next(r for r in earlier["records"] if r["row"] == n) for n in args.also.split(",") if n}
    out = args.results / f"{args.name}.json"
    result = run_family(family, rows, args.work, out=out, query_chunk=args.chunk)
    records = {r["row"]: r for r in result["records"]}
    if reference is not None and REFERENCE not in records:
        records[REFERENCE] = reference
        result["records"].append({**reference, "from": str(args.against)})
        names.append(REFERENCE)
    for name, record in also.items():
        if name not in records:
            records[name] = record
            result["records"].append({**record, "from": str(args.against)})
    result["meta"].update(split={"train": len(episode.train), "validation": len(episode.validation), "test": len(episode.query),
                                 "seed": args.seed, "epochs": args.epochs, "chunk": args.chunk, "all_rest": args.test is None,
                                 "schedule": args.schedule},
                          grids={r.name: list(r.lr_grid or settings.grid) for r in rows if r.trains}, loadavg_end=os.getloadavg(),
                          ended=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    pairs = [(n, REFERENCE) for n in names if n != REFERENCE] + [(n, a) for a in also for n in names if n not in (REFERENCE, a)]
    result["comparisons"] = [c for c in (compare(records, n, b, args.chunk, args.seed) for n, b in pairs) if c]
    write_json(result, out)
    (args.results / f"{args.name}.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    meta, s = result["meta"], result["meta"]["split"]
    records = {r["row"]: r for r in result["records"]}
    labels = {"head_only": "new-head prototypes, no training", REFERENCE: "full fine-tune, ORT artifacts by hand (no edgeplug)",
              **{r["name"]: r["label"] for r in meta["rows"]}}
    lines = [f"# {meta['title']}", "",
             f"Command: `{meta.get('command')}`  ",
             f"Split (seed {s['seed']}): train {s['train']}, validation {s['validation']} (learning-rate choice), test {s['test']} "
             f"({'every other text' if s.get('all_rest') else 'held out'}); {meta['lengths']} tokens; {s['epochs']} epoch(s), batch {meta['settings']['batch_size']}; "
             f"learning-rate schedule {json.dumps(s.get('schedule') or {'name': 'constant'})} (every row); "
             "every row starts from the same `new-head` prototypes head fitted on the training subset.  ",
             f"Learning-rate grids: {', '.join(f'`{k}` {v}' for k, v in meta['grids'].items())}.  ",
             f"Machine: {meta['machine']}, shared; 1 thread per process, one row process at a time; load average "
             f"{'/'.join(f'{x:.1f}' for x in meta['loadavg_start'])} at start, "
             f"{'/'.join(f'{x:.1f}' for x in meta['loadavg_end'])} at the end; wall {meta.get('wall_seconds')} s.", "",
             "| row | test accuracy | chosen lr | validation accuracy (per lr) | trainable values | peak RSS (MiB) | RSS added by training (MiB) | median step (ms) | fit, one lr (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in records.items():
        if "error" in r:
            lines.append(f"| {labels.get(name, name)} (`{name}`) | failed: {r['error'][:120]} | | | | | | | |")
            continue
        mem = r.get("memory") or {}
        vals = ", ".join(f"{c['lr']:g}: {c['validation_accuracy']:.3f}" for c in (r.get("lr_choice") or {}).get("candidates", [])) or "–"
        peak = mem.get("peak_rss_bytes")
        added = mem.get("rss_added_bytes")
        step = r.get("median_step_seconds")
        fit = "–" if r.get("fit_seconds") is None else f"{r['fit_seconds']:.0f}"
        earlier = f" (from {Path(r['from']).name})" if r.get("from") else ""
        lines.append(f"| {labels.get(name, name)} (`{name}`){earlier} | {r['accuracy']:.4f} | "
                     f"{r['lr'] if r.get('lr') is not None else '–'} | {vals} | {r.get('trainable_values', '–')} | "
                     f"{'–' if peak is None else f'{peak / 2**20:.0f}'} | {'–' if added is None else f'{added / 2**20:.0f}'} | "
                     f"{'–' if step is None else f'{1000 * step:.0f}'} | {fit} |")
    lines += ["", f"Paired differences over the test texts (chunks of {s['chunk']} texts, the same texts for every row; "
              "percentile bootstrap, 10,000 resamples, and paired t). \"Within 1 point shown\": both intervals' lower ends >= -0.010.", "",
              "| comparison | test texts (chunks) | Δ accuracy | bootstrap 95% CI | t 95% CI | within 1 point shown |", "|---|---|---|---|---|---|"]
    for c in result.get("comparisons", []):
        b, t = c["bootstrap"], c["t"]
        lines.append(f"| `{c['a']}` − `{c['b']}` | {c['texts']} ({c['chunks']}) | {b['mean']:+.4f} | [{b['low']:+.4f}, {b['high']:+.4f}] | "
                     f"[{t['low']:+.4f}, {t['high']:+.4f}] | {'yes' if c['within_margin_shown'] else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
