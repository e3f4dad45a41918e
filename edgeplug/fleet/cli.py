"""`edgeplug fleet simulate | server | client`: argument parsing and printing only."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from edgeplug.errors import SetupError
from edgeplug.fleet.address import loopback


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

    def progress(record: Any) -> None:
        if record.round == 0:
            print(f"round 0/{settings.rounds}: test_acc {_acc(record.eval_acc)}  test_loss {record.eval_loss:.4f}  (initial model)", flush=True)
        else:
            print(f"round {record.round}/{settings.rounds}: {record.clients} devices trained, test_acc {_acc(record.eval_acc)}  "
                  f"test_loss {record.eval_loss:.4f}  upload {record.upload_bytes_per_client:,.0f} B/device  ({record.seconds:.1f} s)", flush=True)

    result = simulate(args.artifacts, settings, partition, data=args.data, test=args.test, seed=args.seed,
                      work_dir=args.work_dir, save=not args.no_save, force=args.force, on_round=progress)
    print()
    print(format_table(result.rounds))
    sizes = result.client_sizes
    print(f"{settings.clients} devices ({args.partition}: {min(sizes)}-{max(sizes)} samples each), strategy {settings.strategy}; "
          f"each device sends {result.trainable_values:,} of the model's {result.full_values:,} parameter values")
    if result.checkpoint is not None:
        print(f"wrote the global model to {result.checkpoint} (edgeplug export {args.artifacts} -o model.onnx)")
    if args.json:
        document = {"settings": dataclasses.asdict(settings), "partition": args.partition, "client_sizes": sizes,
                    "trainable_values": result.trainable_values, "full_values": result.full_values,
                    "rounds": [dataclasses.asdict(r) for r in result.rounds]}
        write_text(args.json, json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _server(args: argparse.Namespace) -> int:
    loopback(args.address)
    _require_flower()
    from edgeplug.fleet.deploy import run_server

    work = args.work_dir or args.artifacts.parent / f".{args.artifacts.name}.fleet-server"
    run_server(args.artifacts, _settings(args, args.clients), args.address, test=args.test, work_dir=work, force=args.force)
    return 0


def _acc(value: float | None) -> str:
    """Accuracy for progress lines; '-' for losses without one (mse, l1, bce)."""
    return "-" if value is None else f"{value:.3f}"


def _client(args: argparse.Namespace) -> int:
    loopback(args.address)
    _require_flower()
    from edgeplug.fleet.deploy import run_client

    work = args.work_dir or args.artifacts.parent / f".{args.artifacts.name}.fleet-device-{Path(args.data).stem}-{args.seed}"
    run_client(args.artifacts, args.data, args.address, work, seed=args.seed, wait=args.wait)
    return 0


def _training_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--strategy", default="fedavg", help="Flower strategy: fedavg (default), fedavgm, fedadam, fedyogi, fedadagrad, fedmedian, fedtrimmedavg")
    parser.add_argument("--fraction", type=float, default=1.0, help="share of the devices that train each round")
    parser.add_argument("--local-epochs", type=int, default=1, help="epochs each device trains per round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, help="local learning rate (default: the recipe's)")
    parser.add_argument("--force", action="store_true", help="replace training checkpoints already in the folder")
    parser.add_argument("--work-dir", type=Path, help="where devices keep their copies of the checkpoint")


def add_fleet_command(commands: Any) -> None:
    """Register `edgeplug fleet` and its subcommands on the CLI's subparsers."""
    fleet = commands.add_parser("fleet", help="federated training across devices with Flower (simulate, server, client)")
    sub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="FLEET_COMMAND")

    parser = sub.add_parser("simulate", help="simulate a fleet in this process on a non-IID split of real data")
    parser.add_argument("artifacts", type=Path, help="artifact folder written by 'edgeplug rewrite'")
    parser.add_argument("--clients", type=int, default=10, help="simulated devices")
    parser.add_argument("--partition", default="dirichlet:0.5", help="dirichlet:ALPHA (label skew), distortion (per-device input shift/contrast/noise) or iid")
    parser.add_argument("--data", type=Path, help="training .npz split across the devices (default: scikit-learn's digits)")
    parser.add_argument("--test", type=Path, help="central test .npz (default: held-out digits)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the sample orders")
    parser.add_argument("--no-save", action="store_true", help="do not write the global model into the folder")
    parser.add_argument("--json", type=Path, help="write the per-round table as JSON")
    _training_options(parser)
    parser.set_defaults(run=_simulate)

    parser = sub.add_parser("server", help="serve rounds to device processes over gRPC (loopback)")
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--clients", type=int, required=True, help="devices to wait for; every round trains them all (or --fraction)")
    parser.add_argument("--address", default="127.0.0.1:8080")
    parser.add_argument("--test", type=Path, help="central test .npz (without it the devices evaluate on their data)")
    _training_options(parser)
    parser.set_defaults(run=_server)

    parser = sub.add_parser("client", help="one device: train on local data for the server's rounds")
    parser.add_argument("artifacts", type=Path, help="the same artifact folder the server uses (a copy on the device)")
    parser.add_argument("--data", type=Path, required=True, help="this device's training .npz")
    parser.add_argument("--address", default="127.0.0.1:8080")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order (give each device its own)")
    parser.add_argument("--wait", type=float, default=60.0, metavar="SECONDS", help="how long to wait for the server to listen")
    parser.add_argument("--work-dir", type=Path, help="where the device keeps its checkpoint (default: next to the folder)")
    parser.set_defaults(run=_client)
