#!/usr/bin/env python
"""Issue #25's few-shot questions, per corpus and pooled, from one `bench/run.py text` results file.

For a lean row against the full fine-tune (default `lora_all_int8` − `full_manual_ort`) and against
the last layer: the paired t and bootstrap 95% intervals of the accuracy difference, the spread of
the per-episode difference, how many episodes an interval inside ±1 point would need at that spread,
and the peak-RSS and median-step ratios measured side by side in the same episodes. Writes
`<stem>-paired.{md,json}` next to the results file (or under --results).

    python bench/text_fewshot.py bench/results/text-fewshot-s4.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.protocol import report  # noqa: E402

MIB = 2**20
Getter = Callable[[Mapping[str, Any]], float]
COSTS: dict[str, Getter] = {
    "peak RSS (MiB)": lambda r: r["memory"]["peak_rss_bytes"] / MIB,
    "median step (ms)": lambda r: r["median_step_seconds"] * 1000,
}


def episodes_needed(sd: float, margin: float, mean: float = 0.0, confidence: float = 0.95, *, low_end_only: bool = False) -> int | None:
    """Smallest n whose two-sided paired t interval, at this per-episode spread and mean, lies inside ±margin
    (equivalence), or with `low_end_only` whose low end is at least -margin (not worse by more than the margin:
    what "within 1 point of full fine-tuning" asks of a row that may also be better). None when no episode count
    gets there (|mean| >= margin, or mean <= -margin for the low end)."""
    from scipy import stats

    room = margin + mean if low_end_only else margin - abs(mean)
    if room <= 0:
        return None
    if sd == 0:
        return 2
    n = 2
    while float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n) > room:
        n = max(n + 1, int(n * 1.05))
    return n


def difference(result: Mapping[str, Any], a: str, b: str, domain: str | None, margin: float) -> dict[str, Any] | None:
    pair = report.compare(result, a, b, domain)
    if pair is None:
        return None
    t, boot = pair
    va, vb = report.values(result, a, domain=domain), report.values(result, b, domain=domain)
    diffs = [va[e] - vb[e] for e in sorted(set(va) & set(vb))]
    sd = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
    return {"n": t.n, "mean": t.mean, "t": [t.low, t.high], "p": t.p_value, "bootstrap": [boot.low, boot.high],
            "half_width": (t.high - t.low) / 2, "sd": sd, "min": min(diffs), "max": max(diffs),
            "needed_at_mean_0": episodes_needed(sd, margin) if sd == sd else None,
            "needed_at_measured_mean": episodes_needed(sd, margin, t.mean) if sd == sd else None,
            "needed_low_end_at_measured_mean": episodes_needed(sd, margin, t.mean, low_end_only=True) if sd == sd else None,
            "low_end_within_margin": t.low >= -margin,
            "verdict": report.verdict(pair)}


def costs(result: Mapping[str, Any], a: str, b: str, domain: str | None) -> dict[str, Any]:
    """Medians of each row and the per-episode ratio b ÷ a (how many times leaner/faster a is than b)."""
    out = {}
    for label, getter in COSTS.items():
        per = {row: report.values(result, row, key=getter, domain=domain) for row in (a, b)}
        common = sorted(set(per[a]) & set(per[b]))
        ratios = [per[b][e] / per[a][e] for e in common if per[a][e] > 0]
        out[label] = {"n": len(common), a: statistics.median(per[a].values()) if per[a] else None,
                      b: statistics.median(per[b].values()) if per[b] else None, **_ratios(ratios)}
        together = report.measured_together(result, a, b)
        if set(common) - together:  # some ratios compare two runs: also those measured side by side
            same = [per[b][e] / per[a][e] for e in common if e in together and per[a][e] > 0]
            out[label]["same_run"] = {"n": len(same), **_ratios(same)}
    return out


def _ratios(ratios: list[float]) -> dict[str, Any]:
    return {"ratio_median": statistics.median(ratios) if ratios else None, "ratio_min": min(ratios) if ratios else None,
            "ratio_max": max(ratios) if ratios else None, "at_least_3x": sum(r >= 3 for r in ratios)}


def summarise(result: Mapping[str, Any], row: str, reference: str, baseline: str, margin: float) -> dict[str, Any]:
    domains = sorted(set(report.domains_of(result).values()))
    scopes: dict[str, Any] = {}
    for domain in (*domains, None):
        scopes[domain or "pooled"] = {
            f"{row} - {reference}": difference(result, row, reference, domain, margin),
            f"{row} - {baseline}": difference(result, row, baseline, domain, margin),
            f"{reference} - {baseline}": difference(result, reference, baseline, domain, margin),
            "costs": costs(result, row, reference, domain),
            "accuracy": {name: statistics.mean(v.values()) if (v := report.values(result, name, domain=domain)) else None
                         for name in ("head_only", baseline, reference, row)},
        }
    return {"row": row, "reference": reference, "baseline": baseline, "margin": margin, "scopes": scopes,
            "meta": {k: result["meta"].get(k) for k in ("command", "started", "loadavg_start", "loadavg_now", "wall_seconds",
                                                         "episode_config", "source_commit")}}


def _pts(value: float) -> str:
    return f"{100 * value:+.1f}"


def _needed(value: int | None) -> str:
    return "none reaches it" if value is None else f"{value:,}"


def markdown(summary: Mapping[str, Any], results: Path) -> str:
    source = results.with_suffix(".md").name
    row, ref, base, margin = summary["row"], summary["reference"], summary["baseline"], summary["margin"]
    lines = [f"# #25 few-shot: `{row}` against `{ref}` and `{base}`, per corpus and pooled", "",
             f"From [{source}]({source}) (`python bench/text_fewshot.py {results}`). Accuracy differences in "
             "points (percentage points of query accuracy), mean over episodes [paired t 95% CI] and the paired bootstrap 95% CI "
             "(pooled: resampled within corpora). *sd* is the standard deviation of the per-episode difference; *episodes for ±1 pt* "
             f"is the smallest episode count whose paired t interval, at that sd, would lie inside ±{100 * margin:g} point at a true "
             f"mean of 0 and at the measured mean (equivalence), and whose low end would reach −{100 * margin:g} point at the measured "
             f"mean (not worse by more than {100 * margin:g} point: a row that may be better needs only that); *low end ≥ −1 pt* says "
             "whether this run's interval already shows that.", "",
             "## Accuracy", "",
             "| scope | comparison | n | Δ pts [paired t 95% CI] | bootstrap | half-width | sd | per-episode range "
             "| episodes for ±1 pt (mean 0 / measured) | episodes for low end ≥ −1 pt (measured mean) | low end ≥ −1 pt | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for scope, parts in summary["scopes"].items():
        for name in (f"{row} - {ref}", f"{row} - {base}", f"{ref} - {base}"):
            d = parts[name]
            if d is None:
                continue
            lines.append(f"| {scope} | `{name.replace(' - ', '` − `')}` | {d['n']} | {_pts(d['mean'])} [{_pts(d['t'][0])}, {_pts(d['t'][1])}] "
                         f"| [{_pts(d['bootstrap'][0])}, {_pts(d['bootstrap'][1])}] | {100 * d['half_width']:.1f} | {100 * d['sd']:.1f} "
                         f"| {_pts(d['min'])} .. {_pts(d['max'])} | {_needed(d['needed_at_mean_0'])} / {_needed(d['needed_at_measured_mean'])} "
                         f"| {_needed(d['needed_low_end_at_measured_mean'])} | {'yes' if d['low_end_within_margin'] else 'no'} | {d['verdict']} |")
    lines += ["", "## Mean query accuracy", "", "| scope | " + " | ".join(f"`{n}`" for n in next(iter(summary["scopes"].values()))["accuracy"]) + " |",
              "|---|" + "---|" * len(next(iter(summary["scopes"].values()))["accuracy"])]
    for scope, parts in summary["scopes"].items():
        lines.append(f"| {scope} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in parts["accuracy"].values()) + " |")
    lines += ["", f"## Cost, measured side by side in the same episodes (`{ref}` ÷ `{row}` per episode)", "",
              f"| scope | measure | n | `{ref}` median | `{row}` median | ratio, median (min–max) | episodes at ≥3x |", "|---|---|---|---|---|---|---|"]
    for scope, parts in summary["scopes"].items():
        for label, c in parts["costs"].items():
            if not c["n"]:
                continue
            lines.append(f"| {scope} | {label} | {c['n']} | {c[ref]:,.0f} | {c[row]:,.0f} | {c['ratio_median']:.2f}x "
                         f"({c['ratio_min']:.2f}–{c['ratio_max']:.2f}x) | {c['at_least_3x']} of {c['n']} |")
            if "same_run" in c:
                same = c["same_run"]
                lines.append(f"| {scope} | {label}: only the episodes where both ran in one run | {same['n']} | | | "
                             + (f"{same['ratio_median']:.2f}x ({same['ratio_min']:.2f}–{same['ratio_max']:.2f}x) | {same['at_least_3x']} of {same['n']} |"
                                if same["n"] else "– | – |"))
    meta = summary["meta"]
    load = lambda v: "/".join(f"{x:.1f}" for x in v) if v else "?"  # noqa: E731
    lines += ["", f"Run started {meta.get('started')}; load average {load(meta.get('loadavg_start'))} at its start, "
              f"{load(meta.get('loadavg_now'))} at its end: step times are comparable within an episode, not across runs.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="a bench/run.py text results .json")
    p.add_argument("--row", default="lora_all_int8")
    p.add_argument("--reference", default="full_manual_ort")
    p.add_argument("--baseline", default="last_layer")
    p.add_argument("--margin", type=float, default=0.01, help="the target's accuracy margin (0.01 = 1 point)")
    p.add_argument("--out", type=Path, help="output stem (default: <results stem>-paired next to it)")
    args = p.parse_args(argv)
    result = report.load(args.results)
    summary = summarise(result, args.row, args.reference, args.baseline, args.margin)
    out = args.out or args.results.with_name(args.results.stem + "-paired")
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    text = markdown(summary, args.results)
    out.with_suffix(".md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
