"""Fleet training on Flower: simulation, the wire payload, real processes on loopback.

Needs `flwr` (the `fleet` extra); skipped without it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("flwr")
pytest.importorskip("sklearn")

import onnx  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402

import edgeplug  # noqa: E402
from edgeplug.cli import main  # noqa: E402
from edgeplug.errors import DataError, EdgeplugError  # noqa: E402
from edgeplug.fleet.apps import (  # noqa: E402
    DeviceData,
    FleetSettings,
    make_client_app,
    to_record,
    wire_bytes,
)
from edgeplug.fleet.device import FleetDevice  # noqa: E402
from edgeplug.fleet.params import read_trainable  # noqa: E402
from edgeplug.fleet.partition import Partition, digits, split  # noqa: E402
from edgeplug.fleet.simulation import flower_in_process, simulate  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "examples" / "digits_fewshot" / "pretrained_cnn.onnx"
SPARSE = """loss: cross-entropy
optimizer: {name: adamw, lr: 0.01}
passes:
  - name: sparse-update
    options: {strategy: static, memory_budget_bytes: 100000, batch_size: 16, channel_ratio: 0.0625, min_channel_ratio: 0.0625}
  - name: freeze-bn
    options: {layers: all}
"""


@pytest.fixture(scope="module")
def sparse_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fleet")
    (root / "sparse.yaml").write_text(SPARSE)
    edgeplug.rewrite(MODEL, root / "sparse.yaml", root / "sparse")
    return root / "sparse"


def _digits_npz(path: Path, start: int, stop: int) -> Path:
    x, y, tx, ty = digits("image")
    both = np.concatenate([x["image"], tx["image"]]), np.concatenate([y, ty])
    np.savez(path, image=both[0][start:stop], y=both[1][start:stop])
    return path


def test_three_devices_two_rounds_improve_and_export(sparse_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    shutil.copytree(sparse_folder, folder)  # the module's folder stays free of checkpoints
    result = simulate(folder, FleetSettings(rounds=2, clients=3, batch_size=16), Partition.parse("dirichlet:0.5"))
    accuracy = [r.eval_acc for r in result.rounds]
    assert [r.round for r in result.rounds] == [0, 1, 2]
    assert accuracy[2] is not None and accuracy[0] is not None and accuracy[2] > accuracy[0] + 0.02
    assert all(r.clients == 3 and r.upload_bytes_per_client > 0 for r in result.rounds[1:])
    # The global model is a checkpoint `edgeplug export` picks up, with the aggregated values.
    assert result.checkpoint is not None and result.checkpoint.parent == folder / "checkpoints"
    exported = edgeplug.export(folder, tmp_path / "global.onnx")
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(exported)).graph.initializer}
    for name, value in result.arrays.items():
        np.testing.assert_allclose(weights[name], value, rtol=1e-6)
    # A second run refuses to overwrite those checkpoints before training anything.
    with pytest.raises(EdgeplugError, match="--force"):
        simulate(folder, FleetSettings(rounds=1, clients=3), Partition.parse("iid"))


def test_reply_carries_only_trainable_parameters(sparse_folder: Path, tmp_path: Path) -> None:
    report = edgeplug.artifacts.read_report(sparse_folder)
    trainable = set(report["parameters"]["trainable"])
    forward = onnx.load(str(sparse_folder / "forward_model.onnx"))
    frozen = {i.name for i in forward.graph.initializer} - trainable
    assert frozen, "the sparse recipe must freeze something"
    device = FleetDevice(sparse_folder, tmp_path / "device", seed=1)
    x, y, _, _ = digits("image")
    data = DeviceData(device.dataset({"image": x["image"][:40], "y": y[:40]}))
    app = make_client_app(lambda context: (device, data))
    initial = read_trainable(sparse_folder)
    content = RecordDict({"arrays": to_record(initial), "config": ConfigRecord({"local-epochs": 1, "batch-size": 8})})
    with flower_in_process():
        message = Message(content, 1, "train")
        message.metadata.__dict__["_message_id"] = "m1"
        reply = app(message, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))
        evaluation = Message(RecordDict({"arrays": to_record(initial), "config": ConfigRecord({})}), 1, "evaluate")
        evaluation.metadata.__dict__["_message_id"] = "m2"
        measured = app(evaluation, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))
    assert not measured.content.array_records  # evaluation sends metrics only
    metrics = measured.content.metric_records["metrics"]
    assert metrics["num-examples"] == 40 and 0.0 <= float(metrics["eval_acc"]) <= 1.0
    records = reply.content.array_records
    assert list(records) == ["arrays"]
    sent: ArrayRecord = records["arrays"]
    assert set(sent) == trainable and not set(sent) & frozen
    for name, array in sent.items():
        assert tuple(array.shape) == initial[name].shape
    assert not all(np.array_equal(sent[n].numpy(), initial[n]) for n in initial), "the device trained nothing"
    payload = sum(len(array.data) for array in sent.values())
    full = sum(onnx.numpy_helper.to_array(i).nbytes for i in forward.graph.initializer)
    assert payload < full / 10
    assert payload < wire_bytes(reply) < payload + 4096  # headers only on top of the arrays


def test_device_refuses_parameters_of_another_folder(sparse_folder: Path, tmp_path: Path) -> None:
    device = FleetDevice(sparse_folder, tmp_path / "device")
    wrong = dict(read_trainable(sparse_folder))
    name = sorted(wrong)[0]
    wrong[name] = np.zeros((3, 3), dtype=np.float32)
    x, y, _, _ = digits("image")
    with pytest.raises(DataError, match="same rewritten folder"):
        device.fit(wrong, device.dataset({"image": x["image"][:8], "y": y[:8]}), epochs=1, batch_size=4)


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


def test_simulate_cli_prints_a_table_and_writes_valid_json(sparse_folder: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import jsonschema

    report = tmp_path / "fleet.json"
    assert main(["fleet", "simulate", str(sparse_folder), "--clients", "2", "--rounds", "1", "--partition", "distortion",
                 "--no-save", "-o", str(report), "--json"]) == 0
    captured = capsys.readouterr()
    assert "round 1/1: 2 devices trained" in captured.err  # --json: information on stderr, one document on stdout
    document = json.loads(report.read_text())
    assert json.loads(captured.out) == document
    jsonschema.validate(document, json.loads((REPO / "schemas" / "fleet-simulation.schema.json").read_text()))
    assert document["trainable_values"] * 10 < document["full_values"]
    assert not (sparse_folder / "checkpoints").exists()  # --no-save


def test_cli_errors_are_one_line(sparse_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet", "simulate", str(sparse_folder), "--partition", "zipf", "--no-save"]) == 2
    assert main(["fleet", "simulate", str(sparse_folder), "--strategy", "fedprox", "--no-save"]) == 2
    assert main(["fleet", "server", str(sparse_folder), "--clients", "2", "--address", "10.0.0.1:8080"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("edgeplug: error: ") for line in errors)
    assert "dirichlet:ALPHA" in errors[0] and "fedavg" in errors[1] and "loopback" in errors[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_server_and_two_clients_as_processes(sparse_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    shutil.copytree(sparse_folder, folder)
    test = _digits_npz(tmp_path / "test.npz", 1500, 1797)
    address = f"127.0.0.1:{_free_port()}"
    command = [sys.executable, "-m", "edgeplug.cli", "fleet"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([*command, "server", str(folder), "--clients", "2", "--rounds", "1", "--test", str(test),
                               "--address", address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    clients = [subprocess.Popen([*command, "client", str(folder), "--data", str(_digits_npz(tmp_path / f"d{i}.npz", 300 * i, 300 * i + 300)),
                                 "--address", address, "--seed", str(i), "--work-dir", str(tmp_path / f"device{i}")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    try:
        output, _ = server.communicate(timeout=150)
        for client in clients:
            client.wait(timeout=60)
    finally:
        for process in (server, *clients):
            if process.poll() is None:
                process.kill()
    assert server.returncode == 0, output[-2000:]
    assert all(client.returncode == 0 for client in clients)
    assert "round 1/1: test_acc" in output and "wrote the global model" in output
    assert (folder / "checkpoints" / "LATEST").read_text().strip() == "step-00000000"
