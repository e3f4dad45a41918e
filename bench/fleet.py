"""Fleet benchmark: full-model FedAvg vs sparse-update FedAvg vs local-only training.

Digits (scikit-learn) split non-IID (Dirichlet label skew) over simulated devices;
the bundled pretrained CNN (digits 0-4) is fine-tuned to all 10 classes. Writes
bench/results/fleet.{md,json,png}. Needs flwr (the `fleet` extra), scikit-learn, matplotlib.

    nice python bench/fleet.py --clients 50 --rounds 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import edgeplug
from edgeplug.fleet.apps import FleetSettings
from edgeplug.fleet.device import FleetDevice
from edgeplug.fleet.partition import Partition
from edgeplug.fleet.simulation import load_split, simulate

HERE = Path(__file__).resolve().parent
MODEL = HERE.parent / "examples" / "digits_fewshot" / "pretrained_cnn.onnx"
RESULTS = HERE / "results"
RECIPES = {
    "full": "passes:\n  - name: freeze-bn\n    options: {layers: all}\n",
    # static sparse-update: one trainable set for the whole fleet, chosen without any device's data
    "sparse": ("passes:\n  - name: sparse-update\n    options: {strategy: static, memory_budget_bytes: 100000, batch_size: 16, "
               "channel_ratio: 0.0625, min_channel_ratio: 0.0625}\n  - name: freeze-bn\n    options: {layers: all}\n"),
}


def rewrite(work: Path, name: str, lr: float) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / f"{name}.yaml"
    recipe.write_text(f"loss: cross-entropy\noptimizer: {{name: adamw, lr: {lr}}}\n" + RECIPES[name])
    edgeplug.rewrite(MODEL, recipe, work / name)
    return work / name


def local_only(folder: Path, work: Path, settings: FleetSettings, partition: Partition, seed: int) -> list[dict[str, float]]:
    """Every device trains alone for as many epochs as the fleet has rounds; mean test accuracy per round."""
    server = FleetDevice(folder, seed=seed)
    sets, test = load_split(server, settings.clients, partition, seed=seed)
    initial = server.evaluate(server.initial, test)
    per_round: list[list[float]] = [[] for _ in range(settings.rounds)]
    times: list[list[float]] = [[] for _ in range(settings.rounds)]
    for index, data in enumerate(sets):
        device = FleetDevice(folder, seed=seed + 1 + index)
        arrays = device.initial
        for r in range(settings.rounds):
            tick = time.perf_counter()
            arrays = device.fit(arrays, data, epochs=settings.local_epochs, batch_size=settings.batch_size, round_seed=r + 1).arrays
            times[r].append(time.perf_counter() - tick)
            per_round[r].append(float(server.evaluate(arrays, test).accuracy or 0.0))
    rows = [{"round": 0, "eval_acc": float(initial.accuracy or 0.0), "min": float(initial.accuracy or 0.0),
             "max": float(initial.accuracy or 0.0), "seconds": 0.0}]
    for r in range(settings.rounds):
        rows.append({"round": r + 1, "eval_acc": statistics.mean(per_round[r]), "min": min(per_round[r]),
                     "max": max(per_round[r]), "seconds": sum(times[r])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--lr", type=float, default=0.01, help="AdamW learning rate of the sparse and local-only rows")
    parser.add_argument("--full-lrs", default="0.01,0.002", help="learning rates of the full-model rows (the best is compared)")
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="fleet")
    args = parser.parse_args()
    settings = FleetSettings(rounds=args.rounds, clients=args.clients, local_epochs=args.local_epochs, batch_size=16)
    partition = Partition.parse(args.partition)
    runs: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="edgeplug-bench-fleet-") as tmp:
        work = Path(tmp)
        rows = [(f"full@{lr}", "full", float(lr)) for lr in args.full_lrs.split(",")] + [("sparse", "sparse", args.lr)]
        for key, name, lr in rows:
            folder = rewrite(work / key, name, lr)
            started = time.perf_counter()
            result = simulate(folder, settings, partition, seed=args.seed,
                              on_round=lambda r, n=key: print(f"{n} round {r.round}: acc {r.eval_acc:.3f} up {r.upload_bytes_per_client:,.0f} B ({r.seconds:.1f} s)", flush=True))
            runs[key] = {"lr": lr, "rounds": [dataclasses.asdict(r) for r in result.rounds], "trainable_values": result.trainable_values,
                          "full_values": result.full_values, "client_sizes": result.client_sizes,
                          "seconds": time.perf_counter() - started}
        print("local-only ...", flush=True)
        runs["local"] = {"lr": args.lr, "rounds": local_only(work / "sparse" / "sparse", work, settings, partition, args.seed),
                         "trainable_values": runs["sparse"]["trainable_values"]}  # type: ignore[index]
        best = max((k for k in runs if k.startswith("full@")), key=lambda k: runs[k]["rounds"][-1]["eval_acc"])  # type: ignore[index]
        runs["full"] = runs[best]
    document = {"settings": dataclasses.asdict(settings), "partition": args.partition, "lr": args.lr, "seed": args.seed,
                "model": str(MODEL.relative_to(HERE.parent)), "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(document, indent=2) + "\n")
    write_markdown(document, RESULTS / f"{args.name}.md")
    plot(document, RESULTS / f"{args.name}.png")
    print((RESULTS / f"{args.name}.md").read_text())


def write_markdown(document: dict, path: Path) -> None:
    runs = document["runs"]
    full, sparse, local = runs["full"]["rounds"], runs["sparse"]["rounds"], runs["local"]["rounds"]
    lines = [f"# Fleet: digits, {document['settings']['clients']} devices, {document['partition']}, "
             f"{document['settings']['rounds']} rounds of {document['settings']['local_epochs']} local epoch(s)", "",
             "`nice python bench/fleet.py` — accuracy on the central test set (held-out digits).", "",
             "| round | full FedAvg acc | sparse FedAvg acc | local-only acc (mean, min-max) | full up B/device | sparse up B/device | full s/round | sparse s/round |",
             "|---|---|---|---|---|---|---|---|"]
    lines[4:4] = [f"Full-model rows were run at learning rates {', '.join(k[5:] for k in runs if k.startswith('full@'))}; "
                  f"the table shows the best, lr {runs['full']['lr']} (every row: {RESULTS.name}/fleet.json). Sparse and local-only: lr {runs['sparse']['lr']}.", ""]
    for f, s, lo in zip(full, sparse, local):
        lines.append(f"| {f['round']} | {f['eval_acc']:.3f} | {s['eval_acc']:.3f} | {lo['eval_acc']:.3f} ({lo['min']:.3f}-{lo['max']:.3f}) | "
                     f"{f['upload_bytes_per_client']:,.0f} | {s['upload_bytes_per_client']:,.0f} | {f['seconds']:.1f} | {s['seconds']:.1f} |")
    up_full = statistics.median(r["upload_bytes_per_client"] for r in full[1:])
    up_sparse = statistics.median(r["upload_bytes_per_client"] for r in sparse[1:])
    lines += ["", f"Trainable values sent per device and round: full {runs['full']['trainable_values']:,}, sparse {runs['sparse']['trainable_values']:,}.",
              f"Upload per device and round (Flower's serialised reply content): full {up_full:,.0f} B, sparse {up_sparse:,.0f} B "
              f"({up_full / up_sparse:.1f}x less).",
              f"Final accuracy: full {full[-1]['eval_acc']:.3f}, sparse {sparse[-1]['eval_acc']:.3f} "
              f"({100 * (sparse[-1]['eval_acc'] - full[-1]['eval_acc']):+.1f} points), local-only mean {local[-1]['eval_acc']:.3f}.",
              f"Median wall time per round (all devices trained in turn, one process, 2 shared cores): full "
              f"{statistics.median(r['seconds'] for r in full[1:]):.1f} s, sparse {statistics.median(r['seconds'] for r in sparse[1:]):.1f} s."]
    path.write_text("\n".join(lines) + "\n")


def plot(document: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from plotting import accuracy_axis

    figure, axis = plt.subplots(figsize=(6, 4))
    shown: list[float | None] = []
    for key, label in (("full", "full-model FedAvg"), ("sparse", "sparse-update FedAvg"), ("local", "local-only (mean)")):
        rounds = document["runs"][key]["rounds"]
        axis.plot([r["round"] for r in rounds], [r["eval_acc"] for r in rounds], marker="o", label=label)
        shown += [r["eval_acc"] for r in rounds]
    accuracy_axis(axis, shown)
    axis.set_xlabel("round")
    axis.set_ylabel("test accuracy")
    axis.set_title(f"digits, {document['settings']['clients']} devices, {document['partition']}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
