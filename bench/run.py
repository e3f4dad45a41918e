#!/usr/bin/env python
"""Run the few-shot benchmark of a family: every row on the same episodes, paired 95% intervals.

Writes bench/results/<name>.{md,json,png}. See bench/README.md.

  python bench/run.py images --quick          # smoke run, a few minutes on 2 cores
  python bench/run.py images                  # full mode: 30 episodes per domain
  python bench/run.py images --image-size 224 --backbone lite1 --episodes 5 --name images-lite1-224
  python bench/run.py images --report-only bench/results/images.json    # redo tables/plots from a run
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.protocol import report  # noqa: E402
from bench.protocol.driver import Family, Settings, run_family, write_json  # noqa: E402
from bench.protocol.episodes import EpisodeConfig, continue_episodes  # noqa: E402
from bench.protocol.rows import Row, select_rows  # noqa: E402

FAMILIES = {"images": "bench.images.family", "images-bn": "bench.images.family", "text": "bench.text.family"}
"""Family name -> module with add_arguments(parser) and build(args, work, settings, config, per_domain) -> Family."""
RESULTS = ROOT / "bench" / "results"

QUICK = {"episodes": 1, "steps": 6, "grid": "1e-4,1e-2", "ways": "2,3", "shots": "2,4", "query": 6}
FULL = {"episodes": 30, "steps": 12, "grid": "1e-4,1e-3,1e-2", "ways": "2,5", "shots": "2,8", "query": 10}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("family", choices=sorted(FAMILIES))
    p.add_argument("--quick", action="store_true", help="smoke run: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    p.add_argument("--episodes", type=int, help=f"episodes per domain (full mode {FULL['episodes']})")
    p.add_argument("--ways", help=f"range lo,hi (full mode {FULL['ways']})")
    p.add_argument("--shots", help=f"shots per class, range lo,hi (full mode {FULL['shots']})")
    p.add_argument("--query", type=int, help=f"query samples per class (full mode {FULL['query']})")
    p.add_argument("--validation", type=float, default=0.25, help="share of the shots held out for the lr choice")
    p.add_argument("--steps", type=int, help=f"optimizer steps per training (whole epochs; full mode {FULL['steps']})")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grid", help=f"default learning-rate grid (full mode {FULL['grid']}); a row's lr_grid wins")
    # 28 MiB: at 128 px and batch 16, the budget at which at least 15 layers of EfficientNet-Lite0 are feasible
    # candidates of sparse-update (each alone, at its smallest share, with the classifier; #17)
    p.add_argument("--row-grid", action="append", default=[], metavar="ROW=LR,LR,...",
                   help="a row's own learning-rate grid for this run (instead of its recipe's lr_grid or --grid); repeatable")
    p.add_argument("--budget-kib", type=int, default=28672, help="backward-memory budget of the sparse schemes ($budget)")
    p.add_argument("--threads", type=int, default=1, help="threads of every runtime in every row (pinned, recorded)")
    p.add_argument("--jobs", type=int, default=1, help="row processes at once (2 on an idle 2-core machine; 1 on a shared one)")
    p.add_argument("--query-all", action="store_true", help="also score every lr candidate on the query set (for the record)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", help="comma-separated rows (see bench/recipes/ and bench/protocol/rows.py)")
    p.add_argument("--skip", default="", help="comma-separated rows to leave out")
    p.add_argument("--no-torch", action="store_true", help="leave out the PyTorch row")
    p.add_argument("--baseline", default="last_layer", help="row the paired differences are taken against (default last_layer)")
    p.add_argument("--name", help="results file stem (default: the family, with -quick in quick mode)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--work", type=Path, default=Path("/tmp/edgeplug-bench"))
    p.add_argument("--keep", action="store_true", help="keep each episode's data and artifacts under --work")
    p.add_argument("--from-episode", type=int, default=0, metavar="K",
                   help="leave out episodes 0..K-1 of every domain: the others keep their ids and draws, so the run continues "
                        "an earlier run of the same draw (--episodes stays the end; append with bench/merge_runs.py --append)")
    p.add_argument("--only-domains", help="comma-separated domains whose episodes run (ids and draws as in the draw over all of them)")
    p.add_argument("--report-only", type=Path, help="rewrite the .md/.png of an existing results .json and stop")
    for module in sorted(set(FAMILIES.values())):
        importlib.import_module(module).add_arguments(p)
    return p


def _pair(text: str, flag: str) -> tuple[int, int]:
    parts = [int(v) for v in text.split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise SystemExit(f"{flag}: give lo,hi")
    return parts[0], parts[1]


def with_row_grids(rows: list[Row], items: list[str]) -> list[Row]:
    """`ROW=LR,LR,...` items give those rows their own grid (each row's choice should not sit at a grid edge:
    a full fine-tune of a pretrained encoder wants smaller rates than adapters or a head)."""
    grids = {}
    for item in items:
        name, _, values = item.partition("=")
        try:
            grids[name.strip()] = tuple(float(v) for v in values.split(","))
        except ValueError:
            raise SystemExit(f"--row-grid {item!r}: give ROW=LR,LR,... (numbers)") from None
    unknown = sorted(set(grids) - {r.name for r in rows if r.trains})
    if unknown:
        raise SystemExit(f"--row-grid: no trained row {', '.join(unknown)} in this run (rows: {', '.join(r.name for r in rows if r.trains)})")
    return [dataclasses.replace(r, lr_grid=grids[r.name]) if r.name in grids else r for r in rows]


def continued(family: Family, start: int, only: str | None) -> Family:
    """The family's draw from episode `start` of each domain on, of `only` domains, with a description line saying so."""
    domains = [n.strip() for n in only.split(",") if n.strip()] if only else None
    drawn = list(dict.fromkeys(e.domain for e in family.episodes))
    try:
        episodes = continue_episodes(family.episodes, start=start, domains=domains)
    except ValueError as error:
        raise SystemExit(f"--only-domains: {error}") from None
    if not episodes:
        raise SystemExit(f"--from-episode {start}: no episode left (--episodes is the end of the draw per domain)")
    ran = sorted({e.domain for e in episodes})
    line = (f"This run: episodes {start}..{max(e.domain_episode for e in episodes)} of {', '.join(ran)} "
            f"(ids {episodes[0].index}..{episodes[-1].index} of the seed-{family.settings.seed} draw over {', '.join(drawn)}"
            + (f"; episodes 0..{start - 1} left out" if start else "") + f"): {len(episodes)} episodes, each drawn as in the whole draw.")
    meta = {**family.meta, "continued": {"from_episode": start, "domains": ran, "drawn_domains": drawn,
                                        "ids": [e.index for e in episodes]}}
    return dataclasses.replace(family, episodes=episodes, description=[*family.description, line], meta=meta)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    name = args.name or (f"{args.family}-quick" if args.quick else args.family)
    if args.report_only:
        result = report.load(args.report_only)
        report.write(result, args.results, name, baseline=args.baseline)
        print(f"wrote {args.results}/{name}.{{md,png}}")
        return
    module = importlib.import_module(FAMILIES[args.family])
    defaults = {**(QUICK if args.quick else FULL), **getattr(module, "QUICK" if args.quick else "FULL", {})}  # a family's own shapes win
    value = {key: getattr(args, key) if getattr(args, key) is not None else defaults[key] for key in defaults}
    settings = Settings(steps=value["steps"], batch_size=args.batch_size, grid=tuple(float(v) for v in str(value["grid"]).split(",")),
                        budget_bytes=args.budget_kib * 1024, threads=args.threads, seed=args.seed)
    config = EpisodeConfig(ways=_pair(str(value["ways"]), "--ways"), shots=_pair(str(value["shots"]), "--shots"),
                           query=value["query"], validation=args.validation)
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    skip = [n.strip() for n in args.skip.split(",") if n.strip()]
    rows = with_row_grids(select_rows(args.family, only, skip, torch=not args.no_torch), args.row_grid)
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    family = module.build(args, work, settings, config, value["episodes"])
    if args.from_episode or args.only_domains:
        family = continued(family, args.from_episode, args.only_domains)
    print(f"== {family.title}: {len(rows)} rows x {len(family.episodes)} episodes ({', '.join(r.name for r in rows)})", flush=True)
    started = time.perf_counter()
    out = args.results / f"{name}.json"
    result = run_family(family, rows, work, out=out, keep=args.keep, parallel=args.jobs, query_all=args.query_all, echo=lambda text: print(text, flush=True))
    result["meta"]["quick"] = bool(args.quick)
    write_json(result, out)
    report.write(result, args.results, name, baseline=args.baseline)
    print(report.markdown(result, baseline=args.baseline))
    print(f"wrote {args.results}/{name}.{{md,json,png}} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
