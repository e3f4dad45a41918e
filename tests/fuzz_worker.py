"""Runs `edgeplug` commands for the fuzz tests, each in a forked child, and reports how each ended.

Started once per test module (`python tests/fuzz_worker.py`); it imports edgeplug,
onnx and onnxruntime-training once and never runs a model itself, so a fork per
command costs milliseconds and a native crash, a hang or a memory blow-up in one
command shows as that command's result (signal, hang) instead of taking the test
run down. Protocol: one JSON request per line on stdin, one JSON reply per line on
stdout.

    {"chain": "/case/dir", "model": "m.onnx", "recipe": null, "timeout": 60}
      -> inspect, rewrite, (data from report.json), train, export; one result per step
    {"argv": ["rewrite", ...], "timeout": 60}
      -> one command
Optional in both: "env" (variables set in the child), "pythonpath" (folders put first on
sys.path, e.g. a generated plugin: the child then rebuilds its plugin host), "rewrite_args"
and "train_args" (extra arguments of the chain's rewrite and train), "data" (a data file
for the chain's train instead of the generated one).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

import edgeplug.exporter
import edgeplug.inspection
import edgeplug.pipeline
import edgeplug.trainer  # noqa: F401
from edgeplug import _ort
from edgeplug.cli import main
from edgeplug.plugins import default_host

MEMORY_LIMIT = 6 * 2**30  # address space per command: a runaway allocation fails instead of swapping the machine


def run_command(argv: list[str], timeout: float, workdir: Path, label: str, setup: dict[str, Any] | None = None) -> dict[str, Any]:
    out, err = workdir / f"{label}.out", workdir / f"{label}.err"
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            with open(out, "wb") as o, open(err, "wb") as e:
                os.dup2(o.fileno(), 1)
                os.dup2(e.fileno(), 2)
            sys.stdout = os.fdopen(1, "w", closefd=False)
            sys.stderr = os.fdopen(2, "w", closefd=False)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
            _prepare(setup or {})
            code = _child(argv, workdir)
        except BaseException:  # noqa: BLE001 - everything must end in an exit status
            traceback.print_exc()
            code = 99
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    status, hang = None, False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - started > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            hang = True
            break
        time.sleep(0.005)
    result: dict[str, Any] = {"step": label, "argv": argv, "hang": hang, "seconds": round(time.monotonic() - started, 2)}
    if not hang:
        result["code"] = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        result["signal"] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    result["stderr"] = err.read_text(errors="replace")[-4000:] if err.exists() else ""
    return result


def _prepare(setup: dict[str, Any]) -> None:
    """In the child: the request's environment and plugin folders, and a plugin host that sees them."""
    os.environ.update(setup.get("env") or {})
    folders = setup.get("pythonpath") or []
    if folders or setup.get("env"):
        import importlib

        from edgeplug.plugins import reset_default_host

        sys.path[:0] = folders
        importlib.invalidate_caches()
        reset_default_host()


def _child(argv: list[str], workdir: Path) -> int:
    if argv and argv[0] == "__make_data__":
        return _make_data(Path(argv[1]), Path(argv[2]))
    return int(main(argv))


def _make_data(artifacts: Path, target: Path) -> int:
    """Random data shaped like report.json's inputs (4 samples), labels fitting the loss."""
    report = json.loads((artifacts / "report.json").read_text())
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    n = 4
    for spec in report["training"]["inputs"]:
        shape = [n] + [d if isinstance(d, int) and 0 < d <= 64 else 1 for d in spec["shape"][1:]]
        dtype = np.dtype(spec["dtype"]) if spec["dtype"] != "unknown" else np.dtype("float32")
        arrays[spec["name"]] = (rng.standard_normal(shape) * 3).astype(dtype)
    if report["training"]["loss"] == "cross-entropy":
        arrays["y"] = np.zeros(n, dtype=np.int64)
    else:
        arrays["y"] = np.zeros(n, dtype=np.float32)
    np.savez(target, **arrays)
    return 0


def run_chain(request: dict[str, Any]) -> list[dict[str, Any]]:
    workdir = Path(request["chain"])
    timeout = float(request.get("timeout", 60))
    model = str(workdir / request["model"])
    out = str(workdir / "out")
    setup = {key: request[key] for key in ("env", "pythonpath") if key in request}
    results = [run_command(["inspect", model], timeout, workdir, "inspect", setup)]
    rewrite = ["rewrite", model, "-o", out] + (["--recipe", request["recipe"]] if request.get("recipe") else [])
    results.append(run_command(rewrite + list(request.get("rewrite_args", [])), timeout, workdir, "rewrite", setup))
    if results[-1].get("code") != 0:
        return results
    data = request.get("data") or str(workdir / "data.npz")
    if not request.get("data"):
        made = run_command(["__make_data__", out, data], timeout, workdir, "data")
        if made.get("code") != 0:
            results.append(made)
            return results
    train = ["train", out, "--data", data, "--epochs", "1", "--batch-size", "2", "--no-progress"] + list(request.get("train_args", []))
    results.append(run_command(train, timeout, workdir, "train", setup))
    results.append(run_command(["export", out, "-o", str(workdir / "exported.onnx")], timeout, workdir, "export", setup))
    return results


def serve() -> None:
    _ort.training_api()
    _ort.training_artifacts()
    default_host().passes()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "chain" in request:
            reply: Any = run_chain(request)
        else:
            workdir = Path(request.get("workdir", "."))
            setup = {key: request[key] for key in ("env", "pythonpath") if key in request}
            reply = [run_command(request["argv"], float(request.get("timeout", 60)), workdir, request.get("label", "command"), setup)]
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    serve()
