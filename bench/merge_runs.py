"""Pair new rows with an earlier run's rows on the same episodes, into one results file and report.

`bench/run.py` is deterministic per (episode, row): the episodes come from the seed and the family's
settings, every row trains in a fresh process with pinned threads and seeded order. A row whose code
changed can then be re-run alone on the same episodes and paired with the earlier run's other rows,
instead of re-running them all. This script checks that the two runs drew the same episodes (domain,
ways, shots, classes and the untrained head's accuracy must agree episode by episode), keeps the
episodes both runs finished, renames rows of the earlier run that the new run replaces, and writes
`<name>.json/.md/.png`. Times and memory of rows from different runs were measured under different
loads: compare accuracy across them, not time.

    python bench/merge_runs.py bench/results/images.json /tmp/images-tt.json \\
        --take sparse_tinytrain=sparse_tinytrain_budget --name images-sparse2

With --append, the new run holds OTHER episodes of the same draw and protocol (`bench/run.py --from-episode K`):
its episodes are added to the base run's (no id in both, same settings, episode shapes and row grids; checked).

    python bench/merge_runs.py bench/results/text-fewshot-s4-last2.json bench/results/text-fewshot-s5-bbc.json \
        --append --name text-fewshot-s5
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.protocol import report  # noqa: E402
from bench.protocol.driver import row_meta  # noqa: E402
from bench.protocol.rows import load_recipe_rows  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAME = ("domain", "ways", "shots", "classes")


def merge(base: dict[str, Any], new: dict[str, Any], take: dict[str, str], rename: dict[str, str]) -> dict[str, Any]:
    """`base` with its rows renamed per `rename` and `new`'s rows `take` (name there -> name here) added, on the
    episodes both finished."""
    heads = {}
    for run, tag in ((base, "base"), (new, "new")):
        for r in run["records"]:
            if r["row"] == "head_only":
                heads.setdefault(r["episode"], {})[tag] = r
    common = sorted(e for e, both in heads.items() if len(both) == 2)
    for episode in common:
        a, b = heads[episode]["base"], heads[episode]["new"]
        if any(a.get(k) != b.get(k) for k in SAME) or a.get("accuracy") != b.get("accuracy"):
            raise SystemExit(f"episode {episode} differs between the runs: {[(k, a.get(k), b.get(k)) for k in (*SAME, 'accuracy')]}")
    keep = set(common)
    merged = copy.deepcopy(base)
    records = [dict(r, row=rename.get(r["row"], r["row"])) for r in base["records"] if r["episode"] in keep]
    records += [dict(r, row=take[r["row"]]) for r in new["records"] if r["row"] in take and r["episode"] in keep]
    merged["records"] = records
    merged["prepare"] = [p for p in base.get("prepare", []) if p["episode"] in keep]
    defined = {row.name: row for row in load_recipe_rows()}
    rows = []
    for row in base["meta"]["rows"]:  # a renamed row takes its new name's recipe file (label, options spelled out)
        name = rename.get(row["name"], row["name"])
        rows.append(row_meta(defined[name]) if name != row["name"] and name in defined else row)
    for row in new["meta"]["rows"]:
        if row["name"] in take:
            name = take[row["name"]]
            rows.append(row_meta(defined[name]) if name != row["name"] and name in defined else row)
    meta = merged["meta"]
    meta["rows"] = rows
    summaries = {rename.get(k, k): v for k, v in meta.get("pass_summaries", {}).items()}
    summaries.update({take[k]: v for k, v in new["meta"].get("pass_summaries", {}).items() if k in take})
    meta["pass_summaries"] = summaries
    meta["episodes_done"] = len(common)
    meta["second_run_rows"] = list(take.values())  # measured in the second run (docs_tables: times comparable within a run only)
    taken = ", ".join(k if k == v else f"{k} as {v}" for k, v in take.items())
    meta["command"] = f"{base['meta']['command']}  +  {new['meta']['command']} (rows {taken}), merged by bench/merge_runs.py"
    kept = [line for line in meta.get("description", []) if not line.startswith("Run stopped after")]  # the merge's own count below
    second = new["meta"]
    meta["description"] = [*kept, (
        f"Merged: the {len(common)} episodes both runs finished (the second run's wall {second.get('wall_seconds', 0):.0f} s, load "
        f"{second.get('loadavg_start', [0])[0]:.1f} at start, {second.get('loadavg_now', [0])[0]:.1f} at the end; the Machine line is "
        "the first run's)."), (
        f"Rows {taken} come from a second run on the same episodes (`{new['meta']['command']}`, started "
        f"{new['meta'].get('started')}, load {new['meta'].get('loadavg_start', [0])[0]:.1f} at start); the other rows from the first "
        f"(started {base['meta'].get('started')})"
        + (f", where {', '.join(f'`{k}` was the row now called `{v}`' for k, v in rename.items())}" if rename else "")
        + ". Both runs drew the same episodes (checked: domain, ways, shots, classes and the untrained head's accuracy in each); "
        "time and memory columns of rows from different runs were measured under different loads.")]
    return merged


PROTOCOL = ("family", "settings", "episode_config", "corpora", "lengths", "tiny_encoder", "dims")
"""Meta fields two runs must share for their episodes to be pooled (the draw, the training, the text shapes)."""


def append(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`base` with `new`'s episodes added: a run of the same draw and protocol on other episodes (`bench/run.py
    --from-episode/--only-domains`). Refused when an episode id is in both, when the protocol differs, or when a
    row both runs have used a different learning-rate grid. A row only one run has keeps its own episodes."""
    a, b = base["meta"], new["meta"]
    differs = [k for k in PROTOCOL if _fields(a.get(k), b.get(k)) != _fields(b.get(k), a.get(k))]
    if differs:
        raise SystemExit(f"the runs differ in {', '.join(differs)}: " + "; ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in differs))
    ids_a, ids_b = {r["episode"] for r in base["records"]}, {r["episode"] for r in new["records"]}
    if ids_a & ids_b:
        raise SystemExit(f"episodes {sorted(ids_a & ids_b)} are in both runs: append only a run of other episodes (--from-episode)")
    grids_a, grids_b = ({row["name"]: row.get("lr_grid") for row in m["rows"]} for m in (a, b))
    clash = [name for name in set(grids_a) & set(grids_b) if grids_a[name] != grids_b[name]]
    if clash:
        raise SystemExit(f"rows {sorted(clash)} used other learning-rate grids: " + "; ".join(f"{n}: {grids_a[n]} vs {grids_b[n]}" for n in clash))
    merged = copy.deepcopy(base)
    merged["records"] = [*base["records"], *copy.deepcopy(new["records"])]
    merged["prepare"] = [*base.get("prepare", []), *copy.deepcopy(new.get("prepare", []))]
    meta = merged["meta"]
    meta["rows"] = [*a["rows"], *[row for row in b["rows"] if row["name"] not in grids_a]]
    meta["pass_summaries"] = {**b.get("pass_summaries", {}), **a.get("pass_summaries", {})}
    meta["episodes_done"] = len(ids_a | ids_b)
    meta["episodes"] = len(ids_a | ids_b)
    meta["domains"] = sorted(set(a.get("domains", [])) | set(b.get("domains", [])))
    # rows measured in another run than the others somewhere (docs_tables: times comparable within a run only)
    meta["parts"] = [*report.parts(base), *report.parts(new)]  # which rows each part measured in a second run (report.measured_together)
    second = set(a.get("second_run_rows", [])) | set(b.get("second_run_rows", []))
    if second:
        meta["second_run_rows"] = sorted(second)
    domains = {r["episode"]: r["domain"] for r in new["records"]}
    counts = ", ".join(f"{d} {n}" for d, n in sorted(Counter(domains.values()).items()))
    rows_b = [row["name"] for row in b["rows"] if row["name"] != "head_only"]
    meta.setdefault("appended", []).append({"command": b.get("command"), "started": b.get("started"), "episodes": sorted(ids_b),
                                            "rows": rows_b, "loadavg_start": b.get("loadavg_start"), "loadavg_now": b.get("loadavg_now"),
                                            "wall_seconds": b.get("wall_seconds"), "continued": b.get("continued")})
    meta["command"] = f"{a['command']}  +  {b['command']} (other episodes, appended by bench/merge_runs.py --append)"
    meta["description"] = [*a.get("description", []), (
        f"Appended: {len(ids_b)} episodes ({counts}; ids {min(ids_b)}..{max(ids_b)}) of a later run of the same draw and protocol "
        f"(`{b.get('command')}`, started {b.get('started')}, load {(b.get('loadavg_start') or [0])[0]:.1f} at start, "
        f"{(b.get('loadavg_now') or [0])[0]:.1f} at the end, wall {b.get('wall_seconds', 0):.0f} s), rows {', '.join(rows_b)}: none of "
        "its episodes is in the first part (checked by id), the protocol and each shared row's lr grid are the same (checked). "
        "A row's time and memory medians pool both runs' episodes; ratios between rows are measured side by side only within a run. "
        "The later run's own notes follow."), *[line for line in b.get("description", []) if line not in a.get("description", [])]]
    return merged


def _fields(value: Any, other: Any) -> Any:
    """A settings dict compared on the keys both runs record (a key added to the code later is absent from older runs)."""
    return {k: v for k, v in value.items() if k in other} if isinstance(value, dict) and isinstance(other, dict) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--take", help="comma-separated rows of the new run, name or name_there=name_here")
    parser.add_argument("--append", action="store_true", help="add the new run's episodes (other episodes of the same draw) instead")
    parser.add_argument("--rename", default="", help="comma-separated old=new names for rows of the base run")
    parser.add_argument("--name", required=True)
    parser.add_argument("--baseline", default="last_layer")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    base, new = json.loads(args.base.read_text()), json.loads(args.new.read_text())
    if args.append == bool(args.take):
        parser.error("give either --take ROWS (pair rows on the same episodes) or --append (add other episodes)")
    if args.append:
        merged = append(base, new)
    else:
        rename = dict(pair.split("=", 1) for pair in args.rename.split(",") if pair)
        take = dict((pair.split("=", 1) * 2)[:2] for pair in args.take.split(",") if pair)
        merged = merge(base, new, take, rename)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(merged, indent=1, default=str) + "\n")
    report.write(report.load(args.results / f"{args.name}.json"), args.results, args.name, baseline=args.baseline)
    print(f"wrote {args.results}/{args.name}.{{json,md,png}} ({merged['meta']['episodes_done']} episodes)")


if __name__ == "__main__":
    main()
