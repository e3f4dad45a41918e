"""`edgeplug train --runtime node` and `edgeplug pack-data`: the JavaScript runtime driven from the CLI.

The runtime (runtimes/web, onnxruntime-web's WebAssembly training build) reads data in
safetensors format; this module checks the .npz data against the folder exactly as the
Python trainer does, writes it as safetensors, holds the folder's lock and runs
`node runtimes/web/bin/train.mjs` with the same options. Its output lines, checkpoints
and metrics file have the Python trainer's shape.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from edgeplug import tensorfile
from edgeplug.data import Dataset
from edgeplug.errors import EdgeplugError
from edgeplug.guard import check_artifacts_budget, current_rss_bytes, parse_size

RUNTIME_ENV = "EDGEPLUG_WEB_RUNTIME"
"""Folder of the JavaScript runtime (default: runtimes/web of the source tree edgeplug runs from)."""


def runtime_dir() -> Path:
    """The JavaScript runtime's folder, with its npm packages installed."""
    folder = Path(os.environ.get(RUNTIME_ENV) or Path(__file__).resolve().parent.parent / "runtimes" / "web")
    if not (folder / "bin" / "train.mjs").is_file():
        raise EdgeplugError(f"the JavaScript runtime is not at {folder}; set {RUNTIME_ENV} to its folder (runtimes/web of the edgeplug sources)")
    if not (folder / "node_modules" / "onnxruntime-web" / "dist" / "ort.training.wasm.mjs").is_file():
        raise EdgeplugError(f"the JavaScript runtime's packages are not installed: run 'npm ci' in {folder}")
    return folder


def node_executable() -> str:
    node = shutil.which("node")
    if node is None:
        raise EdgeplugError("node is not installed (the JavaScript runtime needs Node.js 20 or later)")
    return node


def dataset_tensors(dataset: Dataset) -> dict[str, np.ndarray]:
    """A checked data set as the tensors of a data file: model inputs by name, plus `labels`."""
    return {**{name: np.ascontiguousarray(array) for name, array in dataset.inputs.items()}, "labels": dataset.labels}


def pack_data(artifacts: Path, data: Path, output: Path) -> tuple[Path, int]:
    """Check `data` against the folder's inputs and loss, and write it as a safetensors data file."""
    from edgeplug.trainer import Trainer

    dataset = Trainer(artifacts, progress=False).dataset(data)
    tensorfile.save(output, dataset_tensors(dataset), {"format": tensorfile.DATA_FORMAT, "source": str(data)})
    return output, len(dataset)


def train_with_node(args: argparse.Namespace) -> int:
    """Run the JavaScript runtime on the folder with the CLI's options; its exit status is ours."""
    from edgeplug.checkpoints import checkpoints_dir
    from edgeplug.locking import output_lock, remove_stale_staging_in
    from edgeplug.trainer import Trainer

    folder, node = runtime_dir(), node_executable()
    checker = Trainer(args.artifacts, progress=False)
    report = checker.report.get("device_runtime")
    if report is None:
        raise EdgeplugError(f"{args.artifacts} has no device contract (report.json device_runtime); rewrite it with this edgeplug")
    if report["needs_python"]:
        raise EdgeplugError(f"{args.artifacts} needs Python at run time ({'; '.join(report['needs_python_because'])}); train it with --runtime python")
    if args.epochs < 1 or args.batch_size < 1:
        raise EdgeplugError("epochs and batch size must be at least 1")
    max_memory = parse_size(args.max_memory) if args.max_memory is not None else None
    check_artifacts_budget(args.artifacts, args.batch_size, max_memory, baseline=current_rss_bytes(),
                           when="use a smaller --batch-size or train fewer layers (rewrite with the 'trainable' pass)")
    with tempfile.TemporaryDirectory(prefix="edgeplug-node-") as scratch:
        command = [node, str(folder / "bin" / "train.mjs"), str(args.artifacts),
                   "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
                   "--threads", str(args.threads or 1)]
        for flag, source in (("--data", args.data), ("--eval", args.eval)):
            if source is None:
                continue
            target = Path(scratch) / f"{flag[2:]}.safetensors"
            tensorfile.save(target, dataset_tensors(checker.dataset(source)), {"format": tensorfile.DATA_FORMAT})
            command += [flag, str(target)]
        if args.lr is not None:
            command += ["--lr", repr(float(args.lr))]
        if args.checkpoint_every:
            command += ["--checkpoint-every", str(args.checkpoint_every)]
        if args.restart:
            command.append("--restart")
        if args.no_checkpoints:
            command.append("--no-checkpoints")
        if args.metrics:
            command += ["--metrics", str(Path(args.metrics).resolve())]
        with output_lock(args.artifacts, purpose=f"edgeplug train --runtime node {args.artifacts}"):
            remove_stale_staging_in(checkpoints_dir(args.artifacts))
            return subprocess.run(command, check=False).returncode
