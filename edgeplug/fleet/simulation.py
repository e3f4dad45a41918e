"""`edgeplug fleet simulate`: a whole fleet on this machine, on a split of real data.

Two engines run the same ServerApp logic (`run_fleet`, Flower's strategy) and the same
ClientApp (`make_client_app`):

* `local` (default): `LocalGrid` serves Flower's public `Grid` contract in this process;
  the strategy's Messages go to a pool of worker processes, one per core, each running the
  ClientApp for the devices it is handed (one `FleetDevice` per worker, reused for every
  device and round). Light: no Ray, no SuperLink, ~1-2 s to start.
* `ray`: Flower's Simulation Engine (`flwr.simulation.run_simulation`, Ray actors), for
  users who already run Flower simulations that way (`pip install "edgeplug[fleet-ray]"`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import queue
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity

from edgeplug.data import Dataset
from edgeplug.errors import EdgeplugError
from edgeplug.fleet.apps import (
    DeviceData,
    DeviceReport,
    FleetRun,
    FleetSettings,
    RoundRecord,
    from_record,
    make_client_app,
    run_fleet,
    to_record,
)
from edgeplug.fleet.device import FleetDevice
from edgeplug.fleet.params import Arrays
from edgeplug.fleet.partition import Partition, digits, split

BACKENDS = ("local", "ray")
STARTUP_SECONDS = 300.0


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def node_context(node: int, partition: int, num_partitions: int) -> Context:
    return Context(run_id=1, node_id=node, node_config={"partition-id": partition, "num-partitions": num_partitions},
                   state=RecordDict(), run_config={})


def handle(app: ClientApp, message: Message, context: Context) -> Message:
    """The ClientApp's reply, or an error reply naming what it raised (as Flower's engines report it)."""
    try:
        return app(message, context)
    except Exception as error:  # noqa: BLE001 - any failure of one device is that device's error reply
        reason = f"{type(error).__name__}: {' '.join(str(error).split())[:400]}"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


@dataclasses.dataclass(frozen=True)
class Devices:
    """Everything a worker needs to play every device: the folder and each device's data."""

    artifact_dir: Path
    datasets: tuple[Dataset, ...]
    threads: int = 1

    def client_app(self) -> ClientApp:
        device: list[FleetDevice] = []

        def device_for(context: Context) -> tuple[FleetDevice, DeviceData]:
            if not device:  # one FleetDevice per process plays every device in turn
                device.append(FleetDevice(self.artifact_dir, threads=self.threads))
            return device[0], DeviceData(self.datasets[int(context.node_config["partition-id"])])

        return make_client_app(device_for)


_WORKER: dict[str, Any] = {}
Plain = dict[str, dict[str, Any]]


def plain(content: RecordDict) -> Plain:
    """A RecordDict as plain Python (numpy arrays, numbers, strings) to cross a process boundary."""
    return {"arrays": {key: from_record(record) for key, record in content.array_records.items()},
            "metrics": {key: dict(record) for key, record in content.metric_records.items()},
            "configs": {key: dict(record) for key, record in content.config_records.items()}}


def unplain(value: Plain) -> RecordDict:
    return RecordDict({**{key: to_record(arrays) for key, arrays in value["arrays"].items()},
                       **{key: MetricRecord(metrics) for key, metrics in value["metrics"].items()},
                       **{key: ConfigRecord(config) for key, config in value["configs"].items()}})


def _start_worker(devices: Devices) -> None:
    logging.getLogger("flwr").setLevel(logging.ERROR)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    _WORKER.update(app=devices.client_app(), partitions=len(devices.datasets))


def _ready(_: int) -> int:
    time.sleep(0.05)  # long enough that every worker takes one: all have run their initializer
    return os.getpid()


def _run_chunk(chunk: list[tuple[str, int, str, Plain]]) -> list[tuple[str, Plain | str]]:
    """Play the devices of `chunk` in this worker: (key, content or the error reason) per message."""
    app, partitions = _WORKER["app"], _WORKER["partitions"]
    replies: list[tuple[str, Plain | str]] = []
    for key, node, message_type, content in chunk:
        reply = handle(app, Message(unplain(content), node, message_type), node_context(node, node - 1, partitions))
        replies.append((key, str(reply.error.reason) if reply.has_error() else plain(reply.content)))
    return replies


class LocalGrid(Grid):
    """Flower's Grid served on this machine: node i (1..N) is device i - 1, run in worker processes.

    `workers=1` runs the ClientApp inline (no process at all).
    """

    def __init__(self, devices: Devices, workers: int = 1, progress: Callable[[int, int], None] | None = None) -> None:
        self.devices = devices
        self.workers = workers
        self.progress = progress
        self._nodes = list(range(1, len(devices.datasets) + 1))
        self._pending: dict[str, Message] = {}
        self._replies: dict[str, Message] = {}
        self._inline: ClientApp | None = None
        self._pool: Any = None
        self._run: Any = None

    # -- Grid contract ---------------------------------------------------------------

    def set_run(self, run: Any) -> None:  # the strategy never asks: runs belong to a SuperLink
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        keys = []
        for message in messages:
            key = uuid.uuid4().hex
            self._pending[key] = message
            keys.append(key)
        return keys

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = list(message_ids)
        self._deliver([key for key in wanted if key in self._pending], None)
        return [self._replies.pop(key) for key in wanted if key in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        keys = list(self.push_messages(messages))
        self._deliver(keys, None if timeout is None else time.monotonic() + timeout)
        return [self._replies.pop(key) for key in keys if key in self._replies]

    # -- delivery --------------------------------------------------------------------

    def _deliver(self, keys: list[str], deadline: float | None) -> None:
        work = [(key, self._pending.pop(key)) for key in keys if key in self._pending]
        done = 0
        if self.workers <= 1:
            if self._inline is None:
                self._inline = self.devices.client_app()
            for key, message in work:
                if deadline is not None and time.monotonic() > deadline:
                    break  # the rest missed the round
                node = message.metadata.dst_node_id
                self._replies[key] = handle(self._inline, message, node_context(node, node - 1, len(self._nodes)))
                done += 1
                if self.progress:
                    self.progress(done, len(work))
            return
        pool = self._start_pool()
        size = max(1, min(64, len(work) // (self.workers * 8)))
        chunks = [[(key, message.metadata.dst_node_id, message.metadata.message_type, plain(message.content))
                   for key, message in work[i:i + size]] for i in range(0, len(work), size)]
        sent = dict(work)
        results = queue.SimpleQueue()  # type: ignore[var-annotated]
        for chunk in chunks:
            pool.apply_async(_run_chunk, (chunk,), callback=results.put, error_callback=lambda error, c=chunk: results.put(
                [(key, f"the worker process failed: {type(error).__name__}: {error}") for key, *_ in c]))
        for _ in chunks:
            try:
                replies = results.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                # the round is over: devices still training miss it, and their worker is replaced
                self.close(terminate=True)
                return
            for key, reply in replies:
                self._replies[key] = (Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reply), reply_to=sent[key])
                                      if isinstance(reply, str) else Message(unplain(reply), reply_to=sent[key]))
                done += 1
            if self.progress:
                self.progress(done, len(work))

    def start(self) -> None:
        """Start the worker processes now (before the first round, so that no round's time includes their start)."""
        if self.workers > 1:
            self._start_pool()

    def _start_pool(self) -> Any:
        """The worker processes, started and ready (their start-up, seconds on a loaded machine, is not a round's time)."""
        if self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers, initializer=_start_worker, initargs=(self.devices,))
            self._pool.map_async(_ready, range(self.workers), chunksize=1).get(timeout=STARTUP_SECONDS)
        return self._pool

    def close(self, terminate: bool = False) -> None:
        """Stop the worker processes (`terminate`: at once, even mid-device)."""
        if self._pool is not None:
            self._pool.terminate() if terminate else self._pool.close()
            self._pool.join()
            self._pool = None


@contextlib.contextmanager
def server_identity() -> Iterator[None]:
    """Messages the strategy builds take their sender from Flower's process-wide task identity,
    which only Flower's own runtimes set: set it (public setters) for the local engine."""
    saved = []
    for name in ("task_id", "run_id", "node_id"):
        try:
            saved.append(getattr(TaskIdentity, name))
        except RuntimeError:
            saved.append(None)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    try:
        yield
    finally:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = saved  # type: ignore[assignment]


@contextlib.contextmanager
def quiet_flower() -> Iterator[None]:
    """Flower logs every round at INFO (and warns that no federated evaluation runs: edgeplug evaluates
    centrally); edgeplug prints its own progress and table, and logs dropped updates itself."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclasses.dataclass
class SimulationResult:
    rounds: list[RoundRecord]
    arrays: Arrays
    client_sizes: list[int]
    checkpoint: Path | None
    trainable_values: int
    full_values: int
    resumed_from: int | None = None


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
    least = 2 if clients * 2 <= len(train_set) else 1  # a thousand devices on 1,348 digits: one or two samples each
    parts = split(dict(train_set.inputs), train_set.labels, clients, partition, seed=seed, min_samples=least)
    return [Dataset(x_part, y_part, f"device {i}") for i, (x_part, y_part) in enumerate(parts)], test_set


def run_devices(artifact_dir: str | Path, settings: FleetSettings, client_sets: list[Dataset], test_set: Dataset | None, *,
                backend: str = "local", workers: int | None = None, save: bool = True, force: bool = False,
                on_round: Callable[[RoundRecord], None] | None = None,
                on_device: Callable[[DeviceReport], None] | None = None,
                progress: Callable[[int, int], None] | None = None) -> FleetRun:
    """Train `artifact_dir` across one simulated device per dataset of `client_sets` on `backend`."""
    if backend not in BACKENDS:
        raise EdgeplugError(f"unknown backend '{backend}'; choose {' or '.join(BACKENDS)}")
    if len(client_sets) != settings.clients:
        raise EdgeplugError(f"{len(client_sets)} device datasets for {settings.clients} clients")
    artifact_dir = Path(artifact_dir)
    workers = min(workers or usable_cores(), settings.clients)
    server = FleetDevice(artifact_dir, threads=usable_cores() if workers == 1 else 1)

    def evaluate(arrays: Arrays) -> dict[str, float]:
        if test_set is None:
            return {}
        metrics = server.evaluate(arrays, test_set)
        return {"eval_loss": metrics.loss, **({"eval_acc": metrics.accuracy} if metrics.accuracy is not None else {})}

    devices = Devices(artifact_dir.resolve(), tuple(client_sets))
    with quiet_flower():
        if backend == "ray":
            return _run_on_ray(devices, settings, workers, evaluate, save=save, force=force, on_round=on_round, on_device=on_device)
        grid = LocalGrid(devices, workers, progress)
        try:
            grid.start()
            with server_identity():
                return run_fleet(grid, artifact_dir, settings, evaluate=evaluate, on_round=on_round, on_device=on_device,
                                 save=save, force=force)
        finally:
            grid.close()


def _run_on_ray(devices: Devices, settings: FleetSettings, workers: int, evaluate: Callable[[Arrays], dict[str, float]], *,
                save: bool, force: bool, on_round: Callable[[RoundRecord], None] | None,
                on_device: Callable[[DeviceReport], None] | None) -> FleetRun:
    """The same ServerApp logic and ClientApp on Flower's Simulation Engine (one Ray actor per core)."""
    try:
        import ray  # noqa: F401
        from flwr.simulation import run_simulation
    except ImportError:
        raise EdgeplugError("--backend ray needs Flower's simulation extra: pip install 'edgeplug[fleet-ray]'") from None
    outcome: list[FleetRun] = []
    failures: list[BaseException] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome.append(run_fleet(grid, devices.artifact_dir, settings, evaluate=evaluate, on_round=on_round,
                                     on_device=on_device, save=save, force=force))
        except BaseException as error:
            failures.append(error)
            raise

    config = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
              "init_args": {"num_cpus": workers, "num_gpus": 0, "include_dashboard": False, "log_to_driver": False}}
    run_simulation(server_app=server_app, client_app=devices.client_app(), num_supernodes=settings.clients,
                   backend_name="ray", backend_config=config)  # type: ignore[arg-type]
    if failures:
        raise failures[0]
    if not outcome:
        raise EdgeplugError("Flower's Simulation Engine ended without running the fleet; see its log above")
    return outcome[0]


def simulate(artifact_dir: str | Path, settings: FleetSettings, partition: Partition, *,
             data: str | Path | None = None, test: str | Path | None = None, seed: int = 0,
             save: bool = True, force: bool = False, backend: str = "local", workers: int | None = None,
             on_round: Callable[[RoundRecord], None] | None = None,
             on_device: Callable[[DeviceReport], None] | None = None,
             progress: Callable[[int, int], None] | None = None) -> SimulationResult:
    """Train `artifact_dir` across `settings.clients` simulated devices; write the global model into it."""
    settings.check()
    artifact_dir = Path(artifact_dir)
    probe = FleetDevice(artifact_dir)
    client_sets, test_set = load_split(probe, settings.clients, partition, data=data, test=test, seed=seed)
    run = run_devices(artifact_dir, settings, client_sets, test_set, backend=backend, workers=workers, save=save, force=force,
                      on_round=on_round, on_device=on_device, progress=progress)
    return SimulationResult(run.rounds, run.arrays, [len(s) for s in client_sets], run.checkpoint,
                            sum(int(v.size) for v in run.arrays.values()), probe.parameter_values(), run.resumed_from)


def format_table(rounds: list[RoundRecord]) -> str:
    """The per-round table: accuracy, loss, bytes each device sent and received, seconds."""
    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [f"{'round':>5}  {'clients':>7}  {'dropped':>7}  {'train_loss':>10}  {'train_acc':>9}  {'test_loss':>9}  {'test_acc':>8}  "
             f"{'up B/client':>11}  {'down B/client':>13}  {'seconds':>7}"]
    for r in rounds:
        lines.append(f"{r.round:>5}  {r.clients:>7}  {r.dropped:>7}  {cell(r.train_loss, '.4f'):>10}  {cell(r.train_acc, '.3f'):>9}  "
                     f"{cell(r.eval_loss, '.4f'):>9}  {cell(r.eval_acc, '.3f'):>8}  {r.upload_bytes_per_client:>11,.0f}  "
                     f"{r.download_bytes_per_client:>13,.0f}  {r.seconds:>7.2f}")
    return "\n".join(lines)


def print_progress(done: int, total: int) -> None:
    """A one-line live count of the devices that have answered this round (stderr, terminals only)."""
    if sys.stderr.isatty():
        print(f"\r  {done}/{total} devices", end="" if done < total else "\r\x1b[K", file=sys.stderr, flush=True)
