"""Natural clients: the 30 UCI HAPT users as 30 devices (non-IID by person), full vs sparse FedAvg.

Task: the HAPT 1D-CNN (`hapt_model`) pretrained with edgeplug on the first recording
(experiment) of UCI's 21 training users is fine-tuned by the whole fleet. Each user is one
device: it trains on its first recording, minus every 5th labelled stretch (validation);
its later recordings are its test data, which nothing ever trains on. Rows:

* full: every parameter trains and travels (`freeze-bn`: batch norm in inference mode);
* sparse: `sparse-update` static under a 100 kB backward-memory budget (channel share 1/16),
  `freeze-bn`: what trains is chosen without any device's data, the same for the whole fleet.

Every row's learning rate is tuned the same way: each lr of the grid runs until the
pooled validation accuracy of the global model plateaus (no gain above 0.2 points in
`--patience` rounds, at most `--max-rounds`), and the lr with the best validation accuracy
there (then lower validation loss, then smaller lr: `bench.protocol.choose_lr`) is kept.
The central ceiling of each row trains the same folder on all users' training data pooled,
for as many epochs as its fleet ran rounds, each lr of the grid, chosen the same way.
Reported: test accuracy (pooled test recordings) per round, per-user test accuracy of the
final models with paired 95% intervals over the 30 users, upload per device and round.
Writes bench/results/<name>.{md,json,png}.

    nice python bench/fleet_hapt.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import hapt  # noqa: E402
import hapt_model  # noqa: E402

import edgeplug  # noqa: E402
from bench.protocol.lr_search import Candidate, choose_lr  # noqa: E402
from bench.protocol.stats import paired_t, summary  # noqa: E402
from edgeplug.data import Dataset  # noqa: E402
from edgeplug.fleet.apps import FleetSettings, RoundRecord, run_fleet  # noqa: E402
from edgeplug.fleet.device import FleetDevice  # noqa: E402
from edgeplug.fleet.params import Arrays  # noqa: E402
from edgeplug.fleet.simulation import Devices, LocalGrid, quiet_flower, server_identity, usable_cores  # noqa: E402

RESULTS = HERE / "results"
ROWS = {
    "full": "  - name: freeze-bn\n    options: {layers: all}\n",
    "sparse": ("  - name: sparse-update\n    options: {strategy: static, memory_budget_bytes: 100000, batch_size: 16, "
               "channel_ratio: 0.0625, min_channel_ratio: 0.0625}\n  - name: freeze-bn\n    options: {layers: all}\n"),
}


class Plateau(Exception):
    """Raised from the round callback to end a run whose validation accuracy stopped rising."""


@dataclasses.dataclass
class Split:
    train: list[hapt.Windows]
    validation: hapt.Windows
    test: hapt.Windows
    test_by_user: list[hapt.Windows]


def split_users(data: hapt.Windows) -> Split:
    """Per user: first recording minus every 5th labelled stretch -> training; those stretches -> validation;
    later recordings -> test."""
    train, validation, test = [], [], []
    for user in hapt.USERS:
        mine = data.select(users=[user])
        first = mine.experiments == mine.experiments.min()
        stretch = np.unique(mine.segments[first])
        held = np.isin(mine.segments, stretch[::5]) & first
        train.append(mine.take(first & ~held))
        validation.append(mine.take(held))
        test.append(mine.take(~first))
    return Split(train, _concat(validation), _concat(test), test)


def _concat(parts: list[hapt.Windows]) -> hapt.Windows:
    fields = [f.name for f in dataclasses.fields(hapt.Windows)]
    return hapt.Windows(*(np.concatenate([getattr(p, name) for p in parts]) for name in fields))


def pretrained(split: Split, work: Path, source_users: int = len(hapt_model.SOURCE_USERS)) -> Path:
    """The CNN pretrained on the first `source_users` of UCI's 21 training users (their first recordings,
    training stretches only), cached."""
    settings = hapt_model.Settings(users=hapt_model.SOURCE_USERS[:source_users])
    target = hapt.cache_dir() / f"fleet-hapt-pretrained-{settings.key()}" / "model.onnx"
    if target.is_file():
        return target
    source = _concat([split.train[u - 1] for u in settings.users])
    model = hapt_model.train(settings, source, work / "pretrain")
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target.parent / "partial.onnx"))
    os.replace(target.parent / "partial.onnx", target)
    return target


def rewrite(model: Path, row: str, lr: float, work: Path) -> Path:
    folder = work / f"{row}-lr{lr:g}"
    recipe = work / f"{row}-lr{lr:g}.yaml"
    recipe.write_text(f"loss: cross-entropy\noptimizer: {{name: adamw, lr: {lr}}}\npasses:\n" + ROWS[row])
    if not folder.exists():
        edgeplug.rewrite(model, recipe, folder)
    return folder


def dataset(device: FleetDevice, windows: hapt.Windows) -> Dataset:
    return device.dataset({hapt_model.INPUT: windows.x, "y": windows.y})


def fleet_run(folder: Path, split: Split, args: argparse.Namespace) -> dict[str, Any]:
    """Rounds until the validation accuracy plateaus; per-round validation/test, final per-user test."""
    server = FleetDevice(folder, threads=1)
    devices = [dataset(server, windows) for windows in split.train]
    validation, test = dataset(server, split.validation), dataset(server, split.test)
    rounds: list[dict[str, Any]] = []
    best: dict[str, Any] = {"acc": -1.0, "round": 0, "arrays": None}

    def evaluate(arrays: Arrays) -> dict[str, float]:
        val = server.evaluate(arrays, validation)
        tested = server.evaluate(arrays, test)
        rounds.append({"val_acc": val.accuracy, "val_loss": val.loss, "test_acc": tested.accuracy, "test_loss": tested.loss})
        return {"eval_acc": float(val.accuracy or 0.0), "eval_loss": val.loss}

    def on_round(record: RoundRecord) -> None:
        rounds[-1].update(round=record.round, seconds=record.seconds, upload=record.upload_bytes_per_client, clients=record.clients)
        print(f"  round {record.round}: val {rounds[-1]['val_acc']:.3f} test {rounds[-1]['test_acc']:.3f} "
              f"up {record.upload_bytes_per_client:,.0f} B ({record.seconds:.1f} s)", flush=True)
        if rounds[-1]["val_acc"] > best["acc"] + args.min_gain:
            best.update(acc=rounds[-1]["val_acc"], round=record.round)
        if record.round >= args.min_rounds and record.round - best["round"] >= args.patience:
            raise Plateau

    settings = FleetSettings(rounds=args.max_rounds, clients=len(devices), local_epochs=args.local_epochs, batch_size=args.batch_size)
    grid = LocalGrid(Devices(folder.resolve(), tuple(devices)), workers=args.workers)
    final_arrays: list[Arrays] = []

    def keep(arrays: Arrays) -> dict[str, float]:
        final_arrays[:] = [arrays]
        return evaluate(arrays)

    started = time.perf_counter()
    try:
        with quiet_flower(), server_identity():
            run_fleet(grid, folder, settings, evaluate=keep, on_round=on_round, save=False)
    except Plateau:
        pass
    finally:
        grid.close(terminate=True)
    per_user = [float(server.evaluate(final_arrays[0], dataset(server, windows)).accuracy or 0.0) for windows in split.test_by_user]
    return {"rounds": rounds, "final": rounds[-1], "per_user_test": per_user, "seconds": time.perf_counter() - started,
            "values_sent": sum(int(v.size) for v in final_arrays[0].values())}


def central_run(folder: Path, split: Split, epochs: int, args: argparse.Namespace) -> dict[str, Any]:
    """The same folder trained on every user's training data pooled, `epochs` epochs (the ceiling)."""
    trainer = edgeplug.Trainer(folder, checkpoints=False, progress=False, threads=usable_cores(), cache_prefix=False)
    pooled = _concat(split.train)
    trainer.fit({hapt_model.INPUT: pooled.x, "y": pooled.y}, epochs=epochs, batch_size=args.batch_size)
    val = trainer.evaluate({hapt_model.INPUT: split.validation.x, "y": split.validation.y})
    tested = trainer.evaluate({hapt_model.INPUT: split.test.x, "y": split.test.y})
    per_user = [float(trainer.evaluate({hapt_model.INPUT: w.x, "y": w.y}).accuracy or 0.0) for w in split.test_by_user]
    return {"epochs": epochs, "final": {"val_acc": val.accuracy, "val_loss": val.loss, "test_acc": tested.accuracy, "test_loss": tested.loss},
            "per_user_test": per_user}


def choose(runs: dict[float, dict[str, Any]]) -> float:
    return choose_lr([Candidate(lr, float(run["final"]["val_acc"]), float(run["final"]["val_loss"])) for lr, run in runs.items()]).lr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", default="0.0003,0.001,0.003,0.01")
    parser.add_argument("--rows", default="full,sparse")
    parser.add_argument("--max-rounds", type=int, default=30)
    parser.add_argument("--min-rounds", type=int, default=8)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--min-gain", type=float, default=0.002)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=usable_cores())
    parser.add_argument("--source-users", type=int, default=len(hapt_model.SOURCE_USERS),
                        help="pretrain on the first N of UCI's 21 training users (fewer: a weaker start the fleet must improve)")
    parser.add_argument("--name", default="fleet_hapt")
    args = parser.parse_args()
    lrs = [float(v) for v in args.lrs.split(",")]
    split = split_users(hapt.load())
    document: dict[str, Any] = {"settings": vars(args), "command": " ".join(sys.argv[1:]), "users": len(split.train), "train_windows": [len(w) for w in split.train],
                                "validation_windows": len(split.validation), "test_windows": len(split.test), "rows": {},
                                "load": [], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    with tempfile.TemporaryDirectory(prefix="edgeplug-fleet-hapt-") as tmp:
        work = Path(tmp)
        model = pretrained(split, work, args.source_users)
        document["source_users"] = list(hapt_model.SOURCE_USERS[:args.source_users])
        start = edgeplug.Trainer(rewrite(model, "full", lrs[0], work), checkpoints=False, progress=False)
        document["initial_test_acc"] = start.evaluate({hapt_model.INPUT: split.test.x, "y": split.test.y}).accuracy
        print(f"pretrained model: test accuracy {document['initial_test_acc']:.3f} before the fleet", flush=True)
        for row in args.rows.split(","):
            fleets: dict[float, dict[str, Any]] = {}
            for lr in lrs:
                print(f"{row} lr {lr}", flush=True)
                document["load"].append(os.getloadavg()[0])
                fleets[lr] = fleet_run(rewrite(model, row, lr, work), split, args)
            chosen = choose(fleets)
            epochs = fleets[chosen]["final"]["round"] * args.local_epochs
            centrals: dict[float, dict[str, Any]] = {}
            for lr in lrs:
                print(f"{row} central lr {lr} ({epochs} epochs)", flush=True)
                centrals[lr] = central_run(rewrite(model, row, lr, work), split, epochs, args)
            document["rows"][row] = {"fleet": {str(k): v for k, v in fleets.items()}, "chosen_lr": chosen,
                                     "central": {str(k): v for k, v in centrals.items()}, "central_chosen_lr": choose(centrals)}
            (RESULTS / f"{args.name}.json").write_text(json.dumps(document, indent=1) + "\n")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(document, indent=1) + "\n")
    write_markdown(document, RESULTS / f"{args.name}.md")
    plot(document, RESULTS / f"{args.name}.png")
    print((RESULTS / f"{args.name}.md").read_text())


def _chosen(document: dict[str, Any], row: str) -> tuple[dict[str, Any], dict[str, Any]]:
    entry = document["rows"][row]
    return entry["fleet"][str(entry["chosen_lr"])], entry["central"][str(entry["central_chosen_lr"])]


def write_markdown(document: dict[str, Any], path: Path) -> None:
    rows = list(document["rows"])
    lines = [f"# Fleet: natural clients, the {document['users']} UCI HAPT users as devices (non-IID by person)", "",
             f"`nice python bench/fleet_hapt.py {document.get('command', '')}` (bench/fleet_hapt.py says what trains where). One seed (0); "
             "intervals are paired over the users. Pretrained 1D-CNN (on the first recordings of users "
             f"{document.get('source_users', list(hapt_model.SOURCE_USERS))}): test accuracy "
             f"{document['initial_test_acc']:.3f} before the fleet; lr grid {document['settings']['lrs']}, rounds until validation accuracy "
             f"gains no more than {document['settings']['min_gain']} in {document['settings']['patience']} rounds (at least "
             f"{document['settings']['min_rounds']}, at most {document['settings']['max_rounds']}), {document['settings']['local_epochs']} local "
             f"epoch(s) per round, batch {document['settings']['batch_size']}, every device every round; {sum(document['train_windows']):,} training windows "
             f"({min(document['train_windows'])}-{max(document['train_windows'])} per device), {document['validation_windows']:,} validation, "
             f"{document['test_windows']:,} test (later recordings, never trained on). Load average during the runs: "
             f"{min(document['load']):.1f}-{max(document['load']):.1f} (2 shared cores).", "",
             "| row | chosen lr (fleet) | rounds to plateau | fleet test acc | central (pooled) test acc, chosen lr | values sent per device and round | upload B per device and round (median) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        fleet, central = _chosen(document, row)
        uploads = sorted(r["upload"] for r in fleet["rounds"] if r.get("round", 0) > 0)
        lines.append(f"| {row} | {document['rows'][row]['chosen_lr']} | {fleet['final']['round']} | {fleet['final']['test_acc']:.3f} | "
                     f"{central['final']['test_acc']:.3f} (lr {document['rows'][row]['central_chosen_lr']}) | {fleet['values_sent']:,} | "
                     f"{uploads[len(uploads) // 2]:,.0f} |")
    lines += ["", "Every lr tried (fleet: validation / test accuracy at its plateau round):", "",
              "| row | lr | rounds | val acc | test acc | central val acc | central test acc |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        entry = document["rows"][row]
        for lr, fleet in entry["fleet"].items():
            central = entry["central"][lr]
            lines.append(f"| {row} | {lr} | {fleet['final']['round']} | {fleet['final']['val_acc']:.3f} | {fleet['final']['test_acc']:.3f} | "
                         f"{central['final']['val_acc']:.3f} | {central['final']['test_acc']:.3f} |")
    if {"full", "sparse"} <= set(rows):
        full, full_central = _chosen(document, "full")
        sparse, sparse_central = _chosen(document, "sparse")
        difference = paired_t(sparse["per_user_test"], full["per_user_test"], names=("sparse", "full"))
        ratio = (sorted(r["upload"] for r in full["rounds"] if r.get("round", 0) > 0)[len(full["rounds"]) // 2 - 1] /
                 max(1.0, sorted(r["upload"] for r in sparse["rounds"] if r.get("round", 0) > 0)[len(sparse["rounds"]) // 2 - 1]))
        lines += ["", f"Per-user test accuracy (mean over {len(full['per_user_test'])} users, 95% t interval): full "
                  f"{_summary(full['per_user_test'])}, sparse {_summary(sparse['per_user_test'])}; sparse - full, paired over users: "
                  f"{difference.interval_text()} (p {difference.p_value:.3g}).",
                  f"Pooled test accuracy: sparse {100 * (sparse['final']['test_acc'] - full['final']['test_acc']):+.1f} points against full, "
                  f"at {ratio:.1f}x less upload per device and round. Central ceilings: full {full_central['final']['test_acc']:.3f}, "
                  f"sparse {sparse_central['final']['test_acc']:.3f}."]
    path.write_text("\n".join(lines) + "\n")


def _summary(values: list[float]) -> str:
    stats = summary(values)
    return f"{stats['mean']:.3f} [{stats['low']:.3f}, {stats['high']:.3f}]"


def plot(document: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    for row in document["rows"]:
        fleet, central = _chosen(document, row)
        line = axis.plot([r["round"] for r in fleet["rounds"]], [r["test_acc"] for r in fleet["rounds"]], marker="o", markersize=3,
                         label=f"{row} FedAvg (lr {document['rows'][row]['chosen_lr']})")
        axis.axhline(central["final"]["test_acc"], color=line[0].get_color(), linestyle="--", linewidth=1,
                     label=f"{row}, central (pooled)")
    axis.set_xlabel("round")
    axis.set_ylabel("test accuracy (later recordings)")
    axis.set_title(f"UCI HAPT, {document['users']} users as devices")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
