"""bench/merge_runs.py: a re-run row paired with an earlier run's rows only when both runs drew the same episodes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import docs_tables  # noqa: E402
from bench.merge_runs import append, merge  # noqa: E402


def _run(rows: tuple[str, ...], episodes: int, shift: float = 0.0, ways: int = 3) -> dict:
    records = [{"row": row, "episode": e, "domain": "d", "ways": ways, "shots": 4, "classes": ["a", "b", "c"],
                "accuracy": 0.5 + 0.01 * e + (shift if row != "head_only" else 0.0)}
               for e in range(episodes) for row in ("head_only", *rows)]
    meta = {"rows": [{"name": r, "order": i} for i, r in enumerate(("head_only", *rows))], "command": "run", "title": "t",
            "domains": ["d"], "started": "now", "loadavg_start": [1.0, 1.0, 1.0]}
    return {"meta": meta, "records": records, "prepare": [{"episode": e} for e in range(episodes)]}


def test_rows_of_a_second_run_join_on_the_episodes_both_finished_and_renamed_rows_keep_their_records() -> None:
    base = _run(("last_layer", "sparse_tinytrain"), episodes=6)
    new = _run(("sparse_tinytrain",), episodes=4, shift=0.1)
    merged = merge(base, new, {"sparse_tinytrain": "sparse_tinytrain_budget"}, {"sparse_tinytrain": "sparse_tinytrain_paper"})
    by_row: dict[str, list[int]] = {}
    for r in merged["records"]:
        by_row.setdefault(r["row"], []).append(r["episode"])
    assert {row: sorted(e) for row, e in by_row.items()} == {
        "head_only": [0, 1, 2, 3], "last_layer": [0, 1, 2, 3], "sparse_tinytrain_paper": [0, 1, 2, 3], "sparse_tinytrain_budget": [0, 1, 2, 3]}
    assert merged["meta"]["episodes_done"] == 4 and [r["name"] for r in merged["meta"]["rows"]][-1] == "sparse_tinytrain_budget"
    numbers = docs_tables.Numbers(merged, "m")
    assert numbers.delta("sparse_tinytrain_budget", "sparse_tinytrain_paper").startswith("+0.100")
    assert not numbers.same_run("sparse_tinytrain_budget", "last_layer") and numbers.same_run("last_layer", "sparse_tinytrain_paper")


def test_runs_that_drew_different_episodes_are_refused() -> None:
    with pytest.raises(SystemExit, match="episode 0 differs"):
        merge(_run(("last_layer",), 3), _run(("sparse_tinytrain",), 3, ways=2), {"sparse_tinytrain": "sparse_tinytrain"}, {})


def _later(rows: tuple[str, ...], first: int, episodes: int) -> dict:
    run = _run(rows, first + episodes)
    run["records"] = [r for r in run["records"] if r["episode"] >= first]
    run["prepare"] = [p for p in run["prepare"] if p["episode"] >= first]
    run["meta"]["command"] = "later"
    return run


def test_append_adds_other_episodes_of_the_same_draw_and_refuses_repeats_and_other_protocols() -> None:
    base = _run(("last_layer", "lora_all"), episodes=3)
    later = _later(("last_layer", "lora_last2"), first=3, episodes=2)
    merged = append(base, later)
    by_row: dict[str, list[int]] = {}
    for r in merged["records"]:
        by_row.setdefault(r["row"], []).append(r["episode"])
    assert by_row == {"head_only": [0, 1, 2, 3, 4], "last_layer": [0, 1, 2, 3, 4], "lora_all": [0, 1, 2], "lora_last2": [3, 4]}
    assert [r["name"] for r in merged["meta"]["rows"]] == ["head_only", "last_layer", "lora_all", "lora_last2"]
    assert merged["meta"]["episodes_done"] == 5 and merged["meta"]["appended"][0]["episodes"] == [3, 4]
    assert docs_tables.Numbers(merged, "m").episodes == 5
    with pytest.raises(SystemExit, match=r"episodes \[2\] are in both"):
        append(base, _later(("last_layer",), first=2, episodes=2))
    other = _later(("last_layer",), first=3, episodes=2)
    other["meta"]["settings"] = {"steps": 12}
    with pytest.raises(SystemExit, match="differ in settings"):
        append(base, other)
    regrid = _later(("last_layer",), first=3, episodes=2)
    regrid["meta"]["rows"][1]["lr_grid"] = [1e-3]
    with pytest.raises(SystemExit, match="other learning-rate grids"):
        append(base, regrid)


def test_rows_paired_from_a_second_run_count_as_measured_together_only_in_the_appended_run() -> None:
    """Time ratios across two runs mix loads: after an append, rows a merge took from a second run are side by side
    with the others only in the appended part."""
    from bench.protocol.report import measured_together

    base = merge(_run(("last_layer",), 3), _run(("lora_last2",), 3, shift=0.1), {"lora_last2": "lora_last2"}, {})
    merged = append(base, _later(("last_layer", "lora_last2"), first=3, episodes=2))
    assert measured_together(merged, "lora_last2", "last_layer") == {3, 4}
    assert measured_together(merged, "head_only", "last_layer") == {0, 1, 2, 3, 4}
    assert not docs_tables.Numbers(merged, "m").same_run("lora_last2", "last_layer")
