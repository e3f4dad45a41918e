#!/usr/bin/env python
"""Two protocol runs on the same episodes (two backbones, two budgets): paired differences per row.

Both runs must hold the same episodes (same family options and seed; the episodes' domain,
ways, shots and classes are checked). For every row in both, accuracy(run A) - accuracy(run B)
over their common episodes (paired t and domain-stratified bootstrap, as in every table), and
within each run the comparisons sparse-update is judged on, over the same common episodes;
`--by-batch` adds those comparisons per group of episodes by training batch min(16, shots), which
sets how deep a backward-memory budget reaches (post hoc: read it as a description, not a test).

  python bench/meta_compare.py bench/results/images-meta.json bench/results/images.json \\
      --labels meta,imagenet --name images-meta-vs-imagenet
  python bench/meta_compare.py bench/results/images-budget4x.json bench/results/images.json \\
      --labels 112MiB,28MiB --what budgets --by-batch --name images-budget4x-vs-28
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.protocol import report  # noqa: E402

WITHIN = (("sparse_tinytrain", "last_layer"), ("sparse_tinytrain", "sparse_random"), ("sparse_random", "last_layer"),
          ("sparse_tinytrain", "sparse_static"), ("sparse_static", "last_layer"),
          ("sparse_tinytrain", "full"), ("last_layer", "head_only"), ("full", "last_layer"))
BATCH_GROUPS = (("16", 16, 16), ("6-15", 6, 15), ("2-5", 1, 5))  # training batch min(16, training shots), as bench/sparse_plans.py
SHAPE = ("domain", "ways", "shots", "train_size", "query_size", "classes")


def episodes_of(result: dict[str, Any]) -> dict[int, tuple[Any, ...]]:
    return {r["episode"]: tuple(json.dumps(r[k]) for k in SHAPE) for r in result["records"]}


def merged(a: dict[str, Any], b: dict[str, Any], labels: tuple[str, str]) -> tuple[dict[str, Any], list[int]]:
    """One result whose rows are `row@label` for both runs, over the episodes both hold."""
    shapes_a, shapes_b = episodes_of(a), episodes_of(b)
    common = sorted(set(shapes_a) & set(shapes_b))
    different = [e for e in common if shapes_a[e] != shapes_b[e]]
    if different:
        raise SystemExit(f"episodes {different[:5]} differ between the runs (domain, ways, shots or classes): not the same episodes")
    records = [{**r, "row": f"{r['row']}@{label}"} for result, label in zip((a, b), labels, strict=True)
               for r in result["records"] if r["episode"] in common]
    return {"meta": a["meta"], "records": records}, common


def table(a: dict[str, Any], b: dict[str, Any], labels: tuple[str, str], what: str = "backbones",
          by_batch: bool = False) -> tuple[str, dict[str, Any]]:
    both, common = merged(a, b, labels)
    domains = sorted({r["domain"] for r in both["records"]})
    rows = [r for r in (row["name"] for row in report.rows_in_order(a)) if report.values(b, r)]
    la, lb = labels
    lines = [f"Episodes in both runs: {len(common)} ({', '.join(f'{d} {sum(1 for e in common if report.domains_of(a)[e] == d)}' for d in domains)}).", "",
             f"### Same row, two {what}: {la} − {lb}", "",
             f"| row | {la} mean | {lb} mean | Δ {la} − {lb} [paired t 95% CI] | bootstrap CI | winner | "
             + " | ".join(f"Δ {d}" for d in domains) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(domains)]
    document: dict[str, Any] = {"labels": list(labels), "episodes": common, "rows": {}, "within": {}}
    for row in rows:
        pair = report.compare(both, f"{row}@{la}", f"{row}@{lb}")
        if pair is None:
            continue
        t, boot = pair
        mean_a = sum(report.values(both, f"{row}@{la}").values()) / len(report.values(both, f"{row}@{la}"))
        mean_b = sum(report.values(both, f"{row}@{lb}").values()) / len(report.values(both, f"{row}@{lb}"))
        per_domain = [report.compare(both, f"{row}@{la}", f"{row}@{lb}", domain=d) for d in domains]
        cells = [p[0].interval_text() if p else "–" for p in per_domain]
        lines.append(f"| `{row}` | {mean_a:.3f} | {mean_b:.3f} | {t.interval_text()} | [{boot.low:+.3f}, {boot.high:+.3f}] | "
                     f"{report.verdict(pair).replace('@', ' @ ')} | " + " | ".join(cells) + " |")
        document["rows"][row] = {"t": t.to_dict(), "bootstrap": boot.to_dict(), "mean": [mean_a, mean_b],
                                 "domains": {d: (p[0].to_dict() if p else None) for d, p in zip(domains, per_domain, strict=True)}}
    lines += ["", f"### The comparisons sparse-update is judged on, within each of the two {what} (same episodes)", "",
              f"| comparison | {la} [paired t 95% CI] | winner | {lb} [paired t 95% CI] | winner |", "|---|---|---|---|---|"]
    for x, y in WITHIN:
        if x not in rows or y not in rows:
            continue
        cells = []
        for label in labels:
            pair = report.compare(both, f"{x}@{label}", f"{y}@{label}")
            cells += [pair[0].interval_text() if pair else "–", report.verdict(pair).split("@")[0] + ("**" if "**" in report.verdict(pair) else "")]
            document["within"][f"{x} - {y} @ {label}"] = pair[0].to_dict() if pair else None
        lines.append(f"| `{x}` − `{y}` | " + " | ".join(cells) + " |")
    if by_batch:
        lines += _by_batch(both, rows, labels, document)
    return "\n".join(lines) + "\n", document


def _by_batch(both: dict[str, Any], rows: list[str], labels: tuple[str, str], document: dict[str, Any]) -> list[str]:
    """The within-run comparisons per group of episodes by training batch (paired t intervals)."""
    batch = {r["episode"]: min(16, r["train_size"]) for r in both["records"]}
    lines = ["", "### The same, by training batch min(16, training shots) (post hoc)", "",
             "| comparison | batch | episodes | " + " | ".join(f"{label} [paired t 95% CI]" for label in labels) + " |",
             "|---|---|---|" + "---|" * len(labels)]
    for x, y in WITHIN:
        if x not in rows or y not in rows:
            continue
        for name, low, high in BATCH_GROUPS:
            episodes = {e for e, b in batch.items() if low <= b <= high}
            part = {**both, "records": [r for r in both["records"] if r["episode"] in episodes]}
            cells = []
            for label in labels:
                pair = report.compare(part, f"{x}@{label}", f"{y}@{label}")
                cells.append(pair[0].interval_text() if pair else "–")
                document.setdefault("by_batch", {})[f"{x} - {y} @ {label} batch {name}"] = pair[0].to_dict() if pair else None
            lines.append(f"| `{x}` − `{y}` | {name} | {len(episodes)} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--labels", default="a,b", help="names of the two runs, comma-separated")
    parser.add_argument("--name", help="write bench/results/NAME.{md,json} (else print)")
    parser.add_argument("--title", default="Same episodes, two backbones")
    parser.add_argument("--what", default="backbones", help="what differs between the runs, for the headings (backbones, budgets)")
    parser.add_argument("--by-batch", action="store_true", help="also the within-run comparisons per training-batch group (post hoc)")
    args = parser.parse_args()
    labels = tuple(args.labels.split(","))
    if len(labels) != 2:
        raise SystemExit("--labels: give two names")
    a, b = report.load(args.a), report.load(args.b)
    text, document = table(a, b, (labels[0], labels[1]), what=args.what, by_batch=args.by_batch)
    command = "python bench/meta_compare.py " + shlex.join(sys.argv[1:])
    text = (f"# {args.title}\n\nCommand: `{command}`  \n{labels[0]}: `{args.a.name}` ({a['meta'].get('command', '')}).  \n"
            f"{labels[1]}: `{args.b.name}` ({b['meta'].get('command', '')}).  \nA winner is named only when the paired t interval "
            "and the bootstrap interval both exclude 0.\n\n" + text)
    if args.name:
        out = ROOT / "bench" / "results"
        (out / f"{args.name}.md").write_text(text, encoding="utf-8")
        (out / f"{args.name}.json").write_text(json.dumps({"command": command, **document}, indent=1) + "\n", encoding="utf-8")
        print(f"wrote bench/results/{args.name}.{{md,json}}")
    print(text)


if __name__ == "__main__":
    main()
