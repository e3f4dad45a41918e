"""bench/text_fewshot.py: #25's few-shot numbers per corpus and pooled, and the episode count a ±1 point interval needs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.protocol import report  # noqa: E402
from bench.text_fewshot import episodes_needed, markdown, summarise  # noqa: E402

MIB = 2**20


def _result() -> dict:
    """Two corpora, 6 episodes each; lora is 1 point below full on trec and 1 above on bbc, 3x leaner, 4x faster."""
    records = []
    for e in range(12):
        domain = ("trec", "bbc")[e % 2]
        base = {"episode": e, "domain": domain, "ways": 4, "shots": 6}
        shift = -0.01 if domain == "trec" else 0.01
        noise = 0.02 * ((e // 2) % 3 - 1)
        records += [
            {**base, "row": "head_only", "accuracy": 0.60},
            {**base, "row": "last_layer", "accuracy": 0.62, "memory": {"peak_rss_bytes": 250 * MIB}, "median_step_seconds": 0.05},
            {**base, "row": "full_manual_ort", "accuracy": 0.70, "memory": {"peak_rss_bytes": 900 * MIB}, "median_step_seconds": 0.8},
            {**base, "row": "lora_all_int8", "accuracy": 0.70 + shift + noise, "memory": {"peak_rss_bytes": 300 * MIB},
             "median_step_seconds": 0.2},
        ]
    records.append({"episode": 12, "domain": "trec", "ways": 4, "shots": 6, "row": "lora_all_int8", "error": "killed"})  # failed rows are left out
    meta = {"rows": [{"name": n, "label": n, "order": i, "kind": "head" if n == "head_only" else "recipe"}
                     for i, n in enumerate(("head_only", "last_layer", "full_manual_ort", "lora_all_int8"))],
            "title": "t", "started": "now", "loadavg_start": [1.0, 1.0, 1.0], "loadavg_now": [2.0, 2.0, 2.0]}
    return {"meta": meta, "records": records}


def test_differences_and_cost_ratios_per_corpus_and_pooled() -> None:
    summary = summarise(_result(), "lora_all_int8", "full_manual_ort", "last_layer", 0.01)
    scopes = summary["scopes"]
    assert list(scopes) == ["bbc", "trec", "pooled"]
    trec, bbc, pooled = (scopes[s]["lora_all_int8 - full_manual_ort"] for s in ("trec", "bbc", "pooled"))
    assert trec["n"] == bbc["n"] == 6 and pooled["n"] == 12
    assert trec["mean"] == pytest.approx(-0.01) and bbc["mean"] == pytest.approx(0.01) and pooled["mean"] == pytest.approx(0.0, abs=1e-12)
    assert trec["t"][0] < trec["mean"] < trec["t"][1] and pooled["bootstrap"][0] < 0 < pooled["bootstrap"][1]
    # |mean| = the margin: no episode count shows "within 1 point" on trec alone; pooled at mean 0 it is a finite count
    assert trec["needed_at_measured_mean"] is None and pooled["needed_at_measured_mean"] == pooled["needed_at_mean_0"] > 12
    # 1 point below: no count shows the low end above -1 point; 1 point above: the low end needs fewer than mean 0 does
    assert trec["needed_low_end_at_measured_mean"] is None and bbc["needed_low_end_at_measured_mean"] < bbc["needed_at_mean_0"]
    assert bbc["low_end_within_margin"] == (bbc["t"][0] >= -0.01)
    cost = scopes["pooled"]["costs"]
    assert cost["peak RSS (MiB)"]["ratio_median"] == pytest.approx(3.0) and cost["peak RSS (MiB)"]["at_least_3x"] == 12
    assert cost["median step (ms)"]["ratio_median"] == pytest.approx(4.0)
    text = markdown(summary, Path("bench/results/x.json"))
    assert "| pooled | `lora_all_int8` − `full_manual_ort` | 12 |" in text and "3.00x" in text


def test_episodes_needed_matches_the_t_interval() -> None:
    from scipy import stats

    n = episodes_needed(0.1, 0.01)
    assert n is not None
    half = lambda k: stats.t.ppf(0.975, k - 1) * 0.1 / math.sqrt(k)  # noqa: E731
    assert half(n) <= 0.01 < half(n - 1) * 1.06  # the search steps by up to 5%
    assert episodes_needed(0.1, 0.01, mean=0.005) > n and episodes_needed(0.1, 0.01, mean=0.02) is None
    assert episodes_needed(0.1, 0.01, mean=0.02, low_end_only=True) < n and episodes_needed(0.1, 0.01, mean=-0.01, low_end_only=True) is None


def test_the_report_falls_back_to_the_hand_built_fine_tune_as_reference() -> None:
    result = _result()
    for record in result["records"]:
        record.setdefault("lr", 1e-3)
    result["meta"].update(settings={"steps": 8, "batch_size": 16, "grid": [1e-4, 1e-3], "threads": 1}, machine="x")
    text = report.markdown(result)
    assert "vs `full_manual_ort`" in text
