"""sparse-update's budget criterion: a knapsack-style greedy on Fisher potential per unit of the budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from builders import classification_data
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sparse_update import IMAGE, _details, _recipe, mbconv

import edgeplug
from edgeplug.passes import fill_defaults
from edgeplug.profiling import static_profile
from edgeplug_plugins.sparse_update.candidates import find_candidates, model_facts
from edgeplug_plugins.sparse_update.costs import Update, plan_cost, trained_biases
from edgeplug_plugins.sparse_update.criterion import Potentials
from edgeplug_plugins.sparse_update.selection import select
from edgeplug_plugins.sparse_update.sparse_update_pass import SparseUpdatePass

BATCH = 8


def _setup(blocks: int = 3, width: int = 8, seed: int = 0):  # noqa: ANN202 - test helper
    model = mbconv(blocks=blocks, width=width, seed=seed)
    facts = model_facts(model, "logits", BATCH)
    candidates = find_candidates(facts, frozenset(facts.index.parameters()))
    return facts, candidates


def _potentials(candidates: list, seed: int, zero: frozenset[int] = frozenset()) -> Potentials:
    """Made-up positive Fisher potentials (zero for the positions in `zero`): selection must follow them."""
    rng = np.random.default_rng(seed)
    output = {c.position: (np.zeros(c.channels) if c.position in zero else rng.exponential(1.0, c.channels) * 10.0 ** rng.uniform(-3, 1))
              for c in candidates}
    return Potentials(output, {}, 10, 0.0, 0.0, 0.0, 0, 0)


def _options(budget: int, **extra: object) -> dict:
    return fill_defaults({"strategy": "tinytrain", "criterion": "budget", "memory_budget_bytes": budget,
                          "batch_size": BATCH, **extra}, SparseUpdatePass.options_schema)


def _cost(facts, candidates, updates, options):  # noqa: ANN001, ANN202 - test helper
    biases = trained_biases(facts, candidates, updates, options["bias"])
    return plan_cost(facts, candidates, updates, biases, options["optimizer"], "cross-entropy", options["lean_backward"])


def _grid(c, smallest: float) -> list[int]:  # noqa: ANN001 - test helper
    """Channel counts the loop tries: shares from `smallest` doubling, then whole."""
    shares, share = [], smallest
    while share < 1.0:
        shares.append(share)
        share *= 2
    return sorted({min(c.channels, max(1, round(s * c.channels))) for s in shares} | {c.channels})


def _with(c, count: int) -> Update:  # noqa: ANN001 - test helper
    """`c` training `count` channels (which ones does not change the cost), whole when that is all of them."""
    if not c.sliceable or count >= c.channels:
        return Update(c)
    return Update(c, tuple(range(count)), "input" if c.kind == "depthwise" else "output")


def _next_share(c, update: Update | None, smallest: float) -> Update | None:  # noqa: ANN001 - test helper
    """The smallest update of `c` on the loop's grid with more channels than `update` (None: it is whole)."""
    have = 0 if update is None else (c.channels if update.channels is None else len(update.channels))
    bigger = [n for n in (_grid(c, smallest) if c.sliceable else [c.channels]) if n > have]
    return _with(c, bigger[0]) if bigger else None


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 50), budget=st.integers(30_000, 400_000), scale=st.floats(1e-6, 1e6))
def test_the_budget_criterion_fits_the_budget_stops_only_when_nothing_fits_and_ignores_the_potentials_scale(
        seed: int, budget: int, scale: float) -> None:
    facts, candidates = _setup(seed=seed % 3)
    options = _options(budget, min_channel_ratio=0.125)
    potentials = _potentials(candidates, seed)
    try:
        selection = select(options, facts, candidates, potentials, "cross-entropy")
    except edgeplug.RecipeError as error:
        assert "does not cover" in str(error)
        return
    assert selection.cost.memory_bytes <= budget
    # the loop goes on while anything fits: no layer's next share on the loop's grid fits on top of the plan
    for c in candidates:
        current = selection.updates.get(c.position)
        grown = _next_share(c, current, options["min_channel_ratio"])
        if grown is not None:
            assert _cost(facts, candidates, {**selection.updates, c.position: grown}, options).memory_bytes > budget, c.node
    scaled = Potentials({p: v * scale for p, v in potentials.output.items()}, {}, 10, 0.0, 0.0, 0.0, 0, 0)
    again = select(options, facts, candidates, scaled, "cross-entropy")
    assert again.updates == selection.updates


def test_a_layer_without_potential_never_trains_and_a_generous_budget_trains_the_rest_whole() -> None:
    facts, candidates = _setup()
    options = _options(10**9)
    dead = frozenset({candidates[1].position, candidates[4].position})
    selection = select(options, facts, candidates, _potentials(candidates, 0, zero=dead), "cross-entropy")
    assert set(selection.updates) == {c.position for c in candidates} - dead
    assert all(u.channels is None for u in selection.updates.values())


def test_channels_follow_the_fisher_potential_and_the_first_pick_has_the_most_potential_per_byte() -> None:
    facts, candidates = _setup()
    head = candidates[-1]
    options = _options(60_000, layers=2)  # the classifier and one more layer: the greedy's first pick
    potentials = _potentials(candidates, 3)
    selection = select(options, facts, candidates, potentials, "cross-entropy")
    (picked,) = [p for p in selection.updates if p != head.position]
    base = _cost(facts, candidates, {head.position: Update(head)}, options).memory_bytes
    best_value, best = -1.0, None
    for c in candidates[:-1]:
        order = np.argsort(-potentials.output[c.position], kind="stable")
        for n in _grid(c, options["min_channel_ratio"]) if c.sliceable else [c.channels]:
            total = _cost(facts, candidates, {head.position: Update(head), c.position: _with(c, n)}, options).memory_bytes
            if total > options["memory_budget_bytes"]:
                continue
            added = total - base
            value = float(potentials.output[c.position][order[:n]].sum()) / added
            if value > best_value:
                best_value, best = value, c.position
    # with room to spare the layer then grows share by share; the first pick is the one with the most potential per byte
    assert picked == best
    chosen = selection.updates[picked]
    if chosen.channels is not None:  # channels are the layer's most potential ones
        order = np.argsort(-potentials.output[picked], kind="stable")
        assert sorted(chosen.channels) == sorted(int(i) for i in order[: len(chosen.channels)])


def test_the_budget_criterion_end_to_end_matches_the_profiler_and_reports_its_loop(tmp_path: Path) -> None:
    model = mbconv(blocks=3, width=8, seed=4)
    data = classification_data((3, IMAGE, IMAGE), 5, n=20, seed=4)
    report = edgeplug.rewrite(model, _recipe(criterion="budget", memory_budget_bytes=80_000, batch_size=BATCH),
                              tmp_path / "out", calibration=data).report
    details = _details(report)
    assert details["criterion"] == "budget" and details["loop"] == "knapsack" and details["probe"]["input_probes"] is False
    counted = static_profile(tmp_path / "out", batch_size=BATCH)
    memory = counted.retained_activation_bytes + counted.gradient_bytes + counted.optimizer_state_bytes
    assert details["predicted"]["backward_memory_bytes"] == memory <= 80_000
    assert len(details["layers"]) >= 2


def test_the_budget_criterion_refuses_a_loop_of_the_paper(tmp_path: Path) -> None:
    data = classification_data((3, IMAGE, IMAGE), 5, n=20, seed=4)
    with pytest.raises(edgeplug.RecipeError, match="criterion 'budget'"):
        edgeplug.rewrite(mbconv(), _recipe(criterion="budget", loop="paper", memory_budget_bytes=80_000, batch_size=BATCH),
                         tmp_path / "out", calibration=data)
