"""The Flower App that `flwr run` deploys on a SuperLink and SuperNodes.

`server_app` reads the run config (`[tool.flwr.app.config]` of the app's pyproject.toml,
overridable with `flwr run --run-config`): `artifacts` (the server's artifact folder,
where the global model is written after every round), `clients`, `rounds`, `strategy`,
`fraction`, `local-epochs`, `batch-size`, `lr` (0: the recipe's), `timeout`,
`min-clients` (0: all), `wait`, `test` (a central test .npz, "" for none), `force`.

`client_app` reads the node config each SuperNode is started with
(`flower-supernode --node-config 'artifacts="/device/out" data="/device/data.npz" seed=1'`):
`artifacts` (the device's copy of the same rewritten folder; default the run config's),
`data` (its training .npz) and `seed` (its sample order). `edgeplug fleet app` writes the
app folder; docs/fleet.md shows the whole deployment.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from edgeplug.fleet.apps import LOG, DeviceData, DeviceReport, FleetSettings, RoundRecord, make_client_app, run_fleet
from edgeplug.fleet.device import FleetDevice
from edgeplug.fleet.params import Arrays

server_app = ServerApp()


def settings_from(config: Any) -> FleetSettings:
    """FleetSettings from a Flower run config (TOML values)."""
    lr = float(config.get("lr", 0.0))
    min_clients = int(config.get("min-clients", 0))
    return FleetSettings(rounds=int(config.get("rounds", 3)), clients=int(config["clients"]), strategy=str(config.get("strategy", "fedavg")),
                         fraction=float(config.get("fraction", 1.0)), local_epochs=int(config.get("local-epochs", 1)),
                         batch_size=int(config.get("batch-size", 16)), lr=lr if lr > 0 else None,
                         timeout=float(config.get("timeout", 600.0)), min_clients=min_clients if min_clients > 0 else None,
                         wait=float(config.get("wait", 600.0)))


def round_line(record: RoundRecord, rounds: int) -> str:
    accuracy = "-" if record.eval_acc is None else f"{record.eval_acc:.3f}"
    loss = "-" if record.eval_loss is None else f"{record.eval_loss:.4f}"
    if record.round == 0:
        return f"round 0/{rounds}: test_acc {accuracy}  test_loss {loss}  (initial model)"
    dropped = f", {record.dropped} dropped" if record.dropped else ""
    return (f"round {record.round}/{rounds}: {record.clients} devices trained{dropped}, test_acc {accuracy}  test_loss {loss}  "
            f"upload {record.upload_bytes_per_client:,.0f} B/device  ({record.seconds:.1f} s)")


def device_line(report: DeviceReport) -> str:
    who = f"node {report.node}" + (f" (device {report.partition})" if report.partition is not None else "")
    if report.dropped is not None:
        return f"  round {report.round}: {who}: update dropped: {report.dropped}"
    accuracy = "" if report.train_acc is None else f"  train_acc {report.train_acc:.3f}"
    loss = "-" if report.train_loss is None else f"{report.train_loss:.4f}"
    seconds = "" if report.seconds is None else f"  ({report.seconds:.2f} s)"
    return f"  round {report.round}: {who}: {report.examples} samples  train_loss {loss}{accuracy}  sent {report.upload_bytes:,} B{seconds}"


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    folder = Path(str(config["artifacts"]))
    settings = settings_from(config)
    server = FleetDevice(folder)
    test = str(config.get("test", "") or "")
    test_set = server.dataset(test) if test else None

    def evaluate(arrays: Arrays) -> dict[str, float]:
        if test_set is None:
            return {}
        metrics = server.evaluate(arrays, test_set)
        return {"eval_loss": metrics.loss, **({"eval_acc": metrics.accuracy} if metrics.accuracy is not None else {})}

    handler = logging.StreamHandler(sys.stdout)  # dropped updates and resumes reach the run's log
    LOG.addHandler(handler)
    flower = logging.getLogger("flwr")
    level, flower.level = flower.level, logging.WARNING  # edgeplug prints its own lines per round and device
    try:
        run = run_fleet(grid, folder, settings, evaluate=evaluate, force=bool(config.get("force", False)),
                        on_round=lambda record: print(round_line(record, settings.rounds), flush=True),
                        on_device=lambda report: print(device_line(report), flush=True))
    finally:
        LOG.removeHandler(handler)
        flower.setLevel(level)
    print(f"wrote the global model to {run.checkpoint} (edgeplug export {folder} -o model.onnx)", flush=True)


_DEVICES: dict[tuple[str, str], tuple[FleetDevice, DeviceData]] = {}


def device_from_node(context: Context) -> tuple[FleetDevice, DeviceData]:
    """The device this SuperNode plays: its folder and data from its node config."""
    folder = str(context.node_config.get("artifacts") or context.run_config["artifacts"])
    data = str(context.node_config["data"])
    key = (folder, data)
    if key not in _DEVICES:
        device = FleetDevice(folder, seed=int(context.node_config.get("seed", 0)))
        _DEVICES[key] = (device, DeviceData(device.dataset(data)))
    return _DEVICES[key]


client_app = make_client_app(device_from_node)
