"""Which layers and channels train: TinyTrain's criterion or a baseline, under budgets.

Every strategy except `last-k` walks the candidate layers in its own order. Two
loops add them:

- `paper` (TinyTrain's Algorithm 1, the default of `tinytrain`): layers in
  descending score, each with its top `channel_ratio` channels, until the next
  one no longer fits the budgets.
- `fill`: the paper's fixed share and order, but a layer that does not fit is
  skipped and the walk goes on to the next by score, again over the skipped ones,
  until a walk adds nothing: the budget the paper's stop leaves is spent.
- `greedy` (the default of `random`): each layer at the largest channel share
  (`channel_ratio`, halved down to `min_channel_ratio`) that still fits; a layer
  that fits at no share is skipped and the walk goes on.

`static` (MCUNetV3's schemes) is the greedy loop over a contiguous tail: it
stops at the first layer that does not fit. Layers that cannot train in part are
tried whole.

`tinytrain` with `criterion: budget` replaces the paper's score and loop by a
knapsack-style greedy on the resource the budget is in: at each step it takes the
update (a new layer at a channel share, or the next doubling of a chosen layer's
share, channels by Fisher potential) with the most Fisher potential gained per
unit of budget it adds to the whole plan (backward memory, and backward MACs when
that budget is set: the larger fraction), and goes on while anything fits.
Marginal costs see what the plan already keeps: a layer whose input a deeper
chosen layer's backward retains anyway costs only its gradient and optimizer state.
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
    scores: dict[int, float]  # paper: the layer score; budget: Fisher potential per budget fraction when last grown


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


def channel_axis(options: Mapping[str, Any], candidate: Candidate) -> str:
    """The axis along which `candidate` trains a channel subset: 'input' (a depthwise conv's channels, or a
    group-1 conv's input channels: MCUNetV3) or 'output' (TinyTrain: output channels by their Fisher potential)."""
    if candidate.kind == "depthwise":
        return "input"
    axis = options["axis"]
    if axis == "auto":
        axis = "input" if options["strategy"] == "static" else "output"
    return str(axis)


def criterion(options: Mapping[str, Any]) -> str:
    """How tinytrain ranks and adds layers: 'paper' (score P/(params x MACs), Algorithm 1's loop) or 'budget'
    (Fisher potential per unit of budget, knapsack greedy); 'none' for the other strategies."""
    if options["strategy"] != "tinytrain":
        return "none"
    chosen = str(options.get("criterion", "auto"))
    if chosen == "auto":
        chosen = DEFAULT_CRITERION
    if chosen == "budget" and options["loop"] != "auto":
        raise RecipeError(f"sparse-update: loop '{options['loop']}' applies to criterion 'paper'; "
                          "criterion 'budget' adds layers by its own knapsack loop (leave loop at auto)")
    return chosen


DEFAULT_CRITERION = "paper"  # the paper's; "budget" measured worse on the image benchmark (docs/passes/sparse-update.md)


def layer_loop(options: Mapping[str, Any]) -> str:
    """How layers are added: 'paper' (fixed share, stop at the first layer that does not fit), 'fill' (fixed
    share, skip what does not fit, until nothing fits), 'greedy' (halving shares, skip), 'contiguous' (static's
    tail), 'knapsack' (criterion budget) or 'whole' (last-k)."""
    strategy = options["strategy"]
    if strategy == "last-k":
        return "whole"
    if strategy == "static":
        return "contiguous"
    if criterion(options) == "budget":
        return "knapsack"
    if options["loop"] != "auto":
        return str(options["loop"])
    return "paper" if strategy == "tinytrain" else "greedy"


def fixed_share(options: Mapping[str, Any]) -> bool:
    """Whether every sliceable layer trains exactly `channel_ratio` of its channels (TinyTrain's loops)."""
    return layer_loop(options) in ("paper", "fill")


def needs_input_potentials(options: Mapping[str, Any], candidates: list[Candidate]) -> bool:
    """Whether a group-1 conv may train input channels ranked by their Fisher potential."""
    ranks_by_fisher = options["channels"] == "fisher" or (options["channels"] == "auto" and options["strategy"] == "tinytrain")
    return ranks_by_fisher and any(c.probes_input and channel_axis(options, c) == "input" for c in candidates)


@dataclasses.dataclass(frozen=True)
class Feasibility:
    """Which candidates fit the budgets alone (and are probed), and the cheapest cost of each that does not."""

    kept: list[Candidate]
    rejected: dict[int, Cost]  # candidate position -> its cheapest update's cost (with the classifier)

    def summary(self, candidates: list[Candidate], budgets: Mapping[str, int | None]) -> dict[str, Any]:
        over_memory = [p for p, cost in self.rejected.items()
                       if budgets["memory_bytes"] is not None and cost.memory_bytes > budgets["memory_bytes"]]
        over_macs = [p for p, cost in self.rejected.items()
                     if budgets["backward_macs"] is not None and cost.backward_macs > budgets["backward_macs"]]
        closest = min(self.rejected, key=lambda p: self.rejected[p].memory_bytes, default=None)
        return {
            "probed": len(self.kept),
            "not_probed": len(self.rejected),
            "over_memory_budget": len(over_memory),
            "over_macs_budget": len(over_macs),
            "earliest_probed": self.kept[0].node if self.kept else None,
            "cheapest_not_probed": None if closest is None else {
                "node": candidates[closest].node, **self.rejected[closest].to_dict()},
            "reason": "a layer is probed when its cheapest update (its smallest channel share, with the classifier) "
                      "fits the budgets alone; backward from a layer keeps what every later layer's gradient reads",
        }


def feasible(options: Mapping[str, Any], facts: ModelFacts, candidates: list[Candidate], loss: str) -> Feasibility:
    """Candidates that fit the budgets at their smallest channel share (with the classifier when it always trains).

    Only these need the criterion, so the probe graph's backward stops at the earliest of them.
    """
    if options["strategy"] == "last-k":
        return Feasibility(list(candidates), {})
    memory_budget, macs_budget = options.get("memory_budget_bytes"), options.get("backward_macs_budget")
    base = {candidates[-1].position: Update(candidates[-1])} if options["classifier"] == "full" else {}
    kept, rejected = [], {}
    for c in candidates:
        update = Update(c)
        if c.sliceable and c.position not in base:
            axis = channel_axis(options, c)
            total = c.slice_channels if axis == "input" else c.channels
            smallest = options["channel_ratio"] if fixed_share(options) else options["min_channel_ratio"]
            update = Update(c, tuple(range(max(1, round(smallest * total)))), axis)
        plan = {**base, c.position: update}
        cost = plan_cost(facts, candidates, plan, trained_biases(facts, candidates, plan, options["bias"]), options["optimizer"], loss, options["lean_backward"])
        if (memory_budget is None or cost.memory_bytes <= memory_budget) and (macs_budget is None or cost.backward_macs <= macs_budget):
            kept.append(c)
        else:
            rejected[c.position] = cost
    return Feasibility(kept, rejected)


def select(options: Mapping[str, Any], facts: ModelFacts, candidates: list[Candidate], potentials: Potentials | None,
           loss: str, pool: list[Candidate] | None = None) -> Selection:
    """Choose the updates; `pool` (default: every candidate) limits which layers are tried."""
    strategy = options["strategy"]
    rng = np.random.default_rng(options["seed"])
    scores = layer_scores(candidates, potentials) if potentials is not None else {}

    def cost_of(updates: dict[int, Update]) -> tuple[Cost, set[int]]:
        biases = trained_biases(facts, candidates, updates, options["bias"])
        return plan_cost(facts, candidates, updates, biases, options["optimizer"], loss, options["lean_backward"]), biases

    memory_budget = options.get("memory_budget_bytes")
    macs_budget = options.get("backward_macs_budget")

    def fits(cost: Cost) -> bool:
        return (memory_budget is None or cost.memory_bytes <= memory_budget) and (macs_budget is None or cost.backward_macs <= macs_budget)

    if strategy == "last-k":
        return _last_k(options, candidates, cost_of, fits, scores, budgeted=memory_budget is not None or macs_budget is not None)

    if memory_budget is None and macs_budget is None:
        raise RecipeError(f"sparse-update: strategy '{strategy}' needs a budget: set memory_budget_bytes and/or backward_macs_budget")

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
    if criterion(options) == "budget":
        assert potentials is not None
        budget_scores = _knapsack(options, facts, candidates, pool, updates, potentials, cost_of, fits)
        if not updates:
            raise RecipeError("sparse-update: no layer fits the budget; raise memory_budget_bytes / backward_macs_budget")
        cost, biases = cost_of(updates)
        return Selection(updates, biases, cost, budget_scores)
    if strategy == "tinytrain":
        pool.sort(key=lambda c: -scores[c.position])
    elif strategy == "static":
        pool.reverse()
    else:
        pool = [pool[i] for i in rng.permutation(len(pool))]
    limit = options.get("layers")
    loop = layer_loop(options)
    walking = True
    while walking:
        walking = False
        for candidate in pool:
            if limit is not None and len(updates) >= limit:
                break
            if candidate.position in updates:
                continue
            added = _fit_layer(options, facts, candidate, updates, potentials, rng, cost_of, fits, fixed_share(options))
            if added is None and loop in ("paper", "contiguous"):
                break  # the budget is spent (Algorithm 1); MCUNetV3 updates a contiguous tail of layers
            if added is not None:
                updates[candidate.position] = added
                walking = loop == "fill"  # walk the skipped layers again until a walk adds nothing
    if not updates:
        raise RecipeError("sparse-update: no layer fits the budget; raise memory_budget_bytes / backward_macs_budget")
    cost, biases = cost_of(updates)
    return Selection(updates, biases, cost, scores)


def _knapsack(options: Mapping[str, Any], facts: ModelFacts, candidates: list[Candidate], pool: list[Candidate],
              updates: dict[int, Update], potentials: Potentials, cost_of: Any, fits: Any) -> dict[int, float]:
    """Grow `updates` in place by the most Fisher potential per unit of budget until nothing more fits.

    A layer not yet chosen is tried at every share from min_channel_ratio doubling up to whole (the first
    share pays the layer's retained activations; a larger one may be worth more per byte); a chosen layer is
    tried at the next doubling of its share (its channels rank by potential, so later channels gain less and
    each costs the same). Returns, per chosen layer, its potential per budget fraction when it last grew.
    """
    memory_budget, macs_budget = options.get("memory_budget_bytes"), options.get("backward_macs_budget")

    def used(cost: Cost) -> float:
        return max(cost.memory_bytes / memory_budget if memory_budget else 0.0,
                   cost.backward_macs / macs_budget if macs_budget else 0.0)

    shares = []
    share = options["min_channel_ratio"]
    while share < 1.0 - 1e-12:
        shares.append(share)
        share *= 2
    shares.append(1.0)
    rng = np.random.default_rng(options["seed"])
    # position -> (axis, channels most potential first, their potentials); whole layers: one "channel"
    ranked: dict[int, tuple[str | None, np.ndarray, np.ndarray]] = {}
    for c in pool:
        if c.sliceable:
            axis = channel_axis(options, c)
            values = potentials.input[c.position] if (axis == "input" and c.probes_input) else potentials.output[c.position]
            order = channel_ranking({**options, "channels": "fisher"}, facts, c, axis, potentials, rng)
            ranked[c.position] = (axis, order, np.asarray(values, dtype=np.float64)[order])
        else:
            ranked[c.position] = (None, np.zeros(1, dtype=np.int64), np.array([float(np.sum(potentials.output[c.position]))]))
    taken: dict[int, int] = {}  # position -> channels taken (in ranking order)
    scores: dict[int, float] = {}
    limit = options.get("layers")
    current = used(cost_of(updates)[0])
    while True:
        best: tuple[float, int, int, Update, float] | None = None
        for c in pool:
            layer_axis, order, values = ranked[c.position]
            have = taken.get(c.position, 0)
            if have == 0 and limit is not None and len(updates) >= limit:
                continue
            total = len(values)
            counts = sorted({min(total, max(1, round(s * total))) for s in shares} if layer_axis is not None else {1})
            counts = [n for n in counts if n > have]
            if have and counts:
                counts = counts[:1]  # a chosen layer grows by its next share
            for count in counts:
                gain = float(values[have:count].sum())
                if gain <= 0.0:
                    continue
                if layer_axis is None or count >= total:
                    update = Update(c)
                else:
                    update = Update(c, tuple(sorted(int(i) for i in order[:count])), layer_axis)
                cost, _ = cost_of({**updates, c.position: update})
                if not fits(cost):
                    continue
                value = gain / max(used(cost) - current, 1e-12)
                if best is None or value > best[0]:
                    best = (value, c.position, count, update, used(cost))
        if best is None:
            return scores
        value, position, count, update, current = best
        updates[position] = update
        taken[position] = count
        scores[position] = value


def _last_k(options: Mapping[str, Any], candidates: list[Candidate], cost_of: Any, fits: Any, scores: dict[int, float],
            budgeted: bool) -> Selection:
    """The last `layers` candidates whole; without `layers` but with a budget, the most last layers that fit it."""
    count = options.get("layers")
    if count is not None and count > len(candidates):
        raise RecipeError(f"sparse-update: layers={count} but the model has only {len(candidates)} candidate layers")
    if count is None and budgeted:
        count = 0
        while count < len(candidates) and fits(cost_of({c.position: Update(c) for c in candidates[-(count + 1):]})[0]):
            count += 1
        if count == 0:
            head, (cost, _) = candidates[-1], cost_of({candidates[-1].position: Update(candidates[-1])})
            raise RecipeError(f"sparse-update: the budget does not cover training the last layer '{head.node}' alone "
                              f"(backward memory {cost.memory_bytes:,} bytes, backward MACs {cost.backward_macs:,})")
    tail = {c.position: Update(c) for c in candidates[-(count or 1):]}
    cost, biases = cost_of(tail)
    return Selection(tail, biases, cost, scores)


def _fit_layer(options: Mapping[str, Any], facts: ModelFacts, candidate: Candidate, updates: dict[int, Update], potentials: Potentials | None,
               rng: np.random.Generator, cost_of: Any, fits: Any, fixed: bool) -> Update | None:
    ratios = [1.0]
    if candidate.sliceable:
        ratios, ratio = [], options["channel_ratio"]
        while ratio >= options["min_channel_ratio"] - 1e-12 and not (fixed and ratios):
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
    axis = channel_axis(options, c)
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
        values = potentials.input[c.position] if (axis == "input" and c.probes_input) else potentials.output[c.position]
    else:
        weight = weight_array(facts, c.weight).astype(np.float64)
        moved = np.moveaxis(weight, c.weight_axis(axis), 0)
        values = np.sqrt(np.square(moved.reshape(moved.shape[0], -1)).sum(axis=1))
    return np.argsort(-np.asarray(values), kind="stable")

