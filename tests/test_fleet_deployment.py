"""The Flower App on Flower's Deployment Engine: `flwr run` on a SuperLink and SuperNodes, each a
separate process on loopback, with TLS and SuperNode authentication; a SuperNode killed mid-run, the
SuperLink killed and restarted (the run resumes from the last global checkpoint), an unregistered
SuperNode refused.

Needs `flwr` (the `fleet` extra); skipped without it. One test: every process start costs seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from builders import FLEET_SPARSE_RECIPE

pytest.importorskip("flwr")
pytest.importorskip("sklearn")

import edgeplug  # noqa: E402
from edgeplug.fleet.apps import FleetSettings  # noqa: E402
from edgeplug.fleet.deployment import write_app, write_credentials, write_flower_config  # noqa: E402
from edgeplug.fleet.partition import digits  # noqa: E402
from edgeplug.fleet.simulation import usable_cores  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "examples" / "digits_fewshot" / "pretrained_cnn.onnx"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """Processes started in their own process groups, killed (group and all) at the end."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.started = env, logs, []  # type: ignore[var-annotated]

    def start(self, name: str, *command: str) -> subprocess.Popen[str]:
        log = (self.logs / f"{name}.log").open("a")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=self.env, start_new_session=True)
        self.started.append(process)
        return process

    @staticmethod
    def kill(process: subprocess.Popen[str]) -> None:
        """SIGKILL the process, its group and the Flower processes it spawned in groups of their own."""
        children = [pid for pid in _pids() if f"--parent-pid {process.pid}" in _cmdline(pid)]
        for pid in [process.pid, *children]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        process.wait(timeout=30)

    def close(self) -> None:
        for process in self.started:
            self.kill(process)


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    # Flower's processes start `flower-superexec` and app processes by name: this environment's scripts first
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    group = Processes(env, tmp_path)
    try:
        yield group
    finally:
        group.close()


def _wait_for(path: Path, text: str, seconds: float, process: subprocess.Popen[str] | None = None) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.is_file() else ""
        if text in content:
            return content
        if process is not None and process.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"'{text}' did not appear in {path.name} within {seconds:.0f} s:\n{(path.read_text(errors='replace') if path.is_file() else '')[-3000:]}")


@pytest.mark.skipif(usable_cores() < 1, reason="no CPU")
def test_flwr_run_on_a_superlink_and_supernodes_with_tls_auth_and_faults(tmp_path: Path, processes: Processes) -> None:
    (tmp_path / "sparse.yaml").write_text(FLEET_SPARSE_RECIPE)
    server_folder = tmp_path / "server"
    edgeplug.rewrite(MODEL, tmp_path / "sparse.yaml", server_folder)
    x, y, tx, ty = digits("image")
    test = tmp_path / "test.npz"
    np.savez(test, image=tx["image"], y=ty)
    devices = []
    for number in (1, 2):  # each SuperNode has its own copy of the folder and its own data
        folder = tmp_path / f"device{number}"
        shutil.copytree(server_folder, folder)
        data = tmp_path / f"data{number}.npz"
        np.savez(data, image=x["image"][300 * number:300 * number + 300], y=y[300 * number:300 * number + 300])
        devices.append((folder, data))
    credentials = write_credentials(tmp_path / "credentials", supernodes=3)
    port = _free_port()
    write_flower_config(tmp_path / "flwr-home", "loopback", f"127.0.0.1:{port}", root_certificates=credentials["ca.crt"])
    app = write_app(tmp_path / "app", server_folder, FleetSettings(rounds=3, clients=2, timeout=15.0, min_clients=1, wait=60.0), test=test)

    database = str(tmp_path / "superlink.db")
    superlink_command = [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(credentials["ca.crt"]),
                         "--ssl-certfile", str(credentials["server.pem"]), "--ssl-keyfile", str(credentials["server.key"]),
                         "--enable-supernode-auth", "--port", str(port), "--database", database,
                         "--disable-runtime-dependency-installation"]
    superlink = processes.start("superlink", *superlink_command)
    _wait_for(tmp_path / "superlink.log", "Uvicorn running", 90, superlink)
    flwr = str(BIN / "flwr")
    for number in (1, 2):
        registered = subprocess.run([flwr, "supernode", "register", str(credentials[f"supernode_{number}.pub"]), "loopback"],
                                    capture_output=True, text=True, env=processes.env, timeout=120)
        assert registered.returncode == 0, registered.stdout + registered.stderr
    nodes = []
    for number, (folder, data) in enumerate(devices, start=1):
        nodes.append(processes.start(
            f"supernode{number}", str(BIN / "flower-supernode"), "--root-certificates", str(credentials["ca.crt"]),
            "--superlink", f"127.0.0.1:{port}", "--port", str(_free_port()),
            "--auth-supernode-private-key", str(credentials[f"supernode_{number}"]),
            "--node-config", f'artifacts="{folder}" data="{data}" seed={number}'))
    # A SuperNode whose key was never registered is refused (TLS alone does not let a device in).
    stranger = processes.start("stranger", str(BIN / "flower-supernode"), "--root-certificates", str(credentials["ca.crt"]),
                               "--superlink", f"127.0.0.1:{port}", "--port", str(_free_port()), "--max-retries", "2",
                               "--auth-supernode-private-key", str(credentials["supernode_3"]),
                               "--node-config", f'data="{devices[0][1]}"')

    run = processes.start("run1", flwr, "run", str(app), "loopback", "--stream")
    log = tmp_path / "run1.log"
    _wait_for(log, "round 1/3: 2 devices trained", 240, run)
    processes.kill(nodes[1])  # a device dies: later rounds go on without it (--min-clients 1)
    _wait_for(log, "round 2/3:", 240, run)
    assert (server_folder / "checkpoints" / "step-00000002").is_dir()
    processes.kill(superlink)  # the server dies after writing round 2
    processes.kill(run)
    assert stranger.wait(timeout=120) != 0

    superlink = processes.start("superlink-restarted", *superlink_command)
    _wait_for(tmp_path / "superlink-restarted.log", "Uvicorn running", 90, superlink)
    # The restarted SuperLink still hands node 1 the dead run's round-3 message first (one ClientApp process start,
    # seconds on a loaded machine) and lists the killed node 2 until its heartbeat expires: a longer round timeout.
    again = processes.start("run2", flwr, "run", str(app), "loopback", "--stream", "--run-config", "timeout=90.0")
    output = _wait_for(tmp_path / "run2.log", "wrote the global model", 300, again)
    assert "round 3/3: 1 devices trained" in output
    assert "round 1/3" not in output  # resumed after round 2, not started over
    assert (server_folder / "checkpoints" / "LATEST").read_text().strip() == "step-00000003"
    assert edgeplug.export(server_folder, tmp_path / "global.onnx").is_file()
