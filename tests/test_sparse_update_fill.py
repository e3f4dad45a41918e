"""sparse-update's `loop: fill`: TinyTrain's score order and fixed share, but a layer that does not fit is skipped
and the walk goes on until nothing fits (the paper's loop stops at the first layer that does not fit)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from builders import classification_data
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sparse_update import IMAGE, _details, _recipe, mbconv
from test_sparse_update_budget import BATCH, _cost, _potentials, _setup

import edgeplug
from edgeplug.passes import fill_defaults
from edgeplug_plugins.sparse_update.selection import Selection, _update, select
from edgeplug_plugins.sparse_update.sparse_update_pass import SparseUpdatePass


def _options(budget: int, loop: str) -> dict:
    return fill_defaults({"strategy": "tinytrain", "loop": loop, "memory_budget_bytes": budget, "batch_size": BATCH},
                         SparseUpdatePass.options_schema)


def _values(selection: Selection) -> int:
    return sum(update.weight_values for update in selection.updates.values())


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 50), budget=st.integers(30_000, 400_000))
def test_fill_keeps_the_papers_plan_spends_more_of_the_budget_and_stops_only_when_nothing_fits(seed: int, budget: int) -> None:
    facts, candidates = _setup(seed=seed % 3)
    potentials = _potentials(candidates, seed)
    try:
        paper = select(_options(budget, "paper"), facts, candidates, potentials, "cross-entropy")
    except edgeplug.RecipeError as error:
        assert "does not cover" in str(error) or "no layer fits" in str(error)
        return
    options = _options(budget, "fill")
    fill = select(options, facts, candidates, potentials, "cross-entropy")
    assert fill.cost.memory_bytes <= budget
    # the paper's layers, with the same channels; then more of the budget, on more weights
    assert {p: fill.updates[p] for p in paper.updates} == paper.updates
    assert fill.cost.memory_bytes >= paper.cost.memory_bytes and _values(fill) >= _values(paper)
    # it stops only when nothing fits: every layer left out is over the budget on top of the plan at the fixed share
    for c in candidates:
        if c.position not in fill.updates:
            added = _update(options, facts, c, options["channel_ratio"], potentials, np.random.default_rng(0))
            assert _cost(facts, candidates, {**fill.updates, c.position: added}, options).memory_bytes > budget, c.node


def test_fill_spends_budget_the_papers_stop_leaves() -> None:
    """On a model where the paper's loop stops with budget left, fill trains more layers and more values."""
    gained = 0
    for seed in range(3):
        facts, candidates = _setup(blocks=4, seed=seed)
        for budget in (60_000, 120_000, 240_000):
            potentials = _potentials(candidates, seed)
            paper = select(_options(budget, "paper"), facts, candidates, potentials, "cross-entropy")
            fill = select(_options(budget, "fill"), facts, candidates, potentials, "cross-entropy")
            if len(fill.updates) > len(paper.updates):
                assert fill.cost.memory_bytes > paper.cost.memory_bytes and _values(fill) > _values(paper)
                gained += 1
    assert gained >= 3, gained


def test_fill_end_to_end_reports_its_loop_and_fits_the_budget(tmp_path: Path) -> None:
    model = mbconv(blocks=3, width=8, seed=4)
    data = classification_data((3, IMAGE, IMAGE), 5, n=20, seed=4)
    budget = 80_000
    details = _details(edgeplug.rewrite(model, _recipe(loop="fill", memory_budget_bytes=budget, batch_size=BATCH),
                                        tmp_path / "fill", calibration=data).report)
    paper = _details(edgeplug.rewrite(model, _recipe(memory_budget_bytes=budget, batch_size=BATCH),
                                      tmp_path / "paper", calibration=data).report)
    assert details["criterion"] == "paper" and details["loop"] == "fill" and paper["loop"] == "paper"
    assert details["predicted"]["backward_memory_bytes"] <= budget
    assert details["predicted"]["backward_memory_bytes"] >= paper["predicted"]["backward_memory_bytes"]
    assert details["trainable_values"] >= paper["trainable_values"]
    for layer in details["layers"]:
        if layer["channels"] is not None:
            assert layer["ratio"] == pytest.approx(0.25, abs=1 / layer["channels_total"])
