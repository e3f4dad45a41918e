"""bench/docs_tables.py: the generated "paper's claim vs our measurement" blocks of docs/passes pages.

The blocks are how docs/ quotes the bench, so a stale or misplaced block must be caught.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import docs_tables  # noqa: E402


def _result() -> dict:
    rows = [{"name": n, "order": i} for i, n in enumerate(("last_layer", "full", "sparse_tinytrain"))]
    records = []
    for e in range(8):
        for i, n in enumerate(("last_layer", "full", "sparse_tinytrain")):
            records.append({"row": n, "episode": e, "domain": "a" if e % 2 else "b", "ways": 5,
                            "accuracy": 0.5 + 0.05 * i + 0.01 * ((e * (i + 1)) % 3)})
    return {"meta": {"rows": rows, "title": "t", "domains": ["a", "b"]}, "records": records}


def test_block_goes_before_measured_then_is_replaced_in_place() -> None:
    page = "# Pass\n\nintro\n\n## Measured\n\nold numbers\n"
    first = docs_tables.place(page, f"{docs_tables.BEGIN}\nA\n{docs_tables.END}")
    assert first.index("A") < first.index("## Measured") and first.count(docs_tables.BEGIN) == 1
    second = docs_tables.place(first, f"{docs_tables.BEGIN}\nB\n{docs_tables.END}")
    assert "A" not in second.split("## Measured")[0] and "B" in second and second.count(docs_tables.BEGIN) == 1
    assert docs_tables.place(second, f"{docs_tables.BEGIN}\nB\n{docs_tables.END}") == second, "not idempotent"


def test_numbers_give_paired_intervals_and_name_a_clear_winner() -> None:
    n = docs_tables.Numbers(_result(), "images")
    assert n.episodes == 8 and n.has("full", "last_layer") and not n.has("biases")
    cell = n.delta("sparse_tinytrain", "last_layer")
    assert cell.startswith("+0.09") and "[" in cell and "winner: sparse_tinytrain" in cell
    assert n.delta("biases", "last_layer") == "n/a"


def test_a_docs_link_to_a_missing_results_file_is_reported(tmp_path: Path) -> None:
    docs, results = tmp_path / "docs", tmp_path / "bench" / "results"
    (docs / "passes").mkdir(parents=True)
    results.mkdir(parents=True)
    (results / "kept.md").write_text("x")
    (docs / "passes" / "p.md").write_text("From [run](../../bench/results/kept.md) and `bench/results/gone.json`, "
                                          "plot bench/results/gone.png.\n")
    found = docs_tables.dangling_result_links(docs, results)
    assert found == ["docs/passes/p.md: bench/results/gone.json", "docs/passes/p.md: bench/results/gone.png"]


def test_lora_block_quotes_whichever_lora_rows_a_text_run_has_per_corpus() -> None:
    names = ("last_layer", "full_manual_ort", "lora_all_int8")
    records = []
    for e in range(6):
        for i, n in enumerate(names):
            records.append({"row": n, "episode": e, "domain": "trec" if e % 2 else "bbc", "ways": 5,
                            "accuracy": 0.7 + 0.01 * i + 0.002 * (e % 3), "median_step_seconds": (0.1, 1.0, 0.25)[i],
                            "memory": {"peak_rss_bytes": (250, 900, 300)[i] * 2**20}})
    result = {"meta": {"rows": [{"name": n, "order": i} for i, n in enumerate(names)], "title": "t", "domains": ["bbc", "trec"]},
              "records": records}
    text = "\n".join(docs_tables.lora(docs_tables.Numbers(result, "s4")))
    assert "LoRA all layers + int8 − hand-built full fine-tune: +0.010" in text and "per corpus: bbc +0.010" in text
    assert "LoRA last 2" not in text and "PyTorch" not in text
    assert "bbc 3.0x median" in text and "trec 4.0x median" in text and "LoRA all layers + int8 − last layer: +0.020" in text
