"""`edgeplug fleet simulate | server | client`: argument parsing and printing only."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from edgeplug.console import print_result
from edgeplug.errors import SetupError
from edgeplug.fleet.address import loopback

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
                         local_epochs=args.local_epochs, batch_size=args.batch_size, lr=args.lr)


def _simulate(args: argparse.Namespace) -> int:
    _require_flower()
    from edgeplug.atomic import write_text
    from edgeplug.fleet.partition import Partition
    from edgeplug.fleet.simulation import format_table, simulate

    settings = _settings(args, args.clients)
    partition = Partition.parse(args.partition)
    output = args.output
    if isinstance(args.json, str):  # the old `--json FILE`
        log.warning("'--json FILE' is deprecated: use '-o FILE' to write the rounds to a file (--json alone prints them)")
        output = output or Path(args.json)

    def progress(record: Any) -> None:
        if record.round == 0:
            log.info("round 0/%d: test_acc %s  test_loss %.4f  (initial model)", settings.rounds, _acc(record.eval_acc), record.eval_loss)
        else:
            log.info("round %d/%d: %d devices trained, test_acc %s  test_loss %.4f  upload %s B/device  (%.1f s)", record.round,
                     settings.rounds, record.clients, _acc(record.eval_acc), record.eval_loss, f"{record.upload_bytes_per_client:,.0f}",
                     record.seconds)

    result = simulate(args.artifacts, settings, partition, data=args.data, test=args.test, seed=args.seed,
                      work_dir=args.work_dir, save=not args.no_save, force=args.force, on_round=progress)
    sizes = result.client_sizes
    document = {"settings": dataclasses.asdict(settings), "partition": args.partition, "client_sizes": sizes,
                "trainable_values": result.trainable_values, "full_values": result.full_values,
                "rounds": [dataclasses.asdict(r) for r in result.rounds],
                "checkpoint": str(result.checkpoint) if result.checkpoint is not None else None}
    if output:
        write_text(Path(output), json.dumps(document, indent=2) + "\n")
        log.info("wrote %s", output)

    def text() -> str:
        lines = ["", format_table(result.rounds),
                 f"{settings.clients} devices ({args.partition}: {min(sizes)}-{max(sizes)} samples each), strategy {settings.strategy}; "
                 f"each device sends {result.trainable_values:,} of the model's {result.full_values:,} parameter values"]
        if result.checkpoint is not None:
            lines.append(f"wrote the global model to {result.checkpoint} (edgeplug export {args.artifacts} -o model.onnx)")
        return "\n".join(lines)

    return print_result(document, text)


def _server(args: argparse.Namespace) -> int:
    loopback(args.address)
    _require_flower()
    from edgeplug.fleet.deploy import run_server

    work = args.work_dir or args.artifacts.parent / f".{args.artifacts.name}.fleet-server"
    rounds = run_server(args.artifacts, _settings(args, args.clients), args.address, test=args.test, work_dir=work, force=args.force,
                        echo=log.info)
    return print_result({"rounds": [dataclasses.asdict(r) for r in rounds]}, f"served {len(rounds)} rounds")


def _acc(value: float | None) -> str:
    """Accuracy for progress lines; '-' for losses without one (mse, l1, bce)."""
    return "-" if value is None else f"{value:.3f}"


def _client(args: argparse.Namespace) -> int:
    loopback(args.address)
    _require_flower()
    from edgeplug.fleet.deploy import run_client

    work = args.work_dir or args.artifacts.parent / f".{args.artifacts.name}.fleet-device-{Path(args.data).stem}-{args.seed}"
    run_client(args.artifacts, args.data, args.address, work, seed=args.seed, wait=args.wait)
    return print_result({"address": args.address, "data": str(args.data)}, f"the server at {args.address} ended the run")


def _training_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=10, metavar="N", help="federated rounds")
    parser.add_argument("--strategy", default="fedavg", choices=STRATEGY_NAMES, help="Flower strategy that aggregates the devices' updates")
    parser.add_argument("--fraction", type=float, default=1.0, metavar="F", help="share of the devices that train each round")
    parser.add_argument("--local-epochs", type=int, default=1, metavar="N", help="epochs each device trains per round")
    parser.add_argument("--batch-size", type=int, default=FLEET_BATCH_SIZE, metavar="N",
                        help="local batch size (smaller than train's 32: a device holds few examples)")
    parser.add_argument("--lr", type=float, help="local learning rate (default: the recipe's)")
    parser.add_argument("--force", action="store_true", help="replace training checkpoints already in the folder")
    parser.add_argument("--work-dir", type=Path, metavar="DIR", help="where devices keep their copies of the checkpoint (default: a temporary folder)")


def add_fleet_command(commands: Any) -> None:
    """Register `edgeplug fleet` and its subcommands on the CLI's `CommandRegistry`."""
    fleet = commands.add_parser("fleet", help="federated training across devices with Flower (simulate, server, client)")
    sub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="FLEET_COMMAND")

    parser = sub.add_parser("simulate", help="simulate a fleet in this process on a non-IID split of real data",
                            description="Simulate a fleet in this process on a non-IID split of real data.")
    parser.add_argument("artifacts", type=Path, help="artifact folder written by 'edgeplug rewrite'")
    parser.add_argument("--clients", type=int, default=10, metavar="N", help="simulated devices")
    parser.add_argument("--partition", default="dirichlet:0.5", metavar="P",
                        help="dirichlet:ALPHA (label skew; smaller ALPHA, fewer classes per device), distortion (per-device input shift/contrast/noise) or iid")
    parser.add_argument("--data", type=Path, metavar="NPZ", help="training .npz split across the devices (default: scikit-learn's digits)")
    parser.add_argument("--test", type=Path, metavar="NPZ", help="central test .npz (default: held-out digits)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the sample orders")
    parser.add_argument("--no-save", action="store_true", help="do not write the global model into the folder")
    parser.add_argument("-o", "--output", type=Path, metavar="FILE", help="also write the result (settings and per-round table) as JSON to FILE")
    parser.add_argument("--json", nargs="?", const=True, default=argparse.SUPPRESS, metavar="FILE",
                        help="print the result as one JSON document on stdout ('--json FILE' is a deprecated alias of -o FILE)")
    _training_options(parser)
    parser.set_defaults(run=_simulate)

    parser = sub.add_parser("server", help="serve rounds to device processes over gRPC (loopback)",
                            description="Serve rounds to device processes over gRPC (loopback only).")
    parser.add_argument("artifacts", type=Path, help="artifact folder written by 'edgeplug rewrite'")
    parser.add_argument("--clients", type=int, required=True, metavar="N", help="devices to wait for; every round trains them all (or --fraction)")
    parser.add_argument("--address", default="127.0.0.1:8080", metavar="HOST:PORT", help="where to listen (loopback only)")
    parser.add_argument("--test", type=Path, metavar="NPZ", help="central test .npz (without it the devices evaluate on their data)")
    _training_options(parser)
    parser.set_defaults(run=_server)

    parser = sub.add_parser("client", help="one device: train on local data for the server's rounds",
                            description="One device: train on local data for the server's rounds.")
    parser.add_argument("artifacts", type=Path, help="the same artifact folder the server uses (a copy on the device)")
    parser.add_argument("--data", type=Path, required=True, metavar="NPZ", help="this device's training .npz")
    parser.add_argument("--address", default="127.0.0.1:8080", metavar="HOST:PORT", help="the server's address (loopback only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order (give each device its own)")
    parser.add_argument("--wait", type=float, default=60.0, metavar="SECONDS", help="how long to wait for the server to listen")
    parser.add_argument("--work-dir", type=Path, metavar="DIR", help="where the device keeps its checkpoint (default: next to the folder)")
    parser.set_defaults(run=_client)
