"""Fleet training on Flower: simulation engines, the wire payload, hostile devices, resume.

Needs `flwr` (the `fleet` extra); skipped without it. The deployment on a SuperLink and
SuperNodes (`flwr run`, TLS, node authentication) is in tests/test_fleet_deployment.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from builders import FLEET_SPARSE_RECIPE
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("flwr")
pytest.importorskip("sklearn")

import onnx  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

import edgeplug  # noqa: E402
from edgeplug.cli import main  # noqa: E402
from edgeplug.errors import DataError, EdgeplugError  # noqa: E402
from edgeplug.fleet.apps import (  # noqa: E402
    DeviceData,
    FleetSettings,
    from_record,
    make_client_app,
    run_fleet,
    to_record,
    wire_bytes,
)
from edgeplug.fleet.device import FleetDevice  # noqa: E402
from edgeplug.fleet.params import read_trainable, read_values, travelling_names, update_problem  # noqa: E402
from edgeplug.fleet.partition import Partition, digits, split  # noqa: E402
from edgeplug.fleet.simulation import Devices, LocalGrid, quiet_flower, run_devices, server_identity, simulate  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "examples" / "digits_fewshot" / "pretrained_cnn.onnx"
# No freeze-bn: the CNN's batch norms train in batch mode and update their running statistics in place.
WITH_BN = "loss: cross-entropy\noptimizer: {name: adamw, lr: 0.01}\n"


@pytest.fixture(scope="module")
def sparse_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fleet")
    (root / "sparse.yaml").write_text(FLEET_SPARSE_RECIPE)
    edgeplug.rewrite(MODEL, root / "sparse.yaml", root / "sparse")
    return root / "sparse"


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "out"
    shutil.copytree(folder, target)  # the module's folder stays free of checkpoints
    return target


def _digits_npz(path: Path, start: int, stop: int) -> Path:
    x, y, tx, ty = digits("image")
    both = np.concatenate([x["image"], tx["image"]]), np.concatenate([y, ty])
    np.savez(path, image=both[0][start:stop], y=both[1][start:stop])
    return path


def _device_sets(folder: Path, clients: int, per_device: int = 60) -> tuple[list[edgeplug.data.Dataset], edgeplug.data.Dataset]:
    device = FleetDevice(folder)
    x, y, tx, ty = digits("image")
    sets = [device.dataset({"image": x["image"][i * per_device:(i + 1) * per_device], "y": y[i * per_device:(i + 1) * per_device]})
            for i in range(clients)]
    return sets, device.dataset({"image": tx["image"], "y": ty})


def test_three_devices_two_rounds_improve_checkpoint_every_round_and_export(sparse_folder: Path, tmp_path: Path) -> None:
    folder = _copy(sparse_folder, tmp_path)
    result = simulate(folder, FleetSettings(rounds=2, clients=3, batch_size=16), Partition.parse("dirichlet:0.5"), workers=1)
    accuracy = [r.eval_acc for r in result.rounds]
    assert [r.round for r in result.rounds] == [0, 1, 2]
    assert accuracy[2] is not None and accuracy[0] is not None and accuracy[2] > accuracy[0] + 0.02
    assert all(r.clients == 3 and r.dropped == 0 and r.upload_bytes_per_client > 0 for r in result.rounds[1:])
    # A global checkpoint per round, the newest named after its round; export picks it up.
    assert result.checkpoint is not None and result.checkpoint.name == "step-00000002"
    assert sorted(p.name for p in (folder / "checkpoints").glob("step-*")) == ["step-00000001", "step-00000002"]
    exported = edgeplug.export(folder, tmp_path / "global.onnx")
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(exported)).graph.initializer}
    for name, value in result.arrays.items():
        np.testing.assert_allclose(weights[name], value, rtol=1e-6)
    # A finished run is not silently extended or overwritten.
    with pytest.raises(EdgeplugError, match="finished fleet run"):
        simulate(folder, FleetSettings(rounds=2, clients=3), Partition.parse("iid"), workers=1)


@pytest.mark.slow
def test_two_worker_processes_train_the_same_model_as_one(sparse_folder: Path) -> None:
    """The local engine's worker pool (one process per core) changes where devices train, not what they send:
    each device shuffles by its own seed and replies are summed in node order."""
    sets, test_set = _device_sets(sparse_folder, 4)
    settings = FleetSettings(rounds=2, clients=4)
    with quiet_flower():
        pooled = run_devices(sparse_folder, settings, sets, test_set, workers=2, save=False)
        inline = run_devices(sparse_folder, settings, sets, test_set, workers=1, save=False)
    assert [r.clients for r in pooled.rounds[1:]] == [4, 4]
    for name, value in inline.arrays.items():
        np.testing.assert_allclose(pooled.arrays[name], value, rtol=1e-6, atol=1e-7)


def test_a_folder_with_training_checkpoints_is_refused_before_any_round(sparse_folder: Path, tmp_path: Path) -> None:
    folder = _copy(sparse_folder, tmp_path)
    x, y, _, _ = digits("image")
    edgeplug.Trainer(folder, progress=False).fit({"image": x["image"][:32], "y": y[:32]}, batch_size=16)
    with pytest.raises(EdgeplugError, match="--force"):
        simulate(folder, FleetSettings(rounds=1, clients=2), Partition.parse("iid"), workers=1)


def test_reply_carries_only_the_travelling_values(sparse_folder: Path) -> None:
    report = edgeplug.artifacts.read_report(sparse_folder)
    trainable = set(report["parameters"]["trainable"])
    forward = onnx.load(str(sparse_folder / "forward_model.onnx"))
    frozen = {i.name for i in forward.graph.initializer} - trainable
    assert frozen, "the sparse recipe must freeze something"
    assert set(travelling_names(sparse_folder)) == trainable  # freeze-bn: no statistic changes in training
    device = FleetDevice(sparse_folder, seed=1)
    x, y, _, _ = digits("image")
    data = DeviceData(device.dataset({"image": x["image"][:40], "y": y[:40]}))
    app = make_client_app(lambda context: (device, data))
    initial = read_trainable(sparse_folder)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with server_identity():
        reply = app(Message(RecordDict({"arrays": to_record(initial), "config": ConfigRecord({"local-epochs": 1, "batch-size": 8})}), 1, "train"), context)
        measured = app(Message(RecordDict({"arrays": to_record(initial), "config": ConfigRecord({})}), 1, "evaluate"), context)
    assert not measured.content.array_records  # evaluation sends metrics only
    metrics = measured.content.metric_records["metrics"]
    assert metrics["num-examples"] == 40 and 0.0 <= float(metrics["eval_acc"]) <= 1.0
    assert list(reply.content.array_records) == ["arrays"]
    sent: ArrayRecord = reply.content.array_records["arrays"]
    assert set(sent) == trainable and not set(sent) & frozen
    assert update_problem(from_record(sent), initial) is None
    assert not all(np.array_equal(sent[n].numpy(), initial[n]) for n in initial), "the device trained nothing"
    payload = sum(len(array.data) for array in sent.values())
    full = sum(onnx.numpy_helper.to_array(i).nbytes for i in forward.graph.initializer)
    assert payload < full / 10
    assert payload < wire_bytes(reply.content) < payload + 4096  # headers only on top of the arrays


def test_device_refuses_parameters_of_another_folder(sparse_folder: Path) -> None:
    device = FleetDevice(sparse_folder)
    wrong = dict(read_trainable(sparse_folder))
    wrong[sorted(wrong)[0]] = np.zeros((3, 3), dtype=np.float32)
    x, y, _, _ = digits("image")
    with pytest.raises(DataError, match="same rewritten folder"):
        device.fit(wrong, device.dataset({"image": x["image"][:8], "y": y[:8]}), epochs=1, batch_size=4)


@dataclasses.dataclass(frozen=True)
class Hostile(Devices):
    """Devices 1-4 misbehave in every round: NaN values, a wrong shape, a wrong dtype, a crash."""

    def client_app(self) -> ClientApp:
        honest = super().client_app()
        app = ClientApp()

        @app.train()
        def train(message: Message, context: Context) -> Message:
            partition = int(context.node_config["partition-id"])
            if partition == 4:
                raise RuntimeError("the device ran out of battery")
            reply = honest(message, context)
            arrays = from_record(reply.content.array_records["arrays"])
            name = sorted(arrays)[0]
            if partition == 1:
                arrays[name] = np.full_like(arrays[name], np.nan)
            elif partition == 2:
                arrays[name] = np.zeros((3, 3), dtype=np.float32)
            elif partition == 3:
                arrays[name] = arrays[name].astype(np.float64)
            return Message(RecordDict({"arrays": to_record(arrays), "metrics": reply.content.metric_records["metrics"]}), reply_to=message)

        return app


def test_bad_updates_are_dropped_with_a_logged_reason_and_the_round_goes_on(sparse_folder: Path, tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    folder = _copy(sparse_folder, tmp_path)
    sets, test_set = _device_sets(folder, 6)
    server = FleetDevice(folder)
    grid = LocalGrid(Hostile(folder, tuple(sets)), workers=1)
    caplog.set_level(logging.WARNING, logger="edgeplug.fleet")
    with quiet_flower(), server_identity():
        run = run_fleet(grid, folder, FleetSettings(rounds=2, clients=6), save=True,
                        evaluate=lambda arrays: {"eval_acc": server.evaluate(arrays, test_set).accuracy or 0.0})
    assert [(r.clients, r.dropped) for r in run.rounds[1:]] == [(2, 4), (2, 4)]
    assert all(np.isfinite(value).all() for value in run.arrays.values())
    initial = read_trainable(folder)
    assert any(not np.array_equal(run.arrays[name], initial[name]) for name in initial), "the honest updates were not aggregated"
    assert all(r.eval_acc is not None for r in run.rounds)
    reasons = " | ".join(record.getMessage() for record in caplog.records)
    assert "non-finite" in reasons and "[3, 3]" in reasons and "float64" in reasons and "ran out of battery" in reasons
    assert run.checkpoint is not None and (run.checkpoint / "trainer.json").is_file()


def test_batch_norm_statistics_travel_and_are_averaged(tmp_path: Path) -> None:
    (tmp_path / "bn.yaml").write_text(WITH_BN)
    edgeplug.rewrite(MODEL, tmp_path / "bn.yaml", tmp_path / "bn")
    folder = tmp_path / "bn"
    names = travelling_names(folder)
    statistics = [name for name in names if name not in edgeplug.artifacts.read_report(folder)["parameters"]["trainable"]]
    assert statistics and all("running" in name or "mean" in name or "var" in name for name in statistics), names
    sets, _ = _device_sets(folder, 2)
    with quiet_flower():
        run = run_devices(folder, FleetSettings(rounds=1, clients=2), sets, None, workers=1, save=False)
    initial = read_trainable(folder)
    # the devices' statistics reached the global model: it is not the initial one, and it is their mean
    assert any(not np.allclose(run.arrays[name], initial[name]) for name in statistics)
    device = FleetDevice(folder)
    local = [device.fit(initial, data, epochs=1, batch_size=16, round_seed=1, seed=1 + i).arrays for i, data in enumerate(sets)]
    for name in statistics:
        np.testing.assert_allclose(run.arrays[name], (local[0][name] + local[1][name]) / 2, rtol=1e-5, atol=1e-6)


@dataclasses.dataclass(frozen=True)
class Killed(Devices):
    """Device 0's process is killed (SIGKILL) in the middle of round 1."""

    def client_app(self) -> ClientApp:
        honest = super().client_app()
        app = ClientApp()

        @app.train()
        def train(message: Message, context: Context) -> Message:
            if int(context.node_config["partition-id"]) == 0 and message.content.config_records["config"]["server-round"] == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return honest(message, context)

        return app


def test_a_device_killed_mid_round_misses_that_round_only(sparse_folder: Path, tmp_path: Path) -> None:
    folder = _copy(sparse_folder, tmp_path)
    sets, _ = _device_sets(folder, 4)
    grid = LocalGrid(Killed(folder, tuple(sets)), workers=2)
    started = time.monotonic()
    try:
        with quiet_flower(), server_identity():
            run = run_fleet(grid, folder, FleetSettings(rounds=2, clients=4, timeout=8.0), save=False)
    finally:
        grid.close(terminate=True)
    assert run.rounds[1].clients < 4 and run.rounds[2].clients == 4
    assert time.monotonic() - started < 120


def test_a_killed_server_resumes_from_its_last_global_checkpoint(sparse_folder: Path, tmp_path: Path) -> None:
    """Kill `edgeplug fleet simulate` after round 2 of 4 (SIGKILL), start it again: it resumes after round 2
    and ends with exactly the global model of a run that was never interrupted."""
    folder = _copy(sparse_folder, tmp_path)
    command = [sys.executable, "-m", "edgeplug.cli", "fleet", "simulate", str(folder), "--clients", "3", "--rounds", "4",
               "--workers", "1", "--partition", "iid", "-o", str(tmp_path / "run.json")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert process.stdout is not None
    try:
        for line in process.stdout:
            if line.startswith("round 2/4"):
                process.send_signal(signal.SIGKILL)
                break
    finally:
        process.kill()
        process.wait(timeout=60)
    assert (folder / "checkpoints" / "step-00000002").is_dir()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming the fleet run after round 2 of 4" in again.stderr + again.stdout
    document = json.loads((tmp_path / "run.json").read_text())
    assert document["resumed_from"] == 2 and [r["round"] for r in document["rounds"]] == [0, 1, 2, 3, 4]
    reference = _copy(sparse_folder, tmp_path / "reference")
    with quiet_flower():
        uninterrupted = simulate(reference, FleetSettings(rounds=4, clients=3), Partition.parse("iid"), workers=1, save=False)
    resumed = read_values(folder / "checkpoints" / "step-00000004" / "state", travelling_names(folder))
    for name, value in uninterrupted.arrays.items():
        np.testing.assert_array_equal(resumed[name], value)


@given(st.integers(2, 12), st.floats(0.05, 5.0), st.sampled_from(["dirichlet", "iid", "distortion"]), st.integers(0, 3))
def test_split_deals_every_sample_once(clients: int, alpha: float, kind: str, seed: int) -> None:
    labels = np.repeat(np.arange(10), 12)
    x = {"image": np.random.default_rng(0).random((len(labels), 1, 4, 4)).astype(np.float32)}
    x["image"][:, 0, 0, 0] = np.arange(len(labels)) / len(labels)  # identifies each sample (iid/dirichlet)
    parts = split(x, labels, clients, Partition(kind, alpha), seed=seed)
    assert len(parts) == clients and all(len(p[1]) >= 2 for p in parts)
    assert sum(len(p[1]) for p in parts) == len(labels)
    assert sorted(np.concatenate([p[1] for p in parts]).tolist()) == sorted(labels.tolist())
    if kind != "distortion":
        ids = np.concatenate([p[0]["image"][:, 0, 0, 0] for p in parts])
        assert len(np.unique(ids)) == len(labels)


@given(st.sampled_from(["nan", "inf", "shape", "dtype", "missing", "extra"]), st.integers(0, 2))
def test_update_problem_names_every_kind_of_bad_update(kind: str, which: int) -> None:
    expected = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32), "c": np.zeros((1,), np.float32)}
    arrays = {name: value.copy() for name, value in expected.items()}
    name = sorted(arrays)[which]
    if kind == "nan":
        arrays[name].flat[0] = np.nan
    elif kind == "inf":
        arrays[name].flat[-1] = -np.inf
    elif kind == "shape":
        arrays[name] = np.zeros(arrays[name].size + 1, np.float32)
    elif kind == "dtype":
        arrays[name] = arrays[name].astype(np.float16)
    elif kind == "missing":
        del arrays[name]
    else:
        arrays["z"] = np.zeros(1, np.float32)
    problem = update_problem(arrays, expected)
    assert problem is not None and (name in problem or kind == "extra")
    assert update_problem(expected, expected) is None


def test_simulate_cli_prints_rounds_devices_a_table_and_valid_json(sparse_folder: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import jsonschema

    report = tmp_path / "fleet.json"
    arguments = ["fleet", "simulate", str(sparse_folder), "--clients", "2", "--rounds", "1", "--partition", "distortion",
                 "--workers", "1", "--no-save"]
    assert main(arguments) == 0
    out = capsys.readouterr().out
    assert "round 1/1: 2 devices trained" in out and "up B/client" in out
    assert "round 1: node 1 (device 0):" in out and "round 1: node 2 (device 1):" in out
    assert main([*arguments, "-o", str(report), "--json"]) == 0
    captured = capsys.readouterr()
    assert "round 1/1: 2 devices trained" in captured.err  # --json: information on stderr, one document on stdout
    document = json.loads(report.read_text())
    assert json.loads(captured.out) == document
    jsonschema.validate(document, json.loads((REPO / "schemas" / "fleet-simulation.schema.json").read_text()))
    assert document["trainable_values"] * 10 < document["full_values"]
    assert not (sparse_folder / "checkpoints").exists()  # --no-save


def test_simulate_cli_plots_accuracy_per_round(sparse_folder: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "rounds.png"
    assert main(["fleet", "simulate", str(sparse_folder), "--clients", "2", "--rounds", "2", "--workers", "1", "--no-save",
                 "--no-per-device", "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_app_cli_writes_a_flower_app_and_prints_its_run_config(sparse_folder: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet", "app", str(sparse_folder), "-o", str(tmp_path / "app"), "--clients", "3", "--rounds", "4", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["run_config"]["clients"] == 3 and document["run_config"]["rounds"] == 4
    text = (tmp_path / "app" / "pyproject.toml").read_text()
    assert 'serverapp = "edgeplug.fleet.flower_app:server_app"' in text and "rounds = 4" in text
    assert main(["fleet", "app", str(sparse_folder), "-o", str(tmp_path / "app"), "--clients", "3"]) == 2  # no --force


def test_cli_strategy_names_are_the_strategy_table() -> None:
    from edgeplug.fleet.apps import STRATEGIES
    from edgeplug.fleet.cli import STRATEGY_NAMES

    assert tuple(STRATEGIES) == STRATEGY_NAMES


def test_cli_errors_are_one_line(sparse_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet", "simulate", str(sparse_folder), "--partition", "zipf", "--no-save"]) == 2
    assert main(["fleet", "simulate", str(sparse_folder), "--strategy", "fedprox", "--no-save"]) == 2
    assert main(["fleet", "simulate", str(sparse_folder), "--clients", "3", "--min-clients", "4", "--no-save"]) == 2
    assert main(["fleet", "app", str(tmp_path), "-o", str(tmp_path / "app"), "--clients", "2"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("edgeplug: error: ") for line in errors)
    assert "dirichlet:ALPHA" in errors[0] and "fedavg" in errors[1] and "--min-clients" in errors[2] and "not an artifact folder" in errors[3]


def test_ray_backend_runs_the_same_app_on_flowers_simulation_engine(sparse_folder: Path, tmp_path: Path) -> None:
    """Flower's Simulation Engine (Ray actors) and the local engine train the same devices to the same model."""
    pytest.importorskip("ray")
    sets, test_set = _device_sets(sparse_folder, 3)
    settings = FleetSettings(rounds=2, clients=3)
    with quiet_flower():
        on_ray = run_devices(sparse_folder, settings, sets, test_set, backend="ray", workers=2, save=False)
        local = run_devices(sparse_folder, settings, sets, test_set, workers=1, save=False)
    assert [r.clients for r in on_ray.rounds[1:]] == [3, 3]
    for name, value in local.arrays.items():
        np.testing.assert_allclose(on_ray.arrays[name], value, rtol=1e-5, atol=1e-7)
