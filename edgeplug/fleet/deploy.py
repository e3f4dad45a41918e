"""`edgeplug fleet server` / `edgeplug fleet client`: a fleet as separate processes over gRPC.

Each process is self-contained (no Flower app bundle to build and submit), so a
device needs only edgeplug, Flower and its data: Flower's gRPC server with a Flower
strategy on one side, `start_client` with a NumPyClient around a `FleetDevice` on the
other. The arrays travel in the order of the sorted trainable names, which both sides
read from the same rewritten folder; shapes are checked on arrival.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar, ndarrays_to_parameters
from flwr.compat.client.app import start_client
from flwr.compat.server.app import start_server
from flwr.server import ServerConfig
from flwr.server import strategy as legacy

from edgeplug.data import Dataset
from edgeplug.errors import EdgeplugError
from edgeplug.fleet.address import loopback
from edgeplug.fleet.apps import FleetSettings, RoundRecord, finish
from edgeplug.fleet.device import FleetDevice
from edgeplug.fleet.params import Arrays, check_can_save, read_trainable

LEGACY_STRATEGIES: dict[str, Callable[..., Any]] = {
    "fedavg": legacy.FedAvg, "fedavgm": legacy.FedAvgM, "fedadam": legacy.FedAdam, "fedyogi": legacy.FedYogi,
    "fedadagrad": legacy.FedAdagrad, "fedmedian": legacy.FedMedian, "fedtrimmedavg": legacy.FedTrimmedAvg,
}


class DeviceClient(NumPyClient):
    """A NumPyClient that trains one device's copy of the artifact folder on its own data."""

    def __init__(self, device: FleetDevice, data: Dataset) -> None:
        self.device = device
        self.data = data
        self.names = device.trainable_names

    def _arrays(self, parameters: NDArrays) -> Arrays:
        if len(parameters) != len(self.names):
            raise EdgeplugError(f"the server sent {len(parameters)} arrays, this folder trains {len(self.names)}; "
                                "server and devices must use the same rewritten folder")
        return dict(zip(self.names, parameters, strict=True))

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return [self.device.initial[name] for name in self.names]

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        lr = config.get("lr")
        result = self.device.fit(self._arrays(parameters), self.data, epochs=int(config.get("local-epochs", 1)),
                                 batch_size=int(config.get("batch-size", 16)), lr=float(lr) if lr is not None else None,
                                 round_seed=int(config.get("server-round", 0)))
        metrics: dict[str, Scalar] = {"train_loss": result.train.loss}
        if result.train.accuracy is not None:
            metrics["train_acc"] = result.train.accuracy
        return [result.arrays[name] for name in self.names], result.num_examples, metrics

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        measured = self.device.evaluate(self._arrays(parameters), self.data)
        return measured.loss, len(self.data), {"eval_acc": measured.accuracy} if measured.accuracy is not None else {}


def _wait_for_server(address: str, seconds: float) -> None:
    """Flower's legacy transport does not retry a refused first connection: wait until the server listens."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise EdgeplugError(f"no fleet server answered at {address} within {seconds:.0f} s; "
                                    "start 'edgeplug fleet server' first or raise --wait") from None
            time.sleep(0.2)


def run_client(artifact_dir: Path, data: str | Path, address: str, work_dir: Path, *, seed: int = 0,
               wait: float = 60.0) -> None:
    """Connect one device to the server at `address` and train until the server ends the run."""
    address = loopback(address)
    device = FleetDevice(artifact_dir, work_dir, seed=seed)
    dataset = device.dataset(data)
    _wait_for_server(address, wait)
    start_client(server_address=address, client=DeviceClient(device, dataset).to_client(), insecure=True,
                 max_retries=30, max_wait_time=60.0)


def run_server(artifact_dir: Path, settings: FleetSettings, address: str, *, test: str | Path | None = None,
               work_dir: Path, force: bool = False, echo: Callable[[str], None] = print) -> list[RoundRecord]:
    """Serve `settings.rounds` rounds to `settings.clients` devices; write the global model into the folder."""
    settings.check()
    address = loopback(address)
    check_can_save(artifact_dir, force)
    server = FleetDevice(artifact_dir, work_dir, seed=0)
    names = server.trainable_names
    test_set = server.dataset(test) if test is not None else None
    rounds: list[RoundRecord] = []
    latest: dict[str, Any] = {"arrays": dict(server.initial), "started": time.perf_counter()}

    def evaluate_fn(server_round: int, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, dict[str, Scalar]] | None:
        arrays = dict(zip(names, parameters, strict=True))
        latest["arrays"] = arrays
        record = RoundRecord(server_round, time.perf_counter() - latest["started"])
        if test_set is not None:
            metrics = server.evaluate(arrays, test_set)
            record.eval_loss, record.eval_acc = metrics.loss, metrics.accuracy
        rounds.append(record)
        echo(f"round {server_round}/{settings.rounds}: " + (f"test_acc {'-' if record.eval_acc is None else format(record.eval_acc, '.3f')}  test_loss {record.eval_loss:.4f}"
                                                            if record.eval_loss is not None else "aggregated") + f"  ({record.seconds:.1f} s)")
        latest["started"] = time.perf_counter()
        return (record.eval_loss, {"eval_acc": record.eval_acc or 0.0}) if record.eval_loss is not None else None

    def fit_config(server_round: int) -> dict[str, Scalar]:
        config: dict[str, Scalar] = {"local-epochs": settings.local_epochs, "batch-size": settings.batch_size,
                                     "server-round": server_round}
        if settings.lr is not None:
            config["lr"] = settings.lr
        return config

    sampled = max(1, round(settings.clients * settings.fraction))
    strategy = LEGACY_STRATEGIES[settings.strategy](
        fraction_fit=settings.fraction, fraction_evaluate=0.0 if test_set is not None else settings.fraction,
        min_fit_clients=sampled, min_evaluate_clients=sampled, min_available_clients=settings.clients,
        initial_parameters=ndarrays_to_parameters([read_trainable(artifact_dir)[name] for name in names]),
        evaluate_fn=evaluate_fn, on_fit_config_fn=fit_config,
    )
    logging.getLogger("flwr").setLevel(logging.WARNING)
    start_server(server_address=address, config=ServerConfig(num_rounds=settings.rounds,
                 round_timeout=settings.timeout), strategy=strategy)
    final = {name: np.asarray(value) for name, value in latest["arrays"].items()}
    checkpoint = finish(artifact_dir, final, settings, rounds, force=force)
    echo(f"wrote the global model to {checkpoint}")
    return rounds

