"""Tables and plots of a family run, every comparison with its paired 95% interval.

A winner is named only when both the paired t interval and the domain-stratified bootstrap
interval exclude zero; otherwise the cell says "no difference shown". Accuracy axes run from
0 to 1 with the chance level marked, so results at chance do not look different from each
other by zooming; difference axes are symmetric around zero.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.protocol import stats

MIB = 2**20
MIN_PER_DOMAIN = 5
"""The bootstrap resamples within domains only when every domain has at least this many episodes."""


def load(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def rows_in_order(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    present = {r["row"] for r in result["records"]}
    return [row for row in sorted(result["meta"]["rows"], key=lambda r: (r["order"], r["name"])) if row["name"] in present]


def values(result: Mapping[str, Any], row: str, key: str | Callable[[Mapping[str, Any]], Any] = "accuracy",
           domain: str | None = None) -> dict[int, float]:
    """episode -> value for one row (failed or skipped episodes, and records without the value, left out). `key`: a
    record field, or a function of the record for a nested one (e.g. its peak RSS)."""
    out = {}
    for r in result["records"]:
        if r["row"] != row or "error" in r or (domain is not None and r["domain"] != domain):
            continue
        try:
            value = key(r) if callable(key) else r.get(key)
        except (KeyError, TypeError):
            value = None
        if value is not None:
            out[r["episode"]] = float(value)
    return out


def domains_of(result: Mapping[str, Any]) -> dict[int, str]:
    return {r["episode"]: r["domain"] for r in result["records"]}


def parts(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The result's parts: its episodes and the rows measured in a second run on them (`bench/merge_runs.py`), one
    part per appended run (`meta.parts`), or a single part over all its episodes."""
    meta = result["meta"]
    return meta.get("parts") or [{"episodes": sorted(domains_of(result)), "second_run_rows": meta.get("second_run_rows", [])}]


def measured_together(result: Mapping[str, Any], a: str, b: str) -> set[int]:
    """Episodes in which rows a and b were measured in one run: `bench/merge_runs.py` pairs rows of a second run
    (`second_run_rows`) and appends runs of other episodes (`parts`, each with its own second-run rows). Time ratios
    mean most there: a shared machine's load changes between runs."""
    together: set[int] = set()
    for part in parts(result):
        second = set(part.get("second_run_rows", []))
        if (a in second) == (b in second):
            together |= set(part["episodes"])
    return together


def compare(result: Mapping[str, Any], a: str, b: str, domain: str | None = None) -> tuple[stats.PairedDifference, stats.PairedDifference] | None:
    """Paired t and domain-stratified bootstrap of accuracy(a) - accuracy(b) over their common episodes."""
    va, vb = values(result, a, domain=domain), values(result, b, domain=domain)
    common = sorted(set(va) & set(vb))
    if not common:
        return None
    x, y = [va[e] for e in common], [vb[e] for e in common]
    where = [domains_of(result)[e] for e in common]
    stratify = min(Counter(where).values()) >= MIN_PER_DOMAIN  # too few per domain: resampling within them understates the spread
    return (stats.paired_t(x, y, names=(a, b)),
            stats.paired_bootstrap(x, y, names=(a, b), groups=where if stratify else None, seed=len(common)))


def verdict(pair: tuple[stats.PairedDifference, stats.PairedDifference] | None) -> str:
    if pair is None:
        return "n/a"
    t, boot = pair
    name_t, name_b = stats.winner(t), stats.winner(boot)
    if name_t is not None and name_t == name_b:
        return f"**{name_t}**"
    return "no difference shown"


def _cell(pair: tuple[stats.PairedDifference, stats.PairedDifference] | None) -> str:
    if pair is None:
        return "n/a"
    t, _ = pair
    if math.isinf(t.low):
        return f"{t.mean:+.3f} (n={t.n})"
    return f"{t.mean:+.3f} [{t.low:+.3f}, {t.high:+.3f}]"


def _boot_cell(pair: tuple[stats.PairedDifference, stats.PairedDifference] | None) -> str:
    if pair is None or math.isinf(pair[1].low):
        return "n/a"
    return f"[{pair[1].low:+.3f}, {pair[1].high:+.3f}]"


def _median(result: Mapping[str, Any], row: str, getter: Any) -> float | None:
    found = []
    for r in result["records"]:
        if r["row"] == row and "error" not in r:
            try:
                value = getter(r)
            except (KeyError, TypeError):
                value = None
            if value is not None:
                found.append(float(value))
    return statistics.median(found) if found else None


def _mib(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value / MIB:,.{digits}f}"


def _lr_counts(result: Mapping[str, Any], row: str) -> str:
    counts = Counter(r["lr"] for r in result["records"] if r["row"] == row and "error" not in r and r.get("lr") is not None)
    return ", ".join(f"{lr:g}×{n}" for lr, n in sorted(counts.items())) or "–"


def chance(result: Mapping[str, Any]) -> float:
    ways = {r["episode"]: r["ways"] for r in result["records"]}
    return float(np.mean([1 / w for w in ways.values()])) if ways else math.nan


def markdown(result: Mapping[str, Any], *, baseline: str = "last_layer", reference: str = "full") -> str:
    meta = result["meta"]
    rows = rows_in_order(result)
    names = {r["name"] for r in rows}
    baseline = baseline if baseline in names else rows[0]["name"]
    if reference not in names and "full_manual_ort" in names:  # a run without edgeplug's full fine-tune: the hand-built one
        reference = "full_manual_ort"
    settings = meta["settings"]
    episodes = sorted({r["episode"] for r in result["records"]})
    lines = [f"# {meta['title']}", ""]
    if meta.get("command"):
        lines += [f"Command: `{meta['command']}`  "]
    lines += [text + "  " for text in meta.get("description", [])]
    lines += [
        (f"Training: every row, every episode: {settings['steps']}+ optimizer steps (whole epochs) of batch min({settings['batch_size']}, "
         f"training shots), once per learning rate of its grid (default {', '.join(f'{v:g}' for v in settings['grid'])}"
         f"{_row_grids(meta)}); the "
         "validation shots choose the learning rate (accuracy, then loss); the query accuracy of that choice is the row's result. "
         "Same sample order in every runtime. Each (row, episode) in a fresh process, rows interleaved in a per-episode seeded order.  "),
        (f"Threads: {settings['threads']} per runtime (onnxruntime intra-op {settings['threads']}, inter-op 1, no spinning; torch "
         f"set_num_threads({settings['threads']}), 1 inter-op; OMP/MKL/OpenBLAS env = {settings['threads']}); onnxruntime CPU arena on "
         "(edgeplug's default; staged folders turn it off); edgeplug rows under their recipe's `training.memory` (default "
         "`compact`: the planner's buffer reuse off).  "),
        (f"Machine: {meta['machine']}, shared: load average {_load(meta.get('loadavg_start'))} at start, "
         f"{_load(meta.get('loadavg_now'))} at the end. Wall {meta.get('wall_seconds', 0):.0f} s; CPU seconds of the row and "
         f"prepare processes {meta.get('child_cpu_seconds', 0):.0f} s, i.e. about {meta.get('child_cpu_seconds', 0) / 120:.0f} min of "
         f"wall time on 2 idle cores with `--jobs 2` ({meta.get('parallel_rows', 1)} row process(es) at once in this run).  "),
        f"Episodes: {len(episodes)} ({', '.join(f'{d} {n}' for d, n in sorted(Counter(domains_of(result).values()).items()))}); "
        f"chance level (mean 1/ways) {chance(result):.3f}.",
        "",
        f"## Accuracy and paired differences (vs `{baseline}` and vs `{reference}`)",
        "",
        f"| row | n | query accuracy, mean [95% CI] | Δ vs `{baseline}` [paired t 95% CI] | bootstrap CI | winner vs `{baseline}` "
        f"| Δ vs `{reference}` [95% CI] | winner vs `{reference}` | chosen lr (count) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        acc = list(values(result, row["name"]).values())
        s = stats.summary(acc)
        against = compare(result, row["name"], baseline) if row["name"] != baseline else None
        against_ref = compare(result, row["name"], reference) if row["name"] != reference and reference in names else None
        ci = f"[{max(0.0, s['low']):.3f}, {min(1.0, s['high']):.3f}]" if len(acc) > 1 else ""
        lines.append(f"| {row['label']} (`{row['name']}`) | {len(acc)} | {s['mean']:.3f} {ci} | {_cell(against) if against else '–'} "
                     f"| {_boot_cell(against) if against else '–'} | {verdict(against) if against else '–'} "
                     f"| {_cell(against_ref) if against_ref else '–'} | {verdict(against_ref) if against_ref else '–'} "
                     f"| {_lr_counts(result, row['name'])} |")
    lines += ["", "A winner is named only when the paired t interval and the bootstrap interval both exclude 0. The bootstrap "
              f"(10,000 resamples of episodes, percentile) resamples within domains when every domain has at least {MIN_PER_DOMAIN} "
              "episodes, else over all episodes. Accuracy intervals are t intervals clipped to [0, 1].", ""]
    lines += _domain_table(result, rows, baseline)
    lines += _extra_comparisons(result, rows)
    lines += _cost_table(result, rows, reference)
    errors = [r for r in result["records"] if "error" in r]
    if errors:
        lines += ["", "## Skipped or failed", ""]
        for r in errors[:20]:
            lines.append(f"- `{r['row']}` episode {r['episode']} ({r['domain']}): {r['error'][:300]}")
        if len(errors) > 20:
            lines.append(f"- … {len(errors) - 20} more in the .json")
    if meta.get("pass_summaries"):
        first = min((r["episode"] for r in result["records"]), default=0)
        lines += ["", f"## What the passes chose (episode {first}, from report.json)", ""]
        for row, passes in meta["pass_summaries"].items():
            text = "; ".join(f"{p['name']}: {p['summary']}" for p in passes if p.get("summary") and p["name"] not in ("normalize", "new-head"))
            if text:
                lines.append(f"- `{row}`: {text}")
    lines += ["", "Per-episode numbers (every learning-rate candidate with its validation and query scores, memory, "
              "step times, thread settings, load): the `.json` next to this file."]
    return "\n".join(lines) + "\n"


def _row_grids(meta: Mapping[str, Any]) -> str:
    own = [f"`{r['name']}` {', '.join(f'{v:g}' for v in r['lr_grid'])}" for r in meta.get("rows", []) if r.get("lr_grid")]
    return "; " + "; ".join(own) if own else ""


def _load(value: Sequence[float] | None) -> str:
    return "?" if not value else "/".join(f"{v:.1f}" for v in value)


def _domain_table(result: Mapping[str, Any], rows: list[dict[str, Any]], baseline: str) -> list[str]:
    domains = sorted(set(domains_of(result).values()))
    if len(domains) < 2:
        return []
    lines = [f"## Per domain: mean accuracy, and Δ vs `{baseline}` [paired t 95% CI]", "",
             "| row | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for row in rows:
        cells = []
        for domain in domains:
            acc = list(values(result, row["name"], domain=domain).values())
            if not acc:
                cells.append("–")
                continue
            pair = compare(result, row["name"], baseline, domain) if row["name"] != baseline else None
            mark = " ✓" if pair and stats.winner(pair[0]) == row["name"] else (" ✗" if pair and stats.winner(pair[0]) == baseline else "")
            cells.append(f"{np.mean(acc):.3f}" + (f" ({_cell(pair)}){mark}" if pair else ""))
        lines.append(f"| `{row['name']}` | " + " | ".join(cells) + " |")
    lines += ["", f"✓ / ✗: the paired t interval within that domain excludes 0 (better / worse than `{baseline}`).", ""]
    return lines


def _extra_comparisons(result: Mapping[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    pairs = [(row["name"], other) for row in rows for other in row.get("compare", []) if other in {r["name"] for r in rows}]
    if not pairs:
        return []
    lines = ["## Comparisons the rows ask for", "", "| comparison | n | Δ accuracy [paired t 95% CI] | bootstrap CI | winner |",
             "|---|---|---|---|---|"]
    for a, b in pairs:
        pair = compare(result, a, b)
        lines.append(f"| `{a}` − `{b}` | {pair[0].n if pair else 0} | {_cell(pair)} | {_boot_cell(pair)} | {verdict(pair)} |")
    return lines + [""]


def _cost_table(result: Mapping[str, Any], rows: list[dict[str, Any]], reference: str) -> list[str]:
    lines = ["## Memory and time (medians over episodes; measured on each row's first learning-rate candidate in its fresh process)", "",
             "| row | trainable values | static training bytes (MiB) | retained activations (MiB) | peak RSS (MiB) | RSS added by training (MiB) "
             "| RSS added with loading (MiB) | RSS at ready point (MiB) | median step (ms) | fine-tune, one lr (s) | rewrite (s) | CPU s per episode |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        name = row["name"]
        if row["kind"] == "head":
            continue
        trainable = _median(result, name, lambda r: r["trainable_values"])
        first = next((r for r in result["records"] if r["row"] == name and r.get("static")), None)
        static = (first or {}).get("static") or {}
        step = _median(result, name, lambda r: r["median_step_seconds"])
        rewrite = _median(result, name, lambda r: r["rewrite_seconds"])
        cpu = _median(result, name, lambda r: r["cpu_seconds"])
        fit = _median(result, name, lambda r: r["fit_seconds"])
        lines.append(
            f"| `{name}` | {'–' if trainable is None else f'{trainable:,.0f}'} | {_mib(static.get('total_training_bytes'), 2)} "
            f"| {_mib(static.get('retained_activation_bytes'), 2)} | {_mib(_median(result, name, lambda r: r['memory']['peak_rss_bytes']))} "
            f"| {_mib(_median(result, name, lambda r: r['memory']['rss_added_bytes']))} "
            f"| {_mib(_median(result, name, lambda r: r['memory']['rss_added_with_loading_bytes']))} "
            f"| {_mib(_median(result, name, lambda r: r['memory']['rss_ready_bytes']))} "
            f"| {'–' if step is None else f'{1000 * step:.1f}'} | {'–' if fit is None else f'{fit:.1f}'} "
            f"| {'–' if rewrite is None else f'{rewrite:.1f}'} | {'–' if cpu is None else f'{cpu:.1f}'} |")
    profiled = min((r["episode"] for r in result["records"] if r.get("static")), default=0)  # the run's first episode
    lines += ["", f"Static bytes come from `edgeplug.profiling.static_profile` at the training batch of episode {profiled} (parameters + gradients + "
              "optimizer state + retained activations); RSS from /proc/self/status (peak = VmHWM over the process; added by training = peak "
              "after the ready point − RSS at it; added with loading = peak after the row starts loading its model − RSS then; the peak "
              "counter is reset at both points). edgeplug's Trainer caches a frozen prefix (everything before the first trainable layer) "
              "once per example when it can (`edgeplug.prefix_cache`, bit-identical training): the cache is filled before step 1, so its "
              "memory shows in peak RSS and in RSS added with loading, not in RSS added by training, and its time in fine-tune seconds "
              "(the whole `fit`/loop of the first lr candidate, opening the sessions included) but not in the median step. Times vary with the shared machine's load: compare rows "
              "within this table.", ""]
    return lines


def plot(result: Mapping[str, Any], path: Path, *, baseline: str = "last_layer") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows_in_order(result)
    names = [r["name"] for r in rows]
    baseline = baseline if baseline in names else names[0]
    colours = {"head": "#888888", "recipe": "#1f77b4", "manual": "#ff7f0e", "torch": "#d62728"}
    y = np.arange(len(rows))[::-1]
    figure, axes = plt.subplots(1, 4, figsize=(17, 0.45 * len(rows) + 2.2), sharey=True,
                                gridspec_kw={"width_ratios": [1.3, 1.3, 1, 1]})
    deltas = []
    for position, row in zip(y, rows, strict=True):
        colour = colours.get(row["kind"], "#1f77b4")
        s = stats.summary(list(values(result, row["name"]).values()))
        if s["n"]:
            low, high = (max(0.0, s["low"]), min(1.0, s["high"])) if s["n"] > 1 else (s["mean"], s["mean"])
            axes[0].errorbar(s["mean"], position, xerr=[[s["mean"] - low], [high - s["mean"]]], fmt="o", color=colour, capsize=3)
        if row["name"] != baseline:
            pair = compare(result, row["name"], baseline)
            if pair and not math.isinf(pair[0].low):
                t = pair[0]
                deltas += [abs(t.low), abs(t.high)]
                axes[1].errorbar(t.mean, position, xerr=[[t.mean - t.low], [t.high - t.mean]], fmt="o", color=colour, capsize=3)
        for axis, getter, scale in ((axes[2], lambda r: r["memory"]["rss_added_bytes"], 1 / MIB),
                                    (axes[3], lambda r: r["median_step_seconds"], 1000)):
            found = [getter(r) * scale for r in result["records"] if r["row"] == row["name"] and "error" not in r and _has(r, getter)]
            if found:
                med = statistics.median(found)
                axis.errorbar(med, position, xerr=[[med - min(found)], [max(found) - med]], fmt="s", color=colour, capsize=3)
    level = chance(result)
    axes[0].axvline(level, color="grey", linestyle=":", linewidth=1)
    axes[0].text(level, y.max() + 0.6, " chance", color="grey", fontsize=8, va="bottom")
    axes[0].set_xlim(0, 1)
    axes[0].set_xlabel("query accuracy (mean, 95% CI)")
    span = max(deltas + [0.05]) * 1.1
    axes[1].set_xlim(-span, span)
    axes[1].axvline(0, color="black", linewidth=0.8)
    axes[1].set_xlabel(f"Δ accuracy vs {baseline} (paired t 95% CI)")
    axes[2].set_xlabel("RSS added by training (MiB; median, min–max)")
    axes[3].set_xlabel("median train step (ms; median, min–max)")
    axes[2].set_xlim(left=0)
    axes[3].set_xlim(left=0)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels([r["name"] for r in rows], fontsize=9)
    axes[0].set_ylim(-0.8, len(rows) - 0.2)
    for axis in axes:
        axis.grid(axis="x", alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=k) for k, c in colours.items()
               if any(r["kind"] == k for r in rows)]
    figure.legend(handles=handles, labels=[{"head": "no training", "recipe": "edgeplug recipe", "manual": "ORT by hand",
                                             "torch": "PyTorch eager"}[h.get_label()] for h in handles],
                  loc="upper right", ncol=len(handles), fontsize=8, frameon=False)
    meta = result["meta"]
    figure.suptitle(f"{meta['title']} — {len({r['episode'] for r in result['records']})} episodes", x=0.01, ha="left", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _has(record: Mapping[str, Any], getter: Any) -> bool:
    try:
        return getter(record) is not None
    except (KeyError, TypeError):
        return False


def write(result: Mapping[str, Any], folder: Path, name: str, *, baseline: str = "last_layer") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.md").write_text(markdown(result, baseline=baseline), encoding="utf-8")
    plot(result, folder / f"{name}.png", baseline=baseline)
