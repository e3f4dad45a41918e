"""What the sparse-update strategies choose, episode by episode, and how much their plans overlap.

If TinyTrain, random and static train nearly the same weights at a budget, no accuracy difference between
them can show there: this measures it. Per episode of the image family (the same episodes as `bench/run.py
images` with the same seed and settings) it runs only the selection, in this process: the core's normalize,
`new-head` (prototypes of the training shots) and `sparse-update` at each strategy and budget, the forward
rewrites alone (no artifacts), and records each plan: the weight-trained layers with their channels, the
bias-only layers, the predicted backward memory.

Overlap of two plans, counted on trained weight *values*: a layer trains the block of its weight indexed by its
channels on its weight axis (output channels for tinytrain/random, input channels for static's group-1 convs,
everything for a whole layer), so the values two plans share in a layer are |A0 ∩ B0| x |A1 ∩ B1| x the kernel
(axis 0 and 1 of the weight). Reported: the layer Jaccard (weight-trained layers), the value Jaccard
(shared values / values either trains), the share of each plan's values the other trains too, and depth (the
earliest weight-trained candidate, numbered in graph order out of all candidates).

    python bench/sparse_plans.py --episodes 30 --limit 39 --budgets-kib 28672,57344,114688 --name sparse-plans
    python bench/sparse_plans.py --report-only bench/results/sparse-plans.json
    python bench/sparse_plans.py --limit 39 --strategies tinytrain,tinytrain_fill,random,random_drawn,static \
        --reuse bench/results/sparse-plans.json --name sparse-plans-fill   # the earlier plans taken, the rest computed
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STRATEGIES = ("tinytrain", "random", "static")
VARIANTS: dict[str, dict[str, Any]] = {  # plan name -> sparse-update options besides the budget and batch (bench/recipes rows)
    "tinytrain": {"strategy": "tinytrain"},
    "tinytrain_fill": {"strategy": "tinytrain", "loop": "fill"},
    "tinytrain_input": {"strategy": "tinytrain", "axis": "input"},  # MCUNetV3's axis: keeps only the chosen input channels
    "random": {"strategy": "random"},
    "random_drawn": {"strategy": "random", "seed": "$episode"},
    "static": {"strategy": "static"},
}
GROUPS = (("16", 16, 16), ("6-15", 6, 15), ("2-5", 1, 5))  # training batch min(16, training shots)


def layer_block(layer: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[set[int], set[int], int]:
    """The trained part of a layer's weight: (indices on axis 0, indices on axis 1, values per (i, j) pair)."""
    axis0, axis1 = set(range(shape[0])), set(range(shape[1] if len(shape) > 1 else 1))
    rest = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    channels = layer.get("channels")
    if channels is not None:
        if layer["weight_axis"] == 0:
            axis0 = set(channels)
        else:
            axis1 = set(channels)
    return axis0, axis1, rest


def plan_values(plan: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[set[int], set[int], int]]:
    return {layer["weight"]: layer_block(layer, shapes[layer["weight"]]) for layer in plan["layers"]}


def _count(block: tuple[set[int], set[int], int]) -> int:
    return len(block[0]) * len(block[1]) * block[2]


def _shared(va: Mapping[str, Any], vb: Mapping[str, Any]) -> int:
    """Weight values trained in both plans (`plan_values` of each)."""
    return sum(len(va[w][0] & vb[w][0]) * len(va[w][1] & vb[w][1]) * va[w][2] for w in va.keys() & vb.keys())


def overlap(a: Mapping[str, Any], b: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, float]:
    """Overlap of two plans in trained layers and trained weight values (see the module docstring)."""
    va, vb = plan_values(a, shapes), plan_values(b, shapes)
    shared = _shared(va, vb)
    total_a, total_b = sum(map(_count, va.values())), sum(map(_count, vb.values()))
    union = total_a + total_b - shared
    layers_a, layers_b = set(va), set(vb)
    biases_a = set(a["bias_only"]) | {layer["node"] for layer in a["layers"]}
    biases_b = set(b["bias_only"]) | {layer["node"] for layer in b["layers"]}
    return {"layer_jaccard": len(layers_a & layers_b) / max(1, len(layers_a | layers_b)),
            "value_jaccard": shared / max(1, union), "share_a": shared / max(1, total_a), "share_b": shared / max(1, total_b),
            "shared_values": shared, "values_a": total_a, "values_b": total_b,
            "backbone_layer_jaccard": _jaccard(layers_a - {a["classifier"]}, layers_b - {b["classifier"]}),
            "backbone_value_jaccard": _backbone_jaccard(va, vb, a["classifier"]),
            "touched_jaccard": _jaccard(biases_a, biases_b)}


def _jaccard(a: set[Any], b: set[Any]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def _backbone_jaccard(va: Mapping[str, Any], vb: Mapping[str, Any], classifier: str) -> float:
    """Value Jaccard without the classifier (which every plan trains whole)."""
    va = {k: v for k, v in va.items() if k != classifier}
    vb = {k: v for k, v in vb.items() if k != classifier}
    shared = _shared(va, vb)
    union = sum(map(_count, va.values())) + sum(map(_count, vb.values())) - shared
    return shared / union if union else 1.0


def summarize_plan(details: Mapping[str, Any], positions: Mapping[str, int], classifier: str) -> dict[str, Any]:
    """What a results file keeps of a sparse-update report: enough to recount overlaps."""
    layers = [{key: layer[key] for key in ("node", "weight", "kind", "axis", "weight_axis", "ratio", "channels_total", "channels")}
              for layer in details["layers"]]
    backbone = [positions[layer["node"]] for layer in layers if layer["weight"] != classifier]
    return {"layers": layers, "bias_only": list(details["bias_only"]), "classifier": classifier,
            "feasible": details["feasible"], "candidates": details["candidates"],
            "trainable_values": details["trainable_values"],
            "predicted_backward_bytes": details["predicted"]["backward_memory_bytes"],
            "retained_activation_bytes": details["predicted"]["retained_activation_bytes"],
            "earliest": min(backbone) if backbone else None, "backbone_layers": len(backbone)}


def select_plans(model_path: Path, train: Path, classes: int, batch: int, budgets: Iterable[int],
                 strategies: Iterable[str], episode: int = 0,
                 reuse: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """Every (strategy, budget) plan of one episode, from the forward rewrites alone; and the weights' shapes.

    `strategies` are names of VARIANTS; a plan found in `reuse` (the same episode's plans of an earlier result) is
    taken from it instead of recomputed."""
    import onnx

    from edgeplug.graph import GraphIndex
    from edgeplug.modelio import load_model
    from edgeplug.passes import ForwardState, PassContext, fill_defaults
    from edgeplug.plugins import default_host
    from edgeplug_plugins.sparse_update.candidates import find_candidates, model_facts

    host = default_host()

    def instance(name: str, options: dict[str, Any]) -> Any:
        factory = host.get_pass(name).factory
        return factory(fill_defaults(options, factory.options_schema))

    with np.load(train) as archive:
        calibration = {"x": archive["x"], "y": archive["y"].astype(np.int64)}
    model = load_model(model_path)
    output = model.graph.output[0].name
    context = PassContext(work_dir=Path("/nonexistent"), output_name=output, loss="cross-entropy", calibration=calibration)
    state = ForwardState(model, frozenset(GraphIndex(model).parameters()))
    for name, options in (("normalize", {}), ("new-head", {"classes": classes, "init": "prototypes"})):
        state = instance(name, options).rewrite_forward(state, context)
    shapes = {init.name: tuple(init.dims) for init in state.model.graph.initializer}
    candidates = find_candidates(model_facts(state.model, output, batch, {}), state.trainable)
    positions = {c.node: c.position for c in candidates}
    classifier = candidates[-1].weight
    plans: dict[str, Any] = {}
    for budget, strategy in itertools.product(budgets, strategies):
        if reuse is not None and f"{strategy}@{budget}" in reuse:
            plans[f"{strategy}@{budget}"] = {**reuse[f"{strategy}@{budget}"], "reused": True}
            continue
        started = time.perf_counter()
        options = {key: episode if value == "$episode" else value for key, value in VARIANTS[strategy].items()}
        sparse = instance("sparse-update", {**options, "memory_budget_bytes": budget, "batch_size": batch})
        sparse.rewrite_forward(ForwardState(onnx.ModelProto.FromString(state.model.SerializeToString()), state.trainable), context)
        plans[f"{strategy}@{budget}"] = {**summarize_plan(sparse.report().details, positions, classifier),
                                         "seconds": time.perf_counter() - started}
    return plans, shapes


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.images import family as images
    from bench.protocol.driver import Settings
    from bench.protocol.episodes import EpisodeConfig
    from bench.run import FULL
    from bench.run import parser as run_parser

    run_args = run_parser().parse_args(["images", "--domains", args.domains, "--episodes", str(args.episodes), "--no-torch",
                                        "--seed", str(args.seed)])
    settings = Settings(steps=FULL["steps"], batch_size=args.batch_size, seed=args.seed)
    config = EpisodeConfig(ways=(2, 5), shots=(2, 8), query=FULL["query"], validation=0.25)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    family = images.build(run_args, work, settings, config, args.episodes)
    budgets = [int(v) * 1024 for v in args.budgets_kib.split(",")]
    strategies = args.strategies.split(",")
    unknown = sorted(set(strategies) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; known: {sorted(VARIANTS)}")
    earlier = {} if args.reuse is None else {e["episode"]: e for e in _packed(json.loads(args.reuse.read_text()), pack=False)["episodes"]}
    result: dict[str, Any] = {"meta": {"command": "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
                                       "budgets_bytes": budgets, "strategies": strategies, "domains": args.domains,
                                       "seed": args.seed, "loadavg_start": os.getloadavg(),
                                       "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
                              "episodes": []}
    started = time.perf_counter()
    for episode in family.episodes[: args.limit]:
        folder = work / f"episode-{episode.index:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = family.write_episode(episode, folder)
        batch = min(args.batch_size, len(episode.train))
        before = earlier.get(episode.index)
        if before is not None and (before["domain"], before["ways"], before["shots"], before["batch_size"]) != (
                episode.domain, episode.ways, episode.shots, batch):
            raise SystemExit(f"--reuse {args.reuse}: episode {episode.index} is another episode there")
        plans, shapes = select_plans(family.model, paths["train"], episode.ways, batch, budgets, strategies, episode.index,
                                     None if before is None else before["plans"])
        result["episodes"].append({"episode": episode.index, "domain": episode.domain, "ways": episode.ways, "shots": episode.shots,
                                   "train_size": len(episode.train), "batch_size": batch, "plans": plans})
        trained_shapes = result.setdefault("shapes", {})
        for plan in plans.values():  # every weight any plan trains, for the overlap counts
            for layer in plan["layers"]:
                trained_shapes.setdefault(layer["weight"], list(shapes[layer["weight"]]))
        print(f"episode {episode.index} {episode.domain} batch {batch}: "
              + "; ".join(f"{k} {len(p['layers'])} layers from #{p['earliest']}" for k, p in plans.items()), flush=True)
        result["meta"].update(wall_seconds=round(time.perf_counter() - started, 1), loadavg_now=os.getloadavg())
    return result


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def report(result: Mapping[str, Any]) -> str:
    shapes = {k: tuple(v) for k, v in result["shapes"].items()}
    meta = result["meta"]
    episodes = result["episodes"]
    lines = ["# What the sparse-update strategies choose, and how much their plans overlap", "",
             f"Command: `{meta['command']}`  ",
             f"{len(episodes)} episodes of the image family ({meta['domains']}, seed {meta['seed']}: the episodes of "
             "`bench/results/images.md`), EfficientNet-Lite0 at 128 px, new-head (prototypes) then sparse-update at each budget "
             "and batch min(16, training shots), selection only (the pass's forward rewrite, no training). "
             f"Load {meta['loadavg_start'][0]:.1f} at start; wall {meta.get('wall_seconds', 0):.0f} s.", "",
             "## Per strategy (means over episodes; median trained values)", "",
             "| budget | strategy | feasible layers | weight-trained layers (backbone) | earliest trained (of 50) | bias-only | "
             "trained values (median) | retained activations MiB | budget spent (predicted backward memory / budget) | "
             "same plan as episode 0 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for budget in meta["budgets_bytes"]:
        for strategy in meta["strategies"]:
            plans = [e["plans"][f"{strategy}@{budget}"] for e in episodes]
            first = _signature(plans[0])
            same = sum(_signature(p) == first for p in plans)
            lines.append(
                f"| {budget / 2**20:.0f} MiB | {strategy} | {_mean([p['feasible'] for p in plans]):.1f} | "
                f"{_mean([len(p['layers']) for p in plans]):.1f} ({_mean([p['backbone_layers'] for p in plans]):.1f}) | "
                f"{_mean([p['earliest'] for p in plans if p['earliest'] is not None]):.1f} | "
                f"{_mean([len(p['bias_only']) for p in plans]):.1f} | {statistics.median(p['trainable_values'] for p in plans):,.0f} | "
                f"{_mean([p['retained_activation_bytes'] / 2**20 for p in plans]):.1f} | "
                f"{_mean([p['predicted_backward_bytes'] / budget for p in plans]):.3f} | {same} of {len(plans)} |")
    lines += ["", "## Overlap between strategies, same episode (means over episodes)", "",
              "| budget | pair A − B | layer Jaccard | backbone layer Jaccard | value Jaccard | backbone value Jaccard | "
              "share of A's values B trains | share of B's values A trains | touched layers Jaccard (weights or biases) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for budget in meta["budgets_bytes"]:
        for a, b in itertools.combinations(meta["strategies"], 2):
            stats = [overlap(e["plans"][f"{a}@{budget}"], e["plans"][f"{b}@{budget}"], shapes) for e in episodes]
            lines.append(f"| {budget / 2**20:.0f} MiB | {a} − {b} | " + " | ".join(
                f"{_mean([s[k] for s in stats]):.2f}" for k in ("layer_jaccard", "backbone_layer_jaccard", "value_jaccard",
                                                               "backbone_value_jaccard", "share_a", "share_b", "touched_jaccard")) + " |")
    by_batch = set(STRATEGIES) <= set(meta["strategies"])  # the table compares tinytrain, random and static
    lines += ["", "## By training batch (the budget counts bytes at batch min(16, training shots): a small batch goes deeper)", "",
              "| budget | batch | episodes | earliest trained: tinytrain / random / static | backbone value Jaccard tinytrain − random | "
              "tinytrain − static | touched Jaccard tinytrain − random | identical plans tinytrain = random |",
              "|---|---|---|---|---|---|---|---|"] if by_batch else []
    for budget in meta["budgets_bytes"] if by_batch else []:
        for label, low, high in GROUPS:
            group = [e for e in episodes if low <= e["batch_size"] <= high]
            if not group:
                continue
            plans = {s: [e["plans"][f"{s}@{budget}"] for e in group] for s in meta["strategies"]}
            tr = [overlap(a, b, shapes) for a, b in zip(plans["tinytrain"], plans["random"])]
            ts = [overlap(a, b, shapes) for a, b in zip(plans["tinytrain"], plans["static"])]
            same = sum(_signature(a) == _signature(b) for a, b in zip(plans["tinytrain"], plans["random"]))
            earliest = " / ".join(f"{_mean([p['earliest'] for p in plans[s] if p['earliest'] is not None]):.1f}" for s in STRATEGIES)
            lines.append(f"| {budget / 2**20:.0f} MiB | {label} | {len(group)} | {earliest} | "
                         f"{_mean([s['backbone_value_jaccard'] for s in tr]):.2f} | {_mean([s['backbone_value_jaccard'] for s in ts]):.2f} | "
                         f"{_mean([s['touched_jaccard'] for s in tr]):.2f} | {same} |")
    if {"tinytrain", "tinytrain_fill"} <= set(meta["strategies"]):
        lines += ["", "## The fill loop keeps the paper's plan and adds to it", "",
                  "| budget | episodes whose tinytrain_fill plan holds tinytrain's layers and channels | layers added (mean) | "
                  "trained values added (median) | budget spent: tinytrain / tinytrain_fill (mean) |", "|---|---|---|---|---|"]
        for budget in meta["budgets_bytes"]:
            pairs = [(e["plans"][f"tinytrain@{budget}"], e["plans"][f"tinytrain_fill@{budget}"]) for e in episodes]
            kept = sum(_contains(fill, paper) for paper, fill in pairs)
            lines.append(f"| {budget / 2**20:.0f} MiB | {kept} of {len(pairs)} | "
                         f"{_mean([len(fill['layers']) - len(paper['layers']) for paper, fill in pairs]):.1f} | "
                         f"{statistics.median(fill['trainable_values'] - paper['trainable_values'] for paper, fill in pairs):,.0f} | "
                         f"{_mean([paper['predicted_backward_bytes'] / budget for paper, _ in pairs]):.3f} / "
                         f"{_mean([fill['predicted_backward_bytes'] / budget for _, fill in pairs]):.3f} |")
    lines += ["", "## Task adaptivity: the same strategy across episodes (mean over pairs of episodes)", "",
              "| budget | strategy | layer Jaccard | backbone value Jaccard |", "|---|---|---|---|"]
    for budget in meta["budgets_bytes"]:
        for strategy in meta["strategies"]:
            plans = [e["plans"][f"{strategy}@{budget}"] for e in episodes]
            stats = [overlap(p, q, shapes) for p, q in itertools.combinations(plans, 2)]
            lines.append(f"| {budget / 2**20:.0f} MiB | {strategy} | {_mean([s['layer_jaccard'] for s in stats]):.2f} | "
                         f"{_mean([s['backbone_value_jaccard'] for s in stats]):.2f} |")
    lines += ["", "## Layers each strategy trains (weights), episodes out of " + str(len(episodes)), ""]
    for budget in meta["budgets_bytes"]:
        counts: dict[str, dict[str, int]] = {}
        for e in episodes:
            for strategy in meta["strategies"]:
                for layer in e["plans"][f"{strategy}@{budget}"]["layers"]:
                    counts.setdefault(layer["node"], {}).setdefault(strategy, 0)
                    counts[layer["node"]][strategy] += 1
        lines += [f"Budget {budget / 2**20:.0f} MiB:", "", "| layer | " + " | ".join(meta["strategies"]) + " |",
                  "|---|" + "---|" * len(meta["strategies"])]
        for node in sorted(counts, key=lambda n: (-sum(counts[n].values()), n)):
            lines.append(f"| `{node}` | " + " | ".join(str(counts[node].get(s, 0)) for s in meta["strategies"]) + " |")
        lines.append("")
    lines += ["Value Jaccard = trained weight values both plans train / values either trains (a layer trains the block of its "
              "weight its channels index: output channels for tinytrain and random, input channels for static's group-1 "
              "convs); backbone = without the classifier, which every plan trains whole. Touched = layers whose weight or "
              "bias trains. Same plan = identical layers and channels."]
    return "\n".join(lines) + "\n"


def _packed(result: dict[str, Any], pack: bool) -> dict[str, Any]:
    """Channel lists as hex bit masks (bit i = channel i) in the file, lists in memory: 5x smaller files."""
    for episode in result["episodes"]:
        for plan in episode["plans"].values():
            for layer in plan["layers"]:
                if pack and layer.get("channels") is not None:
                    layer["channels"] = format(sum(1 << c for c in layer["channels"]), "x")
                elif not pack and isinstance(layer.get("channels"), str):
                    bits = int(layer["channels"], 16)
                    layer["channels"] = [i for i in range(bits.bit_length()) if bits >> i & 1]
    return result


def _contains(plan: Mapping[str, Any], part: Mapping[str, Any]) -> bool:
    """Whether `plan` trains every layer of `part` with the same channels."""
    layers = {layer["weight"]: layer["channels"] for layer in plan["layers"]}
    return all(layers.get(layer["weight"], "absent") == layer["channels"] for layer in part["layers"])


def _signature(plan: Mapping[str, Any]) -> str:
    return json.dumps([(layer["weight"], layer["channels"]) for layer in plan["layers"]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=30, help="episodes per domain of the family (as bench/run.py; fixes the episodes)")
    p.add_argument("--limit", type=int, default=39, help="plans of the first N episodes")
    p.add_argument("--domains", default="elpv,digits")
    p.add_argument("--budgets-kib", default="28672")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="sparse-plans")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--work", type=Path, default=Path("/tmp/edgeplug-bench/sparse-plans"))
    p.add_argument("--strategies", default=",".join(STRATEGIES), help=f"plans to compare, of {', '.join(VARIANTS)}")
    p.add_argument("--reuse", type=Path, help="an earlier result of the same episodes: its plans are taken, not recomputed")
    p.add_argument("--report-only", type=Path)
    args = p.parse_args()
    if args.report_only:
        result = _packed(json.loads(args.report_only.read_text()), pack=False)
    else:
        result = run(args)
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"{args.name}.json").write_text(json.dumps(_packed(json.loads(json.dumps(result)), pack=True)) + "\n")
    text = report(result)
    (args.results / f"{(args.report_only.stem if args.report_only else args.name)}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
