"""`edgeplug fleet simulate | app | credentials`: argument parsing and printing only."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from edgeplug.console import print_result
from edgeplug.errors import SetupError

log = logging.getLogger(__name__)

STRATEGY_NAMES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg")
"""Flower strategies `--strategy` offers (the keys of `edgeplug.fleet.apps.STRATEGIES`, named here so that
building the parser does not import Flower)."""
FLEET_BATCH_SIZE = 16
"""Local batch size: a device holds few examples (digits split over 10 devices: ~130 each), so 16 gives
several steps per local epoch where train's 32 would give few."""


def _require_flower() -> None:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise SetupError("edgeplug fleet needs Flower: pip install 'edgeplug[fleet]'") from None


def _settings(args: argparse.Namespace, clients: int) -> Any:
    from edgeplug.fleet.apps import FleetSettings

    return FleetSettings(rounds=args.rounds, clients=clients, strategy=args.strategy, fraction=args.fraction,
                         local_epochs=args.local_epochs, batch_size=args.batch_size, lr=args.lr, timeout=args.timeout,
                         min_clients=args.min_clients, wait=args.wait)


class _DeviceProgress:
    """A progress bar per round counting the devices that answered (stderr, terminals only)."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._done = 0

    def __call__(self, done: int, total: int) -> None:
        from edgeplug.progress import Progress

        if self._bar is None:
            self._bar, self._done = Progress("devices", total, unit="device").__enter__(), 0
        self._bar.advance(done - self._done)
        self._done = done
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _simulate(args: argparse.Namespace) -> int:
    _require_flower()
    from edgeplug.atomic import write_text
    from edgeplug.fleet.flower_app import device_line, round_line
    from edgeplug.fleet.partition import Partition
    from edgeplug.fleet.simulation import format_table, simulate

    settings = _settings(args, args.clients)
    partition = Partition.parse(args.partition)
    if args.plot is not None:
        _plotting()  # refused before any round, not after
    output = args.output
    if isinstance(getattr(args, "json", None), str):  # the old `--json FILE`
        log.warning("'--json FILE' is deprecated: use '-o FILE' to write the rounds to a file (--json alone prints them)")
        output = output or Path(args.json)
    per_device = args.per_device if args.per_device is not None else settings.clients <= 20
    progress = _DeviceProgress()
    try:
        result = simulate(args.artifacts, settings, partition, data=args.data, test=args.test, seed=args.seed,
                          save=not args.no_save, force=args.force, backend=args.backend, workers=args.workers,
                          on_round=lambda record: log.info("%s", round_line(record, settings.rounds)),
                          on_device=(lambda report: log.info("%s", device_line(report))) if per_device else None,
                          progress=progress)
    finally:
        progress.close()
    sizes = result.client_sizes
    document = {"settings": dataclasses.asdict(settings), "partition": args.partition, "backend": args.backend,
                "client_sizes": sizes, "trainable_values": result.trainable_values, "full_values": result.full_values,
                "resumed_from": result.resumed_from, "rounds": [dataclasses.asdict(r) for r in result.rounds],
                "checkpoint": str(result.checkpoint) if result.checkpoint is not None else None}
    if output:
        write_text(Path(output), json.dumps(document, indent=2) + "\n")
        log.info("wrote %s", output)
    if args.plot is not None:
        plot_rounds(result.rounds, args.plot, title=f"{settings.clients} devices, {args.partition}, {settings.strategy}")
        log.info("wrote %s", args.plot)

    def text() -> str:
        lines = ["", format_table(result.rounds),
                 f"{settings.clients} devices ({args.partition}: {min(sizes)}-{max(sizes)} samples each), strategy {settings.strategy}, "
                 f"backend {args.backend}; each device sends {result.trainable_values:,} of the model's {result.full_values:,} parameter values"]
        if result.checkpoint is not None:
            lines.append(f"wrote the global model to {result.checkpoint} (edgeplug export {args.artifacts} -o model.onnx)")
        return "\n".join(lines)

    return print_result(document, text)


def _plotting() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SetupError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rounds(rounds: list[Any], target: Path, *, title: str = "") -> None:
    """Accuracy (and loss) per round: the global model on the test set, the devices' own training metrics."""
    from edgeplug.atomic import atomic_file

    plt = _plotting()
    from matplotlib.ticker import MaxNLocator

    figure, (accuracy, loss) = plt.subplots(1, 2, figsize=(9, 3.6))
    for axis, key, label in ((accuracy, "acc", "accuracy"), (loss, "loss", "loss")):
        for source, style in (("eval", "o-"), ("train", "s--")):
            points = [(r.round, getattr(r, f"{source}_{key}")) for r in rounds if getattr(r, f"{source}_{key}") is not None]
            if points:
                axis.plot(*zip(*points), style, markersize=3, label="global model, test set" if source == "eval" else "devices, local training")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("round")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    accuracy.legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    with atomic_file(target) as staging:
        figure.savefig(staging, dpi=110, format=target.suffix.lstrip(".") or "png")
    plt.close(figure)


def _app(args: argparse.Namespace) -> int:
    _require_flower()
    from edgeplug.fleet.deployment import run_config, write_app

    settings = _settings(args, args.clients)
    target = write_app(args.output, args.artifacts, settings, test=args.test, force=args.force)
    return print_result({"app": str(target), "run_config": run_config(args.artifacts, settings, test=args.test)},
                        f"wrote the Flower App {target}: start a SuperLink and {args.clients} SuperNodes, then "
                        f"`flwr run {target} <connection>` (docs/fleet.md)")


def _credentials(args: argparse.Namespace) -> int:
    _require_flower()
    from edgeplug.fleet.deployment import describe, write_credentials

    paths = write_credentials(args.output, supernodes=args.supernodes, force=args.force)
    return print_result({"folder": str(args.output), "files": {name: str(path) for name, path in paths.items()}},
                        f"wrote {describe(paths)} into {args.output} (loopback trials only: a real fleet uses its own certificates)")


def _training_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=10, metavar="N", help="federated rounds")
    parser.add_argument("--strategy", default="fedavg", choices=STRATEGY_NAMES, help="Flower strategy that aggregates the devices' updates")
    parser.add_argument("--fraction", type=float, default=1.0, metavar="F", help="share of the connected devices that train each round")
    parser.add_argument("--local-epochs", type=int, default=1, metavar="N", help="epochs each device trains per round")
    parser.add_argument("--batch-size", type=int, default=FLEET_BATCH_SIZE, metavar="N",
                        help="local batch size (smaller than train's 32: a device holds few examples)")
    parser.add_argument("--lr", type=float, help="local learning rate (default: the recipe's)")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS", help="how long a round waits for replies (late devices are left out)")
    parser.add_argument("--min-clients", type=int, metavar="N", help="devices a round needs (default: all); fewer go on when devices die")
    parser.add_argument("--wait", type=float, default=600.0, metavar="SECONDS", help="how long a round waits for --min-clients devices to connect")
    parser.add_argument("--force", action="store_true", help="start over: replace training checkpoints (or an unfinished fleet run) in the folder")


def add_fleet_command(commands: Any) -> None:
    """Register `edgeplug fleet` and its subcommands on the CLI's `CommandRegistry`."""
    fleet = commands.add_parser("fleet", help="federated training across devices with Flower (simulate, app, credentials)")
    sub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="FLEET_COMMAND")

    parser = sub.add_parser("simulate", help="simulate a fleet on this machine on a non-IID split of real data",
                            description="Simulate a fleet on this machine on a non-IID split of real data.")
    parser.add_argument("artifacts", type=Path, help="artifact folder written by 'edgeplug rewrite'")
    parser.add_argument("--clients", type=int, default=10, metavar="N", help="simulated devices")
    parser.add_argument("--partition", default="dirichlet:0.5", metavar="P",
                        help="dirichlet:ALPHA (label skew; smaller ALPHA, fewer classes per device), distortion (per-device input shift/contrast/noise) or iid")
    parser.add_argument("--data", type=Path, metavar="NPZ", help="training .npz split across the devices (default: scikit-learn's digits)")
    parser.add_argument("--test", type=Path, metavar="NPZ", help="central test .npz (default: held-out digits)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the sample orders")
    parser.add_argument("--backend", choices=("local", "ray"), default="local",
                        help="local: worker processes, one per core; ray: Flower's Simulation Engine (edgeplug[fleet-ray])")
    parser.add_argument("--workers", type=int, metavar="N", help="processes (or Ray actors) training devices at once (default: one per core)")
    parser.add_argument("--per-device", action=argparse.BooleanOptionalAction, default=None,
                        help="log one line per device and round (default: with at most 20 devices)")
    parser.add_argument("--no-save", action="store_true", help="do not write the global model into the folder (no resume)")
    parser.add_argument("-o", "--output", type=Path, metavar="FILE", help="also write the result (settings and per-round table) as JSON to FILE")
    parser.add_argument("--json", nargs="?", const=True, default=argparse.SUPPRESS, metavar="FILE",
                        help="print the result as one JSON document on stdout ('--json FILE' is a deprecated alias of -o FILE)")
    parser.add_argument("--plot", type=Path, metavar="FILE", help="draw accuracy and loss per round into FILE (.png, .svg, .pdf; needs matplotlib)")
    _training_options(parser)
    parser.set_defaults(run=_simulate)

    parser = sub.add_parser("app", help="write a Flower App for `flwr run` on a SuperLink and SuperNodes",
                            description="Write a Flower App (ServerApp + ClientApp around an artifact folder) for `flwr run`.")
    parser.add_argument("artifacts", type=Path, help="the server's artifact folder (the global model is written into it)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="the app folder to write")
    parser.add_argument("--clients", type=int, required=True, metavar="N", help="devices (SuperNodes) in the fleet")
    parser.add_argument("--test", type=Path, metavar="NPZ", help="central test .npz the server evaluates on after every round")
    _training_options(parser)
    parser.set_defaults(run=_app)

    parser = sub.add_parser("credentials", help="write a CA, a SuperLink certificate and SuperNode keys for loopback trials",
                            description="Write a CA, a SuperLink certificate and SuperNode keys for trying TLS and node authentication on loopback.")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="the credentials folder to write")
    parser.add_argument("--supernodes", type=int, default=2, metavar="N", help="SuperNode key pairs to write")
    parser.add_argument("--force", action="store_true", help="replace a credentials folder written before")
    parser.set_defaults(run=_credentials)
