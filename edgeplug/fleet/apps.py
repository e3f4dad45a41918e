"""The Flower side: a ClientApp around a `FleetDevice`, and the one strategy loop every engine runs.

Message API of Flower (ClientApp / ServerApp, `flwr.serverapp.strategy`). A train
message carries the global travelling arrays by name (ArrayRecord "arrays") and the
round's settings (ConfigRecord "config"); the reply carries the trained arrays,
"num-examples" and local metrics (MetricRecord "metrics").

`run_fleet` drives a Flower strategy on any Flower `Grid`: the deployment's (SuperLink,
`flwr run`), the Simulation Engine's (Ray) or edgeplug's local one. It adds what a fleet
of unreliable devices needs around Flower's aggregation: every update is checked (names,
shapes, dtypes, finite values, a positive example count) and a bad one is dropped with
its reason logged; a round waits at most `timeout` seconds for replies and for devices
to connect; the global model is written into the folder after every round, and a
restarted server resumes after the last round it wrote.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
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

from edgeplug.data import Dataset
from edgeplug.errors import EdgeplugError, OutputError
from edgeplug.fleet.device import FleetDevice
from edgeplug.fleet.params import (
    Arrays,
    check_can_save,
    fleet_checkpoint,
    read_trainable,
    save_global_model,
    update_problem,
)

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
LOG = logging.getLogger("edgeplug.fleet")


@dataclasses.dataclass
class DeviceData:
    """What one device holds: its training data and, optionally, local evaluation data."""

    train: Dataset
    eval: Dataset | None = None


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_record(record: ArrayRecord) -> Arrays:
    return {name: array.numpy() for name, array in record.items()}


def wire_bytes(obj: Any) -> int:
    """Bytes of a Message or record as Flower serialises it for transport: every object of its tree, deflated
    (each distinct object once, as Flower sends it)."""
    seen: dict[str, int] = {}

    def walk(node: Any) -> None:
        if node.object_id in seen:
            return
        seen[node.object_id] = len(node.deflate())
        for child in (node.children or {}).values():
            walk(child)

    walk(obj)
    return sum(seen.values())


def make_client_app(device_for: Callable[[Context], tuple[FleetDevice, DeviceData]]) -> ClientApp:
    """A ClientApp whose node trains `device_for(context)` on its own data.

    Replies carry only the travelling arrays (trainable parameters and in-place statistics).
    """
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        device, data = device_for(context)
        config: dict[str, Any] = dict(message.content.config_records["config"])
        result = device.fit(
            from_record(message.content.array_records["arrays"]), data.train, epochs=int(config.get("local-epochs", 1)),
            batch_size=int(config.get("batch-size", 16)), lr=float(config["lr"]) if "lr" in config else None,
            round_seed=int(config.get("server-round", 0)), seed=_device_seed(context, device),
        )
        metrics: dict[str, Any] = {"num-examples": result.num_examples, "train_loss": result.train.loss,
                                   "train_seconds": result.seconds}
        if result.train.accuracy is not None:
            metrics["train_acc"] = result.train.accuracy
        if "partition-id" in context.node_config:
            metrics["partition-id"] = int(context.node_config["partition-id"])
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


def _device_seed(context: Context, device: FleetDevice) -> int:
    """Each device shuffles its own way: node config `seed`, else 1 + partition id, else the device's seed."""
    config = context.node_config
    if "seed" in config:
        return int(config["seed"])
    if "partition-id" in config:
        return 1 + int(config["partition-id"])
    return device.seed


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
    timeout: float = 600.0
    """Seconds a round waits for its replies; devices that have not answered by then are left out of it."""
    min_clients: int | None = None
    """Devices a round needs to start (default: all `clients`); rounds after a device died go on without it."""
    wait: float = 600.0
    """Seconds to wait for `min_clients` devices to connect before a round, then give up with an error."""

    def check(self) -> None:
        if self.strategy not in STRATEGIES:
            raise EdgeplugError(f"unknown strategy '{self.strategy}'; choose one of {', '.join(STRATEGIES)}")
        if self.rounds < 1 or self.clients < 1 or self.local_epochs < 1 or self.batch_size < 1:
            raise EdgeplugError("rounds, clients, local epochs and batch size must be at least 1")
        if not 0.0 < self.fraction <= 1.0:
            raise EdgeplugError(f"--fraction must be in (0, 1], not {self.fraction}")
        if not (self.timeout > 0 and self.wait > 0):
            raise EdgeplugError("the round timeout and the wait for devices must be positive")
        if self.min_clients is not None and not 1 <= self.min_clients <= self.clients:
            raise EdgeplugError(f"--min-clients must be between 1 and --clients ({self.clients}), not {self.min_clients}")

    @property
    def needed(self) -> int:
        return self.clients if self.min_clients is None else self.min_clients


@dataclasses.dataclass
class RoundRecord:
    """One row of the per-round table."""

    round: int
    seconds: float
    clients: int = 0
    dropped: int = 0
    upload_bytes_per_client: float = 0.0
    download_bytes_per_client: float = 0.0
    train_loss: float | None = None
    train_acc: float | None = None
    eval_loss: float | None = None
    eval_acc: float | None = None


@dataclasses.dataclass(frozen=True)
class DeviceReport:
    """One device's reply in one round, as the console shows it."""

    round: int
    node: int
    partition: int | None
    examples: int
    upload_bytes: int
    train_loss: float | None
    train_acc: float | None
    seconds: float | None
    dropped: str | None = None
    """Why the update was left out of the aggregate (None: aggregated)."""


def reply_problem(reply: Message, expected: Mapping[str, np.ndarray]) -> str | None:
    """Why a training reply cannot be aggregated, or None."""
    if reply.has_error():
        return f"the device failed: {' '.join(str(reply.error.reason).split())[:300]}"
    content = reply.content
    if list(content.array_records) != ["arrays"] or list(content.metric_records) != ["metrics"]:
        return f"the reply holds records {sorted(content.array_records)} / {sorted(content.metric_records)}, not 'arrays' and 'metrics'"
    try:
        arrays = from_record(content.array_records["arrays"])
    except Exception as error:  # noqa: BLE001 - a malformed Array: whatever numpy says
        return f"its arrays do not decode ({type(error).__name__}: {str(error)[:200]})"
    problem = update_problem(arrays, expected)
    if problem is not None:
        return problem
    examples = content.metric_records["metrics"].get("num-examples")
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        return f"num-examples is {examples!r}, not a positive whole number"
    return None


def wait_for_devices(grid: Grid, needed: int, seconds: float) -> list[int]:
    """The connected node ids once at least `needed` are connected; an error after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= needed:
            return nodes
        if time.monotonic() > deadline:
            raise EdgeplugError(f"only {len(nodes)} of the {needed} devices a round needs connected within {seconds:.0f} s; "
                                "start more devices, lower --min-clients or raise --wait")
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))


def make_strategy(settings: FleetSettings, expected: Mapping[str, np.ndarray], *, round_offset: int = 0,
                  on_device: Callable[[DeviceReport], None] | None = None,
                  on_train: Callable[[int, list[RecordDict], int], None] | None = None) -> Any:
    """The Flower strategy of `settings.strategy`, with edgeplug's checks around its aggregation.

    Rounds are numbered from `round_offset` + 1 (a resumed run continues its numbering).
    `on_device` sees every reply (kept or dropped); `on_train` the kept replies' contents
    and the number dropped, before Flower's own averaging.
    """
    settings.check()
    base = STRATEGIES[settings.strategy]

    class EdgeplugStrategy(base):  # type: ignore[misc,valid-type]
        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
            nodes = wait_for_devices(grid, settings.needed, settings.wait)
            sample = max(1, min(len(nodes), round(len(nodes) * settings.fraction)))
            # Flower's sampling would wait, unbounded, for min_available_nodes: bounded above instead
            self.min_available_nodes = self.min_train_nodes = sample
            return super().configure_train(server_round + round_offset, arrays, config, grid)

        def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
            kept, dropped = [], 0
            number = server_round + round_offset
            for reply in replies:
                problem = reply_problem(reply, expected)
                if problem is not None:
                    dropped += 1
                    LOG.warning("round %d: dropped the update of node %d: %s", number, reply.metadata.src_node_id, problem)
                else:
                    kept.append(reply)
                if on_device is not None:
                    on_device(_device_report(number, reply, problem))
            if on_train is not None:
                on_train(number, [reply.content for reply in kept], dropped)
            if not kept:
                LOG.warning("round %d: no update to aggregate; the global model stays as it was", number)
                return None, None
            # replies arrive in any order; summed in node order, the same updates give the same global model
            kept.sort(key=lambda reply: reply.metadata.src_node_id)
            return super().aggregate_train(server_round, kept)

    return EdgeplugStrategy(fraction_train=settings.fraction, fraction_evaluate=0.0, min_train_nodes=1,
                            min_evaluate_nodes=0, min_available_nodes=1)


def _device_report(number: int, reply: Message, problem: str | None) -> DeviceReport:
    metrics: Mapping[str, Any] = {} if reply.has_error() or "metrics" not in reply.content.metric_records else \
        reply.content.metric_records["metrics"]
    partition = metrics.get("partition-id")
    examples = metrics.get("num-examples")
    return DeviceReport(number, reply.metadata.src_node_id, int(partition) if isinstance(partition, int) else None,
                        int(examples) if isinstance(examples, int) else 0,
                        0 if reply.has_error() else wire_bytes(reply.content),
                        _number(metrics.get("train_loss")), _number(metrics.get("train_acc")), _number(metrics.get("train_seconds")),
                        problem)


def train_config(settings: FleetSettings) -> ConfigRecord:
    config: dict[str, Any] = {"local-epochs": settings.local_epochs, "batch-size": settings.batch_size}
    if settings.lr is not None:
        config["lr"] = settings.lr
    return ConfigRecord(config)


@dataclasses.dataclass
class FleetRun:
    """What `run_fleet` produced: the final global values, every round (resumed ones included)."""

    arrays: Arrays
    rounds: list[RoundRecord]
    resumed_from: int | None = None
    checkpoint: Path | None = None


def run_fleet(grid: Grid, artifact_dir: Path, settings: FleetSettings, *,
              evaluate: Callable[[Arrays], Mapping[str, float]] | None = None,
              on_round: Callable[[RoundRecord], None] | None = None,
              on_device: Callable[[DeviceReport], None] | None = None,
              save: bool = True, force: bool = False) -> FleetRun:
    """Run the strategy from the folder's values (or its last global checkpoint); the final values and the rounds.

    With `save`, the global model is written into the folder's checkpoints after every
    round; a folder whose newest checkpoint is an unfinished fleet run resumes after its
    last round, and any other training checkpoint is refused unless `force` (start over).
    Upload bytes are those of each training reply's content as Flower serialises it
    (arrays and metrics); download bytes those of the train message's content.
    """
    settings.check()
    artifact_dir = Path(artifact_dir)
    initial = read_trainable(artifact_dir)
    done, history, arrays_now = 0, [], initial
    if save:
        resumed = None if force else fleet_checkpoint(artifact_dir)
        if resumed is not None:
            record, values = resumed
            if record["round"] >= settings.rounds:
                raise OutputError(f"{artifact_dir} already holds the global model of a finished fleet run (round {record['round']} of "
                                  f"{record.get('rounds')}); pass --force to start over, or ask for more --rounds to go on")
            problem = update_problem(values, initial)
            if problem is not None:
                raise OutputError(f"the global checkpoint in {artifact_dir} does not fit the folder ({problem}); pass --force to start over")
            done, arrays_now = int(record["round"]), values
            history = [RoundRecord(**row) for row in record.get("history", []) if isinstance(row, dict)]
            LOG.warning("resuming the fleet run after round %d of %d (global checkpoint in %s)", done, settings.rounds, artifact_dir)
        elif not force:
            check_can_save(artifact_dir, force)
    config = train_config(settings)
    rounds: list[RoundRecord] = list(history)
    pending: dict[str, Any] = {"started": time.perf_counter(), "replies": [], "dropped": 0, "checkpoint": None,
                               "download": wire_bytes(RecordDict({"arrays": to_record(arrays_now), "config": config}))}

    def on_train(number: int, contents: list[RecordDict], dropped: int) -> None:
        pending["replies"], pending["dropped"] = contents, dropped

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        number = server_round + done
        values = from_record(arrays)
        if server_round == 0 and done:
            return None  # the resumed model was evaluated in the round that wrote it
        metrics: dict[str, Any] = dict(evaluate(values)) if evaluate else {}
        record = RoundRecord(number, time.perf_counter() - pending["started"])
        record.eval_loss, record.eval_acc = metrics.get("eval_loss"), metrics.get("eval_acc")
        replies: list[RecordDict] = pending["replies"]
        if server_round > 0:
            record.clients, record.dropped = len(replies), pending["dropped"]
            record.download_bytes_per_client = pending["download"]
            if replies:
                record.upload_bytes_per_client = float(np.mean([wire_bytes(reply) for reply in replies]))
                train = _weighted(replies, "num-examples")
                record.train_loss, record.train_acc = train.get("train_loss"), train.get("train_acc")
        rounds.append(record)
        if save and server_round > 0:
            summary = {"round": number, "rounds": settings.rounds, "strategy": settings.strategy, "clients": settings.clients,
                       "history": [dataclasses.asdict(r) for r in rounds]}
            pending["checkpoint"] = save_global_model(artifact_dir, values, summary, replace_all=(number == 1))
        if on_round:
            on_round(record)
        pending.update(started=time.perf_counter(), replies=[], dropped=0,
                       download=wire_bytes(RecordDict({"arrays": arrays, "config": config})))
        return MetricRecord(metrics) if metrics else None

    strategy = make_strategy(settings, initial, round_offset=done, on_device=on_device, on_train=on_train)
    result = strategy.start(grid=grid, initial_arrays=to_record(arrays_now), num_rounds=settings.rounds - done,
                            timeout=settings.timeout, train_config=config, evaluate_fn=evaluate_fn)
    final = from_record(result.arrays) if result.arrays is not None and len(result.arrays) else arrays_now
    return FleetRun(final, rounds, done or None, pending["checkpoint"])


def _weighted(replies: list[RecordDict], weight_key: str) -> dict[str, float]:
    """Example-weighted means of the numeric train metrics of the kept replies."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for reply in replies:
        metrics = reply.metric_records["metrics"]
        weight = _number(metrics[weight_key]) or 0.0
        for key in ("train_loss", "train_acc"):
            value = metrics.get(key)
            if isinstance(value, (int, float)) and np.isfinite(value):
                sums[key] = sums.get(key, 0.0) + weight * float(value)
                weights[key] = weights.get(key, 0.0) + weight
    return {key: sums[key] / weights[key] for key in sums}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
