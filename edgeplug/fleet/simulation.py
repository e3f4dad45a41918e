"""`edgeplug fleet simulate`: a whole fleet in one process, on a non-IID split of real data.

Flower's own simulation engine runs ClientApps in Ray actors; on a CPU-class machine
with a couple of cores Ray's start-up and memory cost more than training a small
model. `InProcessGrid` serves Flower's `Grid` contract in this process instead: the
strategy (Flower's, unchanged) sends Messages, each sampled node's ClientApp handles
its message in turn, and the replies go back to the strategy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from edgeplug.data import Dataset
from edgeplug.errors import EdgeplugError
from edgeplug.fleet.apps import (
    DeviceData,
    FleetSettings,
    RoundRecord,
    finish,
    make_client_app,
    run_fleet,
)
from edgeplug.fleet.device import FleetDevice
from edgeplug.fleet.params import Arrays, check_can_save
from edgeplug.fleet.partition import Partition, digits, split


class InProcessGrid(Grid):
    """Flower's Grid, served in this process: nodes 1..N are ClientApp calls, one after another."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: Mapping[str, Any] | None = None) -> None:
        self._app = client_app
        self._run = Run.create_empty(run_id=1)
        self._contexts = {
            node: Context(run_id=1, node_id=node, node_config={"partition-id": node - 1, "num-partitions": num_nodes},
                          state=RecordDict(), run_config=dict(run_config or {}))
            for node in range(1, num_nodes + 1)
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            message.metadata.__dict__["_run_id"] = self._run.run_id
            self._replies[message_id] = self._app(message, self._contexts[message.metadata.dst_node_id])
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(message_id) for message_id in message_ids if message_id in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


@dataclasses.dataclass
class SimulationResult:
    rounds: list[RoundRecord]
    arrays: Arrays
    client_sizes: list[int]
    checkpoint: Path | None
    trainable_values: int
    full_values: int


def load_split(device: FleetDevice, clients: int, partition: Partition, *, data: str | Path | None = None,
               test: str | Path | None = None, seed: int = 0) -> tuple[list[Dataset], Dataset]:
    """Per-device training sets and the central test set: built-in digits unless `data`/`test` are given."""
    if (data is None) != (test is None):
        raise EdgeplugError("pass both --data and --test (or neither, for scikit-learn's digits)")
    if data is None:
        x, y, tx, ty = digits(device.single_input_name("--dataset digits"), seed=seed)
        train_set = device.dataset({**x, "y": y})
        test_set = device.dataset({**tx, "y": ty})
    else:
        train_set, test_set = device.dataset(data), device.dataset(test or data)
    parts = split(dict(train_set.inputs), train_set.labels, clients, partition, seed=seed)
    return [Dataset(x_part, y_part, f"device {i}") for i, (x_part, y_part) in enumerate(parts)], test_set


@contextlib.contextmanager
def _work_folder(work_dir: str | Path | None) -> Iterator[Path]:
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        yield Path(work_dir)
        return
    with tempfile.TemporaryDirectory(prefix="edgeplug-fleet-") as folder:
        yield Path(folder)


def simulate(artifact_dir: str | Path, settings: FleetSettings, partition: Partition, *,
             data: str | Path | None = None, test: str | Path | None = None, seed: int = 0,
             work_dir: str | Path | None = None, save: bool = True, force: bool = False,
             on_round: Callable[[RoundRecord], None] | None = None) -> SimulationResult:
    """Train `artifact_dir` across `settings.clients` simulated devices; write the global model into it."""
    settings.check()
    artifact_dir = Path(artifact_dir)
    if save:
        check_can_save(artifact_dir, force)
    with _work_folder(work_dir) as work:
        server = FleetDevice(artifact_dir, work / "server", seed=seed)
        client_sets, test_set = load_split(server, settings.clients, partition, data=data, test=test, seed=seed)
        devices: dict[int, FleetDevice] = {}

        def device_for(context: Context) -> tuple[FleetDevice, DeviceData]:
            index = int(context.node_config["partition-id"])
            if index not in devices:
                devices[index] = FleetDevice(artifact_dir, work / f"device-{index:04d}", seed=seed + 1 + index)
            return devices[index], DeviceData(client_sets[index])

        def evaluate(arrays: Arrays) -> dict[str, float]:
            metrics = server.evaluate(arrays, test_set)
            return {"eval_loss": metrics.loss, **({"eval_acc": metrics.accuracy} if metrics.accuracy is not None else {})}

        grid = InProcessGrid(make_client_app(device_for), settings.clients)
        with flower_in_process():
            arrays, rounds = run_fleet(grid, artifact_dir, settings, evaluate=evaluate, on_round=on_round)
    checkpoint = finish(artifact_dir, arrays, settings, rounds, force=force) if save else None
    return SimulationResult(rounds, arrays, [len(s) for s in client_sets], checkpoint,
                            sum(int(v.size) for v in arrays.values()), server.parameter_values())


@contextlib.contextmanager
def flower_in_process() -> Iterator[None]:
    """Run as Flower's simulation does (the process's task identity is the server's), without its INFO log:
    edgeplug prints its own table."""
    import logging

    logger = logging.getLogger("flwr")
    level = logger.level
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    logger.setLevel(logging.ERROR)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        logger.setLevel(level)
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def format_table(rounds: list[RoundRecord]) -> str:
    """The per-round table: accuracy, loss, bytes each device sent and received, seconds."""
    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [f"{'round':>5}  {'clients':>7}  {'train_loss':>10}  {'train_acc':>9}  {'test_loss':>9}  {'test_acc':>8}  "
             f"{'up B/client':>11}  {'down B/client':>13}  {'seconds':>7}"]
    for r in rounds:
        lines.append(f"{r.round:>5}  {r.clients:>7}  {cell(r.train_loss, '.4f'):>10}  {cell(r.train_acc, '.3f'):>9}  "
                     f"{cell(r.eval_loss, '.4f'):>9}  {cell(r.eval_acc, '.3f'):>8}  {r.upload_bytes_per_client:>11,.0f}  "
                     f"{r.download_bytes_per_client:>13,.0f}  {r.seconds:>7.2f}")
    return "\n".join(lines)

