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
import math
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
from bench.protocol.lr_search import Candidate, choose_lr  # noqa: E402
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


def with_train_seed(row: Row, seed: int) -> Row:
    """The row trained with training seed `seed`: every pass of its recipe whose options take a `seed` (lora's adapter
    init, sparse-update's random draw, ...) gets it. The sample order follows it through the job's seed (the Trainer's
    and the hand-built loop's (seed, epoch) permutation); the `new-head` head that every row starts from is not seeded."""
    if row.recipe is None:
        return row
    from edgeplug.validation import load_schema

    passes = []
    for entry in row.recipe.get("passes", []):
        entry = dict(entry)
        properties = load_schema(f"passes/{entry['name']}").get("properties", {})  # a pass schema describes its options
        if "seed" in properties and entry["name"] != "new-head":
            entry["options"] = {**dict(entry.get("options") or {}), "seed": seed}
        passes.append(entry)
    return dataclasses.replace(row, recipe={**dict(row.recipe), "passes": passes})


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values and all(v is not None for v in values) else math.nan


def combine_seeds(by_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One row's record from its runs with several training seeds (each run scored every lr on validation and test).

    The lr is chosen on the validation accuracy AVERAGED over seeds (then mean validation loss, then the smaller lr:
    `choose_lr` on the means; test figures ride along, never compared); the row's test accuracy is the mean over seeds
    at that lr, and `query_chunk_correct` is, per chunk, the mean over seeds of the correct predictions at that lr (the
    paired interval then compares seed-averaged rows). Memory and step time: medians over the seeds' first candidates."""
    seeds = sorted(by_seed)
    records = [by_seed[s] for s in seeds]
    failed = [(s, r["error"]) for s, r in zip(seeds, records, strict=True) if "error" in r]
    if failed:
        return {**{k: v for k, v in records[0].items() if k not in ("lr_choice", "query_chunk_correct", "query_chunk_correct_by_lr")},
                "error": f"seed {failed[0][0]}: {failed[0][1]}", "train_seeds": seeds}
    if records[0].get("lr_choice") is None:  # the untrained head: the same for every seed
        return {**records[0], "train_seeds": seeds}
    per_lr: dict[float, dict[int, dict[str, Any]]] = {}
    for seed, record in zip(seeds, records, strict=True):
        chunks = record.get("query_chunk_correct_by_lr") or {}
        for c in record["lr_choice"]["candidates"]:
            per_lr.setdefault(float(c["lr"]), {})[seed] = {"validation_accuracy": c["validation_accuracy"], "validation_loss": c["validation_loss"],
                                                          "query_accuracy": c.get("query_accuracy"), "query_chunk_correct": chunks.get(repr(float(c["lr"])))}
    missing = {lr: sorted(set(seeds) - set(got)) for lr, got in per_lr.items() if set(got) != set(seeds)}
    if missing:
        raise ValueError(f"{records[0]['row']}: learning rates not tried with every seed: {missing}")
    candidates = [Candidate(lr, _mean([v["validation_accuracy"] for v in got.values()]), _mean([v["validation_loss"] for v in got.values()]),
                            _mean([v["query_accuracy"] for v in got.values()]), None,
                            {"per_seed": {str(s): {k: v for k, v in got[s].items() if k != "query_chunk_correct"} for s in seeds}})
                  for lr, got in sorted(per_lr.items())]
    choice = choose_lr(candidates)
    chosen = per_lr[choice.lr]
    counts = [chosen[s]["query_chunk_correct"] for s in seeds]
    per_seed = []
    for seed, record in zip(seeds, records, strict=True):
        memory = record.get("memory") or {}
        per_seed.append({"seed": seed, "own_choice_lr": record["lr"], "validation_accuracy": chosen[seed]["validation_accuracy"],
                         "accuracy": chosen[seed]["query_accuracy"], "peak_rss_bytes": memory.get("peak_rss_bytes"),
                         "rss_added_bytes": memory.get("rss_added_bytes"), "median_step_seconds": record.get("median_step_seconds"),
                         "fit_seconds": record.get("fit_seconds"), "wall_seconds": record.get("wall_seconds"),
                         "candidates": record["lr_choice"]["candidates"], "query_chunk_correct_by_lr": record.get("query_chunk_correct_by_lr")})

    def median(key: str) -> float | None:
        values = [p[key] for p in per_seed if p.get(key) is not None]
        return float(np.median(values)) if values else None

    lr_choice = {**choice.to_dict(), "criterion": "validation accuracy averaged over the training seeds, then mean validation loss, then smaller lr"}
    return {**{k: v for k, v in records[0].items() if k not in ("lr_choice", "query_chunk_correct_by_lr", "memory", "median_step_seconds",
                                                                  "first_median_step_seconds", "fit_seconds", "wall_seconds", "cpu_seconds")},
            "accuracy": _mean([chosen[s]["query_accuracy"] for s in seeds]), "loss": None, "lr": choice.lr, "lr_choice": lr_choice,
            "query_chunk_correct": None if any(c is None for c in counts) else [float(v) for v in np.mean(np.asarray(counts, dtype=float), axis=0)],
            "memory": {"peak_rss_bytes": median("peak_rss_bytes"), "rss_added_bytes": median("rss_added_bytes"), "of": "median over seeds"},
            "median_step_seconds": median("median_step_seconds"), "fit_seconds": median("fit_seconds"),
            "train_seeds": seeds, "per_seed": per_seed}


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
                   f"too (besides `{REFERENCE}`), e.g. the recipe a one-variable row changes; ROW@JSON takes the row from another "
                   "earlier run of the same split, epochs, training seeds and schedule")
    p.add_argument("--schedule", type=json.loads, metavar="JSON",
                   help='learning-rate schedule for every row (edgeplug recipe optimizer.schedule, e.g. \'{"name": "linear", '
                   '"warmup_steps": 8}\'): recipe rows get it in their recipe, the hand-built row applies the same per-step lr; '
                   "default: constant (a recipe's own schedule stays)")
    p.add_argument("--extend", type=Path, metavar="JSON", help="an earlier --train-seeds run (same split, seeds, schedule): its rows "
                   "and lrs are kept and this run's --grid values are added per seed (widening a grid whose choice sat at an edge)")
    p.add_argument("--seed", type=int, default=0, help="the split's seed (and the training seed without --train-seeds)")
    p.add_argument("--train-seeds", type=int, metavar="N", help="train every row and lr N times, training seeds 0..N-1 (sample order, "
                   "adapter/random init of the row's passes; same split and head): the lr is chosen on the mean validation accuracy, "
                   "the test accuracy and the per-chunk correctness of the paired interval are means over the seeds")
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
    also_from: dict[str, Path] = {}
    if args.against is not None:  # checked before training: the same split and epochs, else the comparison means nothing
        earlier = same_split(args.against, args)
        reference = next(r for r in earlier["records"] if r["row"] == REFERENCE)
        for item in (n.strip() for n in args.also.split(",") if n.strip()):
            name, _, source = item.partition("@")
            also_from[name] = Path(source) if source else args.against
            run = same_split(also_from[name], args) if source else earlier
            also[name] = next(r for r in run["records"] if r["row"] == name)
    out = args.results / f"{args.name}.json"
    seeds = None if args.train_seeds is None else list(range(args.train_seeds))
    extended = None
    if args.extend is not None:  # the earlier run's rows and lrs stay; this run adds lrs (or rows) with the same seeds
        if seeds is None:
            raise SystemExit("--extend adds lrs to a --train-seeds run: give --train-seeds")
        extended = same_split(args.extend, args)
        if extended["meta"]["split"].get("chunk") != args.chunk:
            raise SystemExit(f"{args.extend}: another chunk size ({extended['meta']['split'].get('chunk')}, not {args.chunk})")

    def finish(result: dict[str, Any]) -> dict[str, Any]:
        """Adds the --against/--also records, the split and the paired comparisons; writes the JSON and Markdown."""
        records = {r["row"]: r for r in result["records"]}
        shown = list(names)
        if reference is not None and REFERENCE not in records:
            records[REFERENCE] = reference
            result["records"].append({**reference, "from": str(args.against)})
            shown.append(REFERENCE)
        for name, record in also.items():
            if name not in records:
                records[name] = record
                result["records"].append({**record, "from": str(also_from[name])})
        result["meta"].update(split={"train": len(episode.train), "validation": len(episode.validation), "test": len(episode.query),
                                     "seed": args.seed, "epochs": args.epochs, "chunk": args.chunk, "all_rest": args.test is None,
                                     "schedule": args.schedule, **({"train_seeds": seeds} if seeds is not None else {})},
                              grids={**result["meta"].get("grids_before", {}), **{r.name: sorted({*result["meta"].get("grids_before", {}).get(r.name, []),
                                                                                                  *(r.lr_grid or settings.grid)}) for r in rows if r.trains}},
                              loadavg_end=os.getloadavg(),
                              ended=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
        pairs = [(n, REFERENCE) for n in shown if n != REFERENCE] + [(n, a) for a in also for n in shown if n not in (REFERENCE, a)]
        result["comparisons"] = [c for c in (compare(records, n, b, args.chunk, args.seed) for n, b in pairs) if c]
        write_json(result, out)
        (args.results / f"{args.name}.md").write_text(markdown(result), encoding="utf-8")
        return result

    if seeds is None:
        result = finish(run_family(family, rows, args.work, out=out, query_chunk=args.chunk))
    else:  # one run per training seed (every lr scored on the test set too, for the choice made later on the mean)
        runs: list[tuple[int, dict[str, Any]]] = []
        for seed in seeds:
            seeded = dataclasses.replace(family, settings=dataclasses.replace(settings, train_seed=seed))
            run = run_family(seeded, [with_train_seed(r, seed) for r in rows], args.work / f"seed-{seed}", query_chunk=args.chunk,
                             query_all=True, echo=lambda text: print(text, flush=True))
            runs.append((seed, run))
            if extended is None:
                result = finish(over_seeds(runs))
            print(f"training seed {seed} done ({len(runs)}/{len(seeds)})", flush=True)
        if extended is not None:
            result = finish(extend(extended, over_seeds(runs), str(args.extend)))
    print(markdown(result))


def per_seed_records(record: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """A seed-averaged record (`combine_seeds`) taken back apart: one run record per training seed."""
    if not record.get("per_seed"):
        return {seed: {k: v for k, v in record.items() if k != "train_seeds"} for seed in record.get("train_seeds", [])}
    base = {k: v for k, v in record.items() if k not in ("per_seed", "train_seeds", "lr_choice", "query_chunk_correct", "memory")}
    return {q["seed"]: {**base, "lr": q["own_choice_lr"], "lr_choice": {"candidates": q["candidates"]},
                        "query_chunk_correct_by_lr": q["query_chunk_correct_by_lr"],
                        "memory": {"peak_rss_bytes": q["peak_rss_bytes"], "rss_added_bytes": q["rss_added_bytes"]},
                        "median_step_seconds": q["median_step_seconds"], "fit_seconds": q["fit_seconds"], "wall_seconds": q.get("wall_seconds")}
            for q in record["per_seed"]}


def extend(earlier: dict[str, Any], now: dict[str, Any], source: str) -> dict[str, Any]:
    """`earlier`'s rows with this run's lrs added per seed (a row only here joins as it is). A merged row keeps the
    earlier run's memory and step figures (measured on its grid's first lr) and records where each lr came from."""
    merged: dict[str, dict[int, dict[str, Any]]] = {r["row"]: per_seed_records(r) for r in earlier["records"] if "from" not in r}
    for record in now["records"]:
        fresh = per_seed_records(record)
        old = merged.get(record["row"])
        if old is None or record.get("lr_choice") is None:
            merged.setdefault(record["row"], fresh)
            continue
        for seed, run in fresh.items():
            before = old[seed]
            candidates = [*before["lr_choice"]["candidates"], *({**c, "extra": {**c.get("extra", {}), "from": "extension"}}
                                                                 for c in run["lr_choice"]["candidates"])]
            own = choose_lr([Candidate(c["lr"], c["validation_accuracy"], c["validation_loss"]) for c in candidates]).lr
            old[seed] = {**before, "lr": own, "lr_choice": {"candidates": candidates},
                         "query_chunk_correct_by_lr": {**before["query_chunk_correct_by_lr"], **run["query_chunk_correct_by_lr"]}}
    meta = {**earlier["meta"], "extended_by": {"command": now["meta"].get("command"), "started": now["meta"].get("started"),
                                                "wall_seconds": now["meta"].get("wall_seconds"), "loadavg_start": now["meta"].get("loadavg_start")},
            "extends": source, "grids_before": earlier["meta"]["grids"], "train_seeds_done": now["meta"]["train_seeds_done"],
            "rows": [*earlier["meta"]["rows"], *(r for r in now["meta"]["rows"] if r["name"] not in {e["name"] for e in earlier["meta"]["rows"]})]}
    return {"meta": meta, "records": [combine_seeds(by_seed) for by_seed in merged.values()], "prepare": [*earlier["prepare"], *now["prepare"]],
            "seed_runs": [*earlier.get("seed_runs", []), *now.get("seed_runs", [])]}


def over_seeds(runs: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """The result document of runs that differ only in the training seed: one `combine_seeds` record per row."""
    first = runs[0][1]
    rows = [r["row"] for r in first["records"]]
    records = [combine_seeds({seed: next(r for r in run["records"] if r["row"] == row) for seed, run in runs}) for row in rows]
    meta = {**first["meta"], "train_seeds_done": [seed for seed, _ in runs],
            "wall_seconds": round(sum(run["meta"].get("wall_seconds") or 0 for _, run in runs), 1),
            "child_cpu_seconds": round(sum(run["meta"].get("child_cpu_seconds") or 0 for _, run in runs), 1)}
    seed_runs = [{"seed": seed, "started": run["meta"].get("started"), "wall_seconds": run["meta"].get("wall_seconds"),
                  "loadavg_start": run["meta"].get("loadavg_start"), "loadavg_end": run["meta"].get("loadavg_now"), "prepare": run["prepare"]}
                 for seed, run in runs]
    return {"meta": meta, "records": records, "prepare": [p for _, run in runs for p in run["prepare"]], "seed_runs": seed_runs}


def same_split(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """An earlier run's result, checked to have this run's split, epochs, training seeds and schedule (else pairing means nothing)."""
    earlier: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if earlier["meta"]["split"] != {**earlier["meta"]["split"], "seed": args.seed, "train": args.train, "validation": args.validation,
                                     "epochs": args.epochs}:
        raise SystemExit(f"{path}: another split or epoch count")
    wanted = None if args.train_seeds is None else list(range(args.train_seeds))
    if earlier["meta"]["split"].get("train_seeds") != wanted:
        raise SystemExit(f"{path}: other training seeds ({earlier['meta']['split'].get('train_seeds')}, not {wanted})")
    if earlier["meta"]["split"].get("schedule") != args.schedule:
        raise SystemExit(f"{path}: another learning-rate schedule ({earlier['meta']['split'].get('schedule')})")
    return earlier


def cache_cell(cache: dict[str, Any] | None) -> str:
    """The frozen-prefix cache of a row: storage type and MiB in memory (records before the option: float32), or why not used."""
    if not cache:
        return "–"
    if "reason" in cache:
        return f"not used: {cache['reason'][:60]}"
    return f"{cache.get('dtype', 'float32')}, {cache['memory_bytes'] / 2**20:.0f} MiB, fill {cache['seconds']:.0f} s"


def markdown(result: dict[str, Any]) -> str:
    meta, s = result["meta"], result["meta"]["split"]
    records = {r["row"]: r for r in result["records"]}
    labels = {"head_only": "new-head prototypes, no training", REFERENCE: "full fine-tune, ORT artifacts by hand (no edgeplug)",
              **{r["name"]: r["label"] for r in meta["rows"]}}
    lines = [f"# {meta['title']}", "",
             f"Command: `{meta.get('command')}`  ",
             *([f"Extended by (--extend, same seeds: lrs added per seed): `{meta['extended_by']['command']}` "
                f"(wall {meta['extended_by']['wall_seconds']} s, load {'/'.join(f'{x:.1f}' for x in meta['extended_by']['loadavg_start'])} at start)  "]
               if meta.get("extended_by") else []),
             f"Split (seed {s['seed']}): train {s['train']}, validation {s['validation']} (learning-rate choice), test {s['test']} "
             f"({'every other text' if s.get('all_rest') else 'held out'}); {meta['lengths']} tokens; {s['epochs']} epoch(s), batch {meta['settings']['batch_size']}; "
             f"learning-rate schedule {json.dumps(s.get('schedule') or {'name': 'constant'})} (every row); "
             "every row starts from the same `new-head` prototypes head fitted on the training subset.  ",
             f"Learning-rate grids: {', '.join(f'`{k}` {v}' for k, v in meta['grids'].items())}.  ",
             f"Machine: {meta['machine']}, shared; 1 thread per process, one row process at a time; load average "
             f"{'/'.join(f'{x:.1f}' for x in meta['loadavg_start'])} at start, "
             f"{'/'.join(f'{x:.1f}' for x in meta['loadavg_end'])} at the end; wall {meta.get('wall_seconds')} s.", "",
             "| row | test accuracy | chosen lr | validation accuracy (per lr) | trainable values | peak RSS (MiB) | RSS added by training (MiB) | median step (ms) | fit, one lr (s) | frozen-prefix cache |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in records.items():
        if "error" in r:
            lines.append(f"| {labels.get(name, name)} (`{name}`) | failed: {r['error'][:120]} | | | | | | | | |")
            continue
        mem = r.get("memory") or {}
        digits = 4 if r.get("per_seed") else 3
        vals = ", ".join(f"{c['lr']:g}: {c['validation_accuracy']:.{digits}f}" for c in (r.get("lr_choice") or {}).get("candidates", [])) or "–"
        peak = mem.get("peak_rss_bytes")
        added = mem.get("rss_added_bytes")
        step = r.get("median_step_seconds")
        fit = "–" if r.get("fit_seconds") is None else f"{r['fit_seconds']:.0f}"
        earlier = f" (from {Path(r['from']).name})" if r.get("from") else ""
        lines.append(f"| {labels.get(name, name)} (`{name}`){earlier} | {r['accuracy']:.4f} | "
                     f"{r['lr'] if r.get('lr') is not None else '–'} | {vals} | {r.get('trainable_values', '–')} | "
                     f"{'–' if peak is None else f'{peak / 2**20:.0f}'} | {'–' if added is None else f'{added / 2**20:.0f}'} | "
                     f"{'–' if step is None else f'{1000 * step:.0f}'} | {fit} | {cache_cell(r.get('prefix_cache'))} |")
    seeded = [r for r in records.values() if r.get("per_seed")]
    if seeded:
        done = meta.get("train_seeds_done") or s.get("train_seeds")
        header = next(i for i, line in enumerate(lines) if line.startswith("| row | test accuracy"))
        lines[header:header] = [f"Training seeds {done} (of {s.get('train_seeds')}): every row and lr trained once per seed (sample order; "
                        "the seed option of the row's passes, e.g. LoRA's adapter init); test accuracy, validation accuracy per lr, "
                        "and the per-chunk correctness the paired interval reads are MEANS over the seeds, the lr is chosen on the mean "
                        "validation accuracy; peak RSS, RSS added, step and fit time are medians over the seeds.", ""]
        lines += ["", "Per training seed (each seed's own lr choice for the record; the row uses the choice on the mean):", "",
                  "| row | seed | validation accuracy (per lr) | own choice | test accuracy (per lr) | test accuracy at the row's lr | peak RSS (MiB) | median step (ms) | fit (s) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in seeded:
            for q in r["per_seed"]:
                tried = sorted(q["candidates"], key=lambda c: c["lr"])
                val = ", ".join(f"{c['lr']:g}: {c['validation_accuracy']:.4f}" for c in tried)
                test = ", ".join(f"{c['lr']:g}: {c['query_accuracy']:.4f}" for c in tried if c.get("query_accuracy") is not None)
                peak, step, fit = q.get("peak_rss_bytes"), q.get("median_step_seconds"), q.get("fit_seconds")
                lines.append(f"| `{r['row']}` | {q['seed']} | {val} | {q['own_choice_lr']:g} | {test or '–'} | {q['accuracy']:.4f} | "
                             f"{'–' if peak is None else f'{peak / 2**20:.0f}'} | {'–' if step is None else f'{1000 * step:.0f}'} | "
                             f"{'–' if fit is None else f'{fit:.0f}'} |")
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
