"""Which layers and channels train: TinyTrain's criterion or a baseline, under budgets.

Every strategy except `last-k` walks the candidate layers in its own order and
adds each one at the largest channel share (`channel_ratio`, halved down to
`min_channel_ratio`) for which the whole plan stays within the budgets; layers
that cannot train in part are tried whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgeplug.plugin_api import RecipeError

from .candidates import Candidate, ModelFacts, weight_array
from .costs import Cost, Update, plan_cost, trained_biases
from .criterion import Potentials


@dataclasses.dataclass(frozen=True)
class Selection:
    updates: dict[int, Update]
    biases: set[int]
    cost: Cost
    scores: dict[int, float]


def layer_scores(candidates: list[Candidate], potentials: Potentials) -> dict[int, float]:
    """TinyTrain's multi-objective score: layer potential / (normalised parameters x normalised MACs).

    Parameters and MACs are normalised by the largest of all candidates; only the
    candidates that were probed (`potentials.output`) get a score.
    """
    params = {c.position: c.weight_values + c.bias_values for c in candidates}
    top_params = max(params.values()) or 1
    top_macs = max(c.macs for c in candidates) or 1
    scores = {}
    for c in candidates:
        if c.position in potentials.output:
            potential = float(potentials.output[c.position].sum())
            scores[c.position] = potential / max((params[c.position] / top_params) * (c.macs / top_macs), 1e-12)
    return scores


def feasible(options: Mapping[str, Any], facts: ModelFacts, candidates: list[Candidate], loss: str) -> list[Candidate]:
    """Candidates that fit the budgets at their smallest channel share (with the classifier when it always trains).

    Only these need the criterion, so the probe graph's backward stops at the earliest of them.
    """
    if options["strategy"] == "last-k":
        return list(candidates)
    memory_budget, macs_budget = options.get("memory_budget_bytes"), options.get("backward_macs_budget")
    base = {candidates[-1].position: Update(candidates[-1])} if options["classifier"] == "full" else {}
    kept = []
    for c in candidates:
        update = Update(c)
        if c.sliceable and c.position not in base:
            axis = "input" if c.kind == "depthwise" or options["axis"] == "input" else "output"
            total = c.slice_channels if axis == "input" else c.channels
            update = Update(c, tuple(range(max(1, round(options["min_channel_ratio"] * total)))), axis)
        plan = {**base, c.position: update}
        cost = plan_cost(facts, candidates, plan, trained_biases(facts, candidates, plan, options["bias"]), options["optimizer"], loss)
        if (memory_budget is None or cost.memory_bytes <= memory_budget) and (macs_budget is None or cost.backward_macs <= macs_budget):
            kept.append(c)
    return kept


def select(options: Mapping[str, Any], facts: ModelFacts, candidates: list[Candidate], potentials: Potentials | None,
           loss: str, pool: list[Candidate] | None = None) -> Selection:
    """Choose the updates; `pool` (default: every candidate) limits which layers are tried."""
    strategy = options["strategy"]
    rng = np.random.default_rng(options["seed"])
    scores = layer_scores(candidates, potentials) if potentials is not None else {}

    def cost_of(updates: dict[int, Update]) -> tuple[Cost, set[int]]:
        biases = trained_biases(facts, candidates, updates, options["bias"])
        return plan_cost(facts, candidates, updates, biases, options["optimizer"], loss), biases

    if strategy == "last-k":
        count = options.get("layers", 1)
        if count > len(candidates):
            raise RecipeError(f"sparse-update: layers={count} but the model has only {len(candidates)} candidate layers")
        tail = {c.position: Update(c) for c in candidates[-count:]}
        cost, biases = cost_of(tail)
        return Selection(tail, biases, cost, scores)

    memory_budget = options.get("memory_budget_bytes")
    macs_budget = options.get("backward_macs_budget")
    if memory_budget is None and macs_budget is None:
        raise RecipeError(f"sparse-update: strategy '{strategy}' needs a budget: set memory_budget_bytes and/or backward_macs_budget")

    def fits(cost: Cost) -> bool:
        return (memory_budget is None or cost.memory_bytes <= memory_budget) and (macs_budget is None or cost.backward_macs <= macs_budget)

    updates: dict[int, Update] = {}
    pool = list(candidates if pool is None else pool)
    if options["classifier"] == "full":
        head = candidates[-1]
        updates[head.position] = Update(head)
        cost, _ = cost_of(updates)
        if not fits(cost):
            raise RecipeError(f"sparse-update: the budget does not cover training the last layer '{head.node}' alone "
                              f"(backward memory {cost.memory_bytes:,} bytes, backward MACs {cost.backward_macs:,})")
        pool = [c for c in pool if c.position != head.position]
    if strategy == "tinytrain":
        pool.sort(key=lambda c: -scores[c.position])
    elif strategy == "static":
        pool.reverse()
    else:
        pool = [pool[i] for i in rng.permutation(len(pool))]
    limit = options.get("layers")
    for candidate in pool:
        if limit is not None and len(updates) >= limit:
            break
        added = _fit_layer(options, facts, candidate, updates, potentials, rng, cost_of, fits)
        if added is None and strategy == "static":
            break  # MCUNetV3 updates a contiguous tail of layers
        if added is not None:
            updates[candidate.position] = added
    if not updates:
        raise RecipeError("sparse-update: no layer fits the budget; raise memory_budget_bytes / backward_macs_budget")
    cost, biases = cost_of(updates)
    return Selection(updates, biases, cost, scores)


def _fit_layer(options: Mapping[str, Any], facts: ModelFacts, candidate: Candidate, updates: dict[int, Update], potentials: Potentials | None,
               rng: np.random.Generator, cost_of: Any, fits: Any) -> Update | None:
    ratios = [1.0]
    if candidate.sliceable:
        ratios, ratio = [], options["channel_ratio"]
        while ratio >= options["min_channel_ratio"] - 1e-12:
            ratios.append(ratio)
            ratio /= 2
    for ratio in ratios:
        update = _update(options, facts, candidate, ratio, potentials, rng)
        cost, _ = cost_of({**updates, candidate.position: update})
        if fits(cost):
            return update
    return None


def _update(options: Mapping[str, Any], facts: ModelFacts, c: Candidate, ratio: float, potentials: Potentials | None,
            rng: np.random.Generator) -> Update:
    if ratio >= 1.0 or not c.sliceable:
        return Update(c)
    axis = "input" if c.kind == "depthwise" or options["axis"] == "input" else "output"
    total = c.slice_channels if axis == "input" else c.channels
    count = max(1, round(ratio * total))
    if count >= total:
        return Update(c)
    ranking = channel_ranking(options, facts, c, axis, potentials, rng)
    return Update(c, tuple(sorted(int(i) for i in ranking[:count])), axis)


def channel_ranking(options: Mapping[str, Any], facts: ModelFacts, c: Candidate, axis: str, potentials: Potentials | None,
                    rng: np.random.Generator) -> np.ndarray:
    """Channel indices, most important first."""
    method = options["channels"]
    if method == "auto":
        method = {"tinytrain": "fisher", "static": "magnitude", "random": "random"}.get(options["strategy"], "magnitude")
    total = c.slice_channels if axis == "input" else c.channels
    if method == "random":
        return rng.permutation(total)
    if method == "fisher":
        if potentials is None:
            raise RecipeError("sparse-update: channels 'fisher' needs the Fisher criterion (calibration data)")
        values = potentials.input[c.position] if (axis == "input" and c.kind == "conv") else potentials.output[c.position]
    else:
        weight = weight_array(facts, c.weight).astype(np.float64)
        moved = np.moveaxis(weight, 1 if (axis == "input" and c.kind == "conv") else 0, 0)
        values = np.sqrt(np.square(moved.reshape(moved.shape[0], -1)).sum(axis=1))
    return np.argsort(-np.asarray(values), kind="stable")

