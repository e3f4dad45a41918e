"""The Flower side: a ClientApp around a `FleetDevice`, and the strategy loop of the server.

Message API of Flower >= 1.21 (ClientApp / ServerApp, `flwr.serverapp.strategy`).
A train message carries the global trainable arrays by name (ArrayRecord "arrays") and
the round's settings (ConfigRecord "config"); the reply carries the trained trainable
arrays, "num-examples" and local metrics (MetricRecord "metrics").
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore.inflatable.inflatable_object import (
    InflatableObject,
    get_all_nested_objects,
)

from edgeplug.data import Dataset
from edgeplug.errors import EdgeplugError
from edgeplug.fleet.device import FleetDevice
from edgeplug.fleet.params import Arrays, read_trainable, save_global_model

# Strategies that need nothing from the client beyond FedAvg's contract (FedProx would
# need a proximal term in the local loss, which a device's training graph does not have).
STRATEGIES: dict[str, Callable[..., Any]] = {
    "fedavg": flwr_strategy.FedAvg,
    "fedavgm": flwr_strategy.FedAvgM,
    "fedadam": flwr_strategy.FedAdam,
    "fedyogi": flwr_strategy.FedYogi,
    "fedadagrad": flwr_strategy.FedAdagrad,
    "fedmedian": flwr_strategy.FedMedian,
    "fedtrimmedavg": flwr_strategy.FedTrimmedAvg,
}


@dataclasses.dataclass
class DeviceData:
    """What one device holds: its training data and, optionally, local evaluation data."""

    train: Dataset
    eval: Dataset | None = None


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_record(record: ArrayRecord) -> Arrays:
    return {name: array.numpy() for name, array in record.items()}


def wire_bytes(obj: InflatableObject) -> int:
    """Bytes of a Message or record as Flower serialises it for transport: every object of its tree, deflated."""
    return sum(len(part.deflate()) for part in get_all_nested_objects(obj).values())


def make_client_app(device_for: Callable[[Context], tuple[FleetDevice, DeviceData]]) -> ClientApp:
    """A ClientApp whose node trains `device_for(context)` on its own data.

    Replies carry only the trainable arrays the device's checkpoint marks as such.
    """
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        device, data = device_for(context)
        config: dict[str, Any] = dict(message.content.config_records["config"])
        result = device.fit(
            from_record(message.content.array_records["arrays"]), data.train, epochs=int(config.get("local-epochs", 1)),
            batch_size=int(config.get("batch-size", 16)), lr=float(config["lr"]) if "lr" in config else None,
            round_seed=int(config.get("server-round", 0)),
        )
        metrics: dict[str, Any] = {"num-examples": result.num_examples, "train_loss": result.train.loss, "train_seconds": result.seconds}
        if result.train.accuracy is not None:
            metrics["train_acc"] = result.train.accuracy
        return Message(RecordDict({"arrays": to_record(result.arrays), "metrics": MetricRecord(metrics)}), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        device, data = device_for(context)
        dataset = data.eval or data.train
        measured = device.evaluate(from_record(message.content.array_records["arrays"]), dataset)
        metrics: dict[str, Any] = {"num-examples": len(dataset), "eval_loss": measured.loss}
        if measured.accuracy is not None:
            metrics["eval_acc"] = measured.accuracy
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)

    return app


@dataclasses.dataclass(frozen=True)
class FleetSettings:
    """Server-side settings of a fleet run."""

    rounds: int
    clients: int
    strategy: str = "fedavg"
    fraction: float = 1.0
    local_epochs: int = 1
    batch_size: int = 16
    lr: float | None = None
    timeout: float = 3600.0

    def check(self) -> None:
        if self.strategy not in STRATEGIES:
            raise EdgeplugError(f"unknown strategy '{self.strategy}'; choose one of {', '.join(STRATEGIES)}")
        if self.rounds < 1 or self.clients < 1 or self.local_epochs < 1 or self.batch_size < 1:
            raise EdgeplugError("rounds, clients, local epochs and batch size must be at least 1")
        if not 0.0 < self.fraction <= 1.0:
            raise EdgeplugError(f"--fraction must be in (0, 1], not {self.fraction}")


def make_strategy(settings: FleetSettings, on_train: Callable[[list[RecordDict]], None] | None = None) -> Any:
    """The Flower strategy, waiting for the whole fleet and sampling `fraction` of it per round.

    Evaluation is central (the server's test set, after every aggregation); the
    ClientApp still answers evaluate messages for strategies that send them.

    `on_train` sees every round's training replies before Flower's own metric averaging.
    """
    settings.check()
    sampled = max(1, round(settings.clients * settings.fraction))

    def train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
        if on_train:
            on_train(records)
        return aggregate_metricrecords(records, weight_key)

    return STRATEGIES[settings.strategy](
        fraction_train=settings.fraction, fraction_evaluate=0.0,
        min_train_nodes=sampled, min_evaluate_nodes=sampled, min_available_nodes=settings.clients,
        train_metrics_aggr_fn=train_metrics,
    )


def train_config(settings: FleetSettings) -> ConfigRecord:
    config: dict[str, Any] = {"local-epochs": settings.local_epochs, "batch-size": settings.batch_size}
    if settings.lr is not None:
        config["lr"] = settings.lr
    return ConfigRecord(config)


@dataclasses.dataclass
class RoundRecord:
    """One row of the per-round table."""

    round: int
    seconds: float
    clients: int = 0
    upload_bytes_per_client: float = 0.0
    download_bytes_per_client: float = 0.0
    train_loss: float | None = None
    train_acc: float | None = None
    eval_loss: float | None = None
    eval_acc: float | None = None


def run_fleet(grid: Grid, artifact_dir: Path, settings: FleetSettings, *,
              evaluate: Callable[[Arrays], Mapping[str, float]] | None = None,
              on_round: Callable[[RoundRecord], None] | None = None) -> tuple[Arrays, list[RoundRecord]]:
    """Run the strategy from the folder's initial trainable values; the final global values and the rounds.

    Upload bytes are those of each training reply's content as Flower serialises it
    (arrays and metrics); download bytes those of the train message's content.
    """
    initial = read_trainable(artifact_dir)
    config = train_config(settings)
    rounds: list[RoundRecord] = []
    pending: dict[str, Any] = {"arrays": to_record(initial), "started": time.perf_counter(), "replies": []}

    def on_train(records: list[RecordDict]) -> None:
        pending["replies"] = records

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        metrics: dict[str, Any] = dict(evaluate(from_record(arrays))) if evaluate else {}
        record = RoundRecord(server_round, time.perf_counter() - pending["started"])
        record.eval_loss, record.eval_acc = metrics.get("eval_loss"), metrics.get("eval_acc")
        replies: list[RecordDict] = pending["replies"]
        if server_round > 0 and replies:
            record.clients = len(replies)
            record.upload_bytes_per_client = float(np.mean([wire_bytes(reply) for reply in replies]))
            record.download_bytes_per_client = float(wire_bytes(RecordDict({"arrays": pending["arrays"], "config": config})))
            train = aggregate_metricrecords(replies, "num-examples")
            record.train_loss = _number(train.get("train_loss"))
            record.train_acc = _number(train.get("train_acc"))
        rounds.append(record)
        if on_round:
            on_round(record)
        pending.update(arrays=arrays, started=time.perf_counter(), replies=[])
        return MetricRecord(metrics) if metrics else None

    result = make_strategy(settings, on_train).start(
        grid=grid, initial_arrays=to_record(initial), num_rounds=settings.rounds,
        timeout=settings.timeout, train_config=config, evaluate_fn=evaluate_fn)
    final = from_record(result.arrays) if result.arrays is not None and len(result.arrays) else initial
    return final, rounds


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def finish(artifact_dir: Path, arrays: Arrays, settings: FleetSettings, rounds: list[RoundRecord], *, force: bool) -> Path:
    """Write the global model into the artifact folder's checkpoints (for export and further training)."""
    summary = {"strategy": settings.strategy, "rounds": settings.rounds, "clients": settings.clients,
               "final": dataclasses.asdict(rounds[-1]) if rounds else None}
    return save_global_model(artifact_dir, arrays, summary, force=force)
