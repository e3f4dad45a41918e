"""Hostile families for the fuzz suite (issue #24): generated in bulk, run through the fuzz worker.

Families: external-data sizes, zero-width tensors, .npz corruption and bombs, FIFO
and device files in place of every input, non-finite and absurd numbers (recipes,
flags, data), folders reached through symbolic links (with the lock held), plugins
that exit, interrupt, raise or hang at every point they run.

Oracle for every command: exit 0 having done its job (the folder, checkpoint or file
it promised exists and reads), or exit 2 with one line `edgeplug: error: ...`
(130 with one line `edgeplug: interrupted...` where the family raises
KeyboardInterrupt); never a traceback, a signal, a hang or a MemoryError.

CI runs a few examples per family; `EDGEPLUG_LONG_FUZZ=1` runs many
(`EDGEPLUG_FUZZ_EXAMPLES=N` per family). Counts per family go to docs/reliability.md.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from builders import cnn, mlp, write_plugin_distribution
from hostile import array_member, bomb_member, sparse_file, write_zip
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper
from test_fuzz import SETTINGS, TIMEOUT, Worker, examples

from edgeplug.locking import output_lock

PREFIX = "edgeplug: error: "
INTERRUPTED = "edgeplug: interrupted"
ARTIFACTS = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", "report.json", "recipe.json")


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    started = Worker()
    yield started
    started.close()
    print(f"\nhostile fuzz worker: {started.count} cases; commands by step:status {dict(sorted(started.tally.items()))}")


def check(results: list[dict[str, Any]], what: str, *, interrupt: bool = False) -> None:
    """Every command ended cleanly, and one that exited 0 did what it says."""
    for result in results:
        step = f"{what}: {result['step']} ({' '.join(map(str, result['argv']))[:300]})"
        lines = result["stderr"].strip().splitlines()
        problem = None
        if result["hang"]:
            problem = f"hung (killed after {TIMEOUT:g} s)"
        elif result["signal"] is not None:
            problem = f"killed by signal {result['signal']} (native crash)"
        elif result["code"] == 0:
            problem = _not_done(result)
        elif result["code"] == 2:
            if len(lines) != 1 or not lines[0].startswith(PREFIX) or "Traceback" in result["stderr"]:
                problem = "a user error that is not one line 'edgeplug: error: ...'"
        elif result["code"] == 130 and interrupt:
            if len(lines) != 1 or not lines[0].startswith(INTERRUPTED):
                problem = "an interruption that is not one line 'edgeplug: interrupted...'"
        else:
            problem = f"exit status {result['code']}"
        if problem:
            keep = os.environ.get("FUZZ_KEEP")
            if keep and len(result["argv"]) > 1 and Path(result["argv"][1]).parent.is_dir():
                shutil.copytree(Path(result["argv"][1]).parent, Path(keep) / Path(result["argv"][1]).parent.name,
                                dirs_exist_ok=True, symlinks=True, ignore_dangling_symlinks=True)
            pytest.fail(f"{step} {problem}\n{result['stderr'][-2000:]}")


def _not_done(result: dict[str, Any]) -> str | None:
    """For exit 0: the promised output exists (rewrite: a whole folder; train: a checkpoint; export: a model)."""
    argv = [str(a) for a in result["argv"]]
    if argv[0] == "rewrite":
        out = Path(argv[argv.index("-o") + 1])
        missing = [name for name in ARTIFACTS if not (out / name).is_file()]
        return f"exit 0 but {out} lacks {missing}" if missing else None
    if argv[0] == "train" and "--no-checkpoints" not in argv:
        folder = Path(argv[1]) / "checkpoints"
        steps = list(folder.glob("step-*")) if folder.is_dir() else []
        return None if steps else f"exit 0 but no checkpoint in {folder}"
    if argv[0] == "export":
        target = Path(argv[argv.index("-o") + 1])
        try:
            onnx.load(str(target))
        except Exception as error:  # noqa: BLE001
            return f"exit 0 but {target} is not a model ({error})"
    return None


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An mlp artifact folder for cross-entropy and one for mse, written once."""
    from edgeplug.pipeline import rewrite

    root = tmp_path_factory.mktemp("hostile-pristine")
    onnx.save(mlp(8, (16,), 3), str(root / "m.onnx"))
    (root / "mse.yaml").write_text("loss: mse\n")
    rewrite(root / "m.onnx", None, root / "ce")
    rewrite(root / "m.onnx", root / "mse.yaml", root / "mse")
    return {"model": root / "m.onnx", "ce": root / "ce", "mse": root / "mse", "root": root}


def new_example(folder: Path, pristine: dict[str, Path], kind: str = "ce") -> Path:
    out = folder / "out"
    shutil.copytree(pristine[kind], out)
    return out


# -- 1. external-data sizes ------------------------------------------------------------------------------

DIMS = [0, 1, 3, 8, 16, 2**20, 2**28, 2**31, 2**40]
GiB = 2**30


@st.composite
def external_cases(draw: st.DrawFn) -> dict[str, Any]:
    dims = draw(st.lists(st.sampled_from(DIMS), min_size=1, max_size=3))
    dtype = draw(st.sampled_from([TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.UINT8, TensorProto.FLOAT16]))
    declared = math.prod(dims) * {TensorProto.FLOAT: 4, TensorProto.DOUBLE: 8, TensorProto.INT64: 8, TensorProto.UINT8: 1,
                                  TensorProto.FLOAT16: 2}[dtype]
    length = draw(st.sampled_from([None, 0, declared, declared + 1, max(declared - 1, 0), 512, 3 * GiB, 2**40]))
    offset = draw(st.sampled_from([None, 0, 4, 2**31, 2**40, -1]))
    size = draw(st.sampled_from([0, 64, 512, declared, declared + 4, 3 * GiB, 2**40]))
    return {"dims": dims, "dtype": dtype, "length": length, "offset": offset, "size": min(size, 2**41),
            "tensor": draw(st.sampled_from(["fc0.weight", "fc0.bias", "fc1.weight"]))}


@settings(max_examples=examples(5), **SETTINGS)
@given(case=external_cases())
def test_fuzzed_external_data_sizes(worker: Worker, case: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="edgeplug-hostile-") as name:
        folder = Path(name)
        model = mlp(8, (16,), 3)
        tensor = next(t for t in model.graph.initializer if t.name == case["tensor"])
        tensor.ClearField("raw_data")
        del tensor.dims[:]
        tensor.dims.extend(case["dims"])
        tensor.data_type = case["dtype"]
        tensor.data_location = TensorProto.EXTERNAL
        for key in ("location", "offset", "length"):
            value = "w.bin" if key == "location" else case[key]
            if value is not None:
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
        (folder / "model.onnx").write_bytes(model.SerializeToString())
        try:
            sparse_file(folder / "w.bin", case["size"])
        except OSError:  # the file system's largest file is smaller
            sparse_file(folder / "w.bin", 3 * GiB)
        check(worker.request(chain=str(folder), model="model.onnx"), f"external data {case}")


# -- 2. zero-width tensors ---------------------------------------------------------------------------------


@st.composite
def zero_width_models(draw: st.DrawFn) -> onnx.ModelProto:
    model = draw(st.sampled_from(["mlp", "cnn"]))
    built = mlp(8, (16,), 3) if model == "mlp" else cnn((4,), 5, image=6, batch_norm=draw(st.booleans()))
    for _ in range(draw(st.integers(1, 2))):
        where = draw(st.sampled_from(["initializer", "output", "input", "hidden-width"]))
        if where == "initializer":
            tensor = draw(st.sampled_from(list(built.graph.initializer)))
            dims = list(tensor.dims) or [1]
            dims[draw(st.integers(0, len(dims) - 1))] = 0
            tensor.CopyFrom(numpy_helper.from_array(np.zeros(dims, np.float32), tensor.name))
        elif where in ("output", "input"):
            value = built.graph.output[0] if where == "output" else built.graph.input[0]
            dims = value.type.tensor_type.shape.dim
            dims[draw(st.integers(1 if where == "input" else 0, len(dims) - 1))].dim_value = 0
        elif model == "mlp":  # the hidden layer has width 0: fc0.weight [8, 0], fc0.bias [0], fc1.weight [0, 3]
            for tensor in built.graph.initializer:
                if tensor.name in ("fc0.weight", "fc0.bias", "fc1.weight"):
                    dims = list(tensor.dims)
                    dims[-1 if tensor.name != "fc1.weight" else 0] = 0
                    tensor.CopyFrom(numpy_helper.from_array(np.zeros(dims, np.float32), tensor.name))
    return built


@settings(max_examples=examples(3), **SETTINGS)
@given(model=zero_width_models())
def test_fuzzed_zero_width_models(worker: Worker, model: onnx.ModelProto) -> None:
    with tempfile.TemporaryDirectory(prefix="edgeplug-hostile-") as name:
        folder = Path(name)
        (folder / "model.onnx").write_bytes(model.SerializeToString())
        check(worker.request(chain=str(folder), model="model.onnx"), "zero width")


# -- 3. .npz corruption and bombs ---------------------------------------------------------------------------


@st.composite
def data_files(draw: st.DrawFn) -> dict[str, Any]:
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    n = draw(st.sampled_from([1, 4, 16]))
    x = rng.standard_normal((n, 8)).astype(np.float32)
    y: np.ndarray = rng.integers(0, 3, n)
    kind = draw(st.sampled_from(["ce", "mse"]))
    if kind == "mse":
        y = rng.standard_normal((n, 3)).astype(np.float32)
    members: dict[str, tuple[str, bytes, int]] = {"x": array_member("x.npy", x), "y": array_member("y.npy", y)}
    mutation = draw(st.sampled_from(["bomb-x", "bomb-y", "unused-bomb", "lying-size", "non-finite", "object", "scalar",
                                     "empty", "dtype", "flip", "truncate", "npy", "text", "count"]))
    if mutation.startswith("bomb"):
        rows = draw(st.sampled_from([2**20, 2**25, 2**28, 2**40]))
        key = mutation[-1]
        shape = (rows, 8) if key == "x" else ((rows,) if kind == "ce" else (rows, 3))
        dtype = "<f4" if key == "x" or kind == "mse" else "<i8"
        payload = None if rows <= 2**25 else draw(st.sampled_from([0, 4096]))
        members[key] = bomb_member(f"{key}.npy", shape, dtype, payload)
    elif mutation == "unused-bomb":
        members["junk"] = bomb_member("junk.npy", (2**25, 8))
    elif mutation == "lying-size":
        name, prefix, _ = members["x"]
        members["x"] = (name, prefix[: draw(st.integers(10, len(prefix)))], draw(st.sampled_from([0, 7, 2**20])))
    elif mutation == "non-finite":
        target = x if draw(st.booleans()) or kind == "ce" else y
        target.flat[draw(st.integers(0, target.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        members = {"x": array_member("x.npy", x), "y": array_member("y.npy", y)}
    elif mutation == "object":
        buffer = io.BytesIO()
        np.save(buffer, np.array([{"a": 1}] * n, dtype=object), allow_pickle=True)
        members["x"] = ("x.npy", buffer.getvalue(), 0)
    elif mutation == "scalar":
        members[draw(st.sampled_from(["x", "y"]))] = array_member(draw(st.sampled_from(["x.npy", "y.npy"])), np.float32(1.0))
    elif mutation == "empty":
        members["x"] = array_member("x.npy", np.zeros((0, 8), np.float32))
        members["y"] = array_member("y.npy", np.zeros(0, np.int64))
    elif mutation == "dtype":
        members["x"] = array_member("x.npy", x.astype(draw(st.sampled_from([np.complex64, np.bool_, np.int8, np.float64, "S4"]))))
    elif mutation == "count":
        members["y"] = array_member("y.npy", y[: max(n - 1, 0)])
    return {"members": list(members.values()), "kind": kind, "mutation": mutation,
            "flips": draw(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8)),
            "cut": draw(st.floats(0, 1)), "eval": draw(st.booleans())}


@settings(max_examples=examples(6), **SETTINGS)
@given(case=data_files())
def test_fuzzed_data_files(worker: Worker, pristine: dict[str, Path], case: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="edgeplug-hostile-") as name:
        folder = Path(name)
        out = new_example(folder, pristine, case["kind"])
        data = write_zip(folder / "d.npz", case["members"])
        if case["mutation"] == "flip":
            raw = bytearray(data.read_bytes())
            for where, value in case["flips"]:
                raw[int(where * (len(raw) - 1))] = value
            data.write_bytes(bytes(raw))
        elif case["mutation"] == "truncate":
            data.write_bytes(data.read_bytes()[: int(case["cut"] * data.stat().st_size)])
        elif case["mutation"] == "npy":
            data.write_bytes(case["members"][0][1])
        elif case["mutation"] == "text":
            data.write_text("x,y\n1,2\n")
        argv = ["train", str(out), "--data", str(data), "--epochs", "1", "--batch-size", "4", "--no-progress"]
        if case["eval"]:
            argv += ["--eval", str(data)]
        check(worker.request(argv=argv, workdir=str(folder), label="train"), f"data {case['mutation']}")


# -- 4. FIFO and device files in place of every input -------------------------------------------------------

SPECIALS = ["fifo", "dev-zero", "dev-null", "dev-urandom", "folder", "dangling", "loop", "socket"]
INPUTS = ["model", "recipe", "data", "eval", "checkpoint", "checkpoint-state", "external", "calibration", "latest"]


def make_special(path: Path, kind: str) -> None:
    if path.exists() or path.is_symlink():
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind.startswith("dev-"):
        path.symlink_to("/dev/" + kind[4:])
    elif kind == "folder":
        path.mkdir()
    elif kind == "dangling":
        path.symlink_to(path.parent / "nowhere")
    elif kind == "loop":
        path.symlink_to(path)
    else:
        import socket

        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.close()


@settings(max_examples=examples(6), **SETTINGS)
@given(target=st.sampled_from(INPUTS), kind=st.sampled_from(SPECIALS))
def test_fuzzed_special_files(worker: Worker, pristine: dict[str, Path], target: str, kind: str) -> None:
    with tempfile.TemporaryDirectory(prefix="edgeplug-hostile-") as name:
        folder = Path(name)
        out = new_example(folder, pristine)
        np.savez(folder / "d.npz", x=np.zeros((4, 8), np.float32), y=np.zeros(4, np.int64))
        shutil.copy(pristine["model"], folder / "m.onnx")
        (folder / "r.yaml").write_text("passes: []\n")
        if target in ("checkpoint-state", "latest"):
            check(worker.request(argv=["train", str(out), "--data", str(folder / "d.npz"), "--batch-size", "4", "--no-progress"],
                                 workdir=str(folder), label="train"), "setup")
        special = {"model": folder / "m.onnx", "recipe": folder / "r.yaml", "data": folder / "d.npz", "eval": folder / "e.npz",
                   "checkpoint": folder / "ckpt", "checkpoint-state": next(iter(sorted((out / "checkpoints").glob("step-*"))), out) / "state",
                   "external": folder / "w.bin", "calibration": folder / "c.npz", "latest": out / "checkpoints" / "LATEST"}[target]
        if target == "external":
            model = mlp()
            tensor = model.graph.initializer[0]
            size = len(tensor.raw_data)
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", "w.bin"), ("length", str(size))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            (folder / "m.onnx").write_bytes(model.SerializeToString())
        make_special(special, kind)
        m, r, d = folder / "m.onnx", folder / "r.yaml", folder / "d.npz"
        commands = {
            "model": [["inspect", m], ["rewrite", m, "-o", folder / "o2"]], "external": [["inspect", m], ["rewrite", m, "-o", folder / "o2"]],
            "recipe": [["rewrite", m, "--recipe", r, "-o", folder / "o2"]],
            "data": [["train", out, "--data", d, "--no-progress"]], "eval": [["train", out, "--data", d, "--eval", special, "--no-progress"]],
            "checkpoint": [["export", out, "--checkpoint", special, "-o", folder / "e.onnx"]],
            "checkpoint-state": [["train", out, "--data", d, "--epochs", "2", "--batch-size", "4", "--no-progress"],
                                 ["export", out, "-o", folder / "e.onnx"]],
            "latest": [["train", out, "--data", d, "--epochs", "2", "--batch-size", "4", "--no-progress"], ["export", out, "-o", folder / "e.onnx"]],
            "calibration": [["rewrite", m, "--calibration-data", special, "-o", folder / "o2"]],
        }[target]
        for argv in commands:
            check(worker.request(argv=[str(a) for a in argv], workdir=str(folder), label=str(argv[0]), timeout=60),
                  f"{kind} as {target}")


# -- 5. non-finite and absurd numbers -------------------------------------------------------------------------

NUMBERS = [".nan", ".inf", "-.inf", "1.0e+308", "-0.0", "0", "1.0e-320", "9223372036854775808", "-9223372036854775809", "1.0e+400"]
RECIPE_PATHS = [("optimizer", "lr"), ("optimizer", "schedule", "gamma"), ("optimizer", "schedule", "final_lr_fraction"),
                ("optimizer", "schedule", "warmup_steps"), ("optimizer", "schedule", "step_size"),
                ("passes", 0, "options", "layers"), ("passes", 0, "options", "channel_ratio")]
FLAGS = {"--lr": ["nan", "inf", "-1", "0", "1e308", "1e-320", "10.5"], "--seed": ["-1", "0", str(2**64), "-9" * 3],
         "--epochs": ["0", "-1", "1"], "--batch-size": ["0", "-5", str(2**40)], "--checkpoint-every": ["0", "-1", "1"],
         "--max-memory": ["nan", "0", "-1G", "1e400G", "99999999999T", "1K"]}


@st.composite
def number_cases(draw: st.DrawFn) -> dict[str, Any]:
    return {"path": draw(st.sampled_from(RECIPE_PATHS)), "value": draw(st.sampled_from(NUMBERS)),
            "flags": draw(st.dictionaries(st.sampled_from(sorted(FLAGS)), st.just(""), max_size=2)),
            "picks": draw(st.lists(st.integers(0, 6), min_size=2, max_size=2)), "json": draw(st.booleans()),
            "timeout": draw(st.sampled_from(["nan", "-1", "inf", "0", "1e308"])), "data_value": draw(st.sampled_from([np.nan, np.inf, 1e38]))}


@settings(max_examples=examples(5), **SETTINGS)
@given(case=number_cases())
def test_fuzzed_numbers(worker: Worker, pristine: dict[str, Path], case: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="edgeplug-hostile-") as name:
        folder = Path(name)
        document: dict[str, Any] = {"optimizer": {"name": "sgd", "lr": 0.01, "schedule": {"name": "step", "step_size": 1}},
                                    "passes": [{"name": "sparse-update" if "channel_ratio" in case["path"] else "trainable", "options": {}}]}
        if "channel_ratio" in case["path"]:
            document["passes"] = [{"name": "sparse-update", "options": {}}]
        target = document
        for key in case["path"][:-1]:
            target = target[key]
        target[case["path"][-1]] = "__NUMBER__"
        if case["json"]:
            literal = {".nan": "NaN", ".inf": "Infinity", "-.inf": "-Infinity"}.get(case["value"], case["value"])
            (folder / "r.json").write_text(json.dumps(document).replace('"__NUMBER__"', literal))
            recipe = folder / "r.json"
        else:
            (folder / "r.yaml").write_text(yaml.safe_dump(document).replace("__NUMBER__", case["value"]))
            recipe = folder / "r.yaml"
        shutil.copy(pristine["model"], folder / "m.onnx")
        check(worker.request(argv=["rewrite", str(folder / "m.onnx"), "--recipe", str(recipe), "-o", str(folder / "o"),
                                   "--pass-timeout", case["timeout"]], workdir=str(folder), label="rewrite"), f"numbers {case}")
        out = new_example(folder, pristine)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((8, 8)).astype(np.float32)
        x[3, 2] = case["data_value"]
        np.savez(folder / "d.npz", x=x, y=rng.integers(0, 3, 8))
        argv = ["train", str(out), "--data", str(folder / "d.npz"), "--no-progress"]
        for flag, pick in zip(sorted(case["flags"]), case["picks"], strict=False):
            argv += [flag, FLAGS[flag][pick % len(FLAGS[flag])]]
        check(worker.request(argv=argv, workdir=str(folder), label="train"), f"numbers {argv}")
        check(worker.request(argv=["profile", str(out), "--static-only", "--batch-size", case["timeout"].split(".")[0].replace("nan", "0")],
                             workdir=str(folder), label="profile"), "profile numbers")


# -- 6. folders reached through symbolic links ----------------------------------------------------------------


def alias(folder: Path, real: Path, kind: str, index: int) -> Path:
    """Another path to `real`: a link, a chain of links, a linked parent, `..` or `.` detours."""
    if kind == "link":
        path = folder / f"link{index}"
        path.symlink_to(real)
    elif kind == "chain":
        first = folder / f"chain{index}a"
        first.symlink_to(real)
        path = folder / f"chain{index}b"
        path.symlink_to(first)
    elif kind == "parent":
        (folder / f"parent{index}").symlink_to(real.parent)
        path = folder / f"parent{index}" / real.name
    elif kind == "dotdot":
        (folder / f"sub{index}").mkdir(exist_ok=True)
        path = folder / f"sub{index}" / ".." / real.name
    else:
        path = real.parent / "." / real.name
    return path


@settings(max_examples=examples(3), **SETTINGS)
@given(kinds=st.lists(st.sampled_from(["real", "link", "chain", "parent", "dotdot", "dot"]), min_size=2, max_size=3),
       writer=st.sampled_from(["train", "rewrite"]))
def test_fuzzed_folder_aliases(worker: Worker, pristine: dict[str, Path], kinds: list[str], writer: str) -> None:
    with tempfile.TemporaryDirectory(prefix="edgeplug-hostile-") as name:
        folder = Path(name)
        real = new_example(folder, pristine)
        np.savez(folder / "d.npz", x=np.zeros((8, 8), np.float32), y=np.zeros(8, np.int64))
        paths = [real if kind == "real" else alias(folder, real, kind, index) for index, kind in enumerate(kinds)]
        links = {p: p.resolve() for p in folder.iterdir() if p.is_symlink()}

        def command(path: Path) -> list[str]:
            if writer == "train":
                return ["train", str(path), "--data", str(folder / "d.npz"), "--batch-size", "4", "--no-progress"]
            return ["rewrite", str(pristine["model"]), "-o", str(path), "--force"]

        with output_lock(paths[0], purpose="the fuzz test"):  # this process holds the real folder's lock through one path
            for path in paths[1:]:
                results = worker.request(argv=command(path), workdir=str(folder), label=writer)
                check(results, f"aliases {kinds}")
                assert results[0]["code"] == 2 and "in use by another edgeplug process" in results[0]["stderr"], results[0]["stderr"]
        for path in paths:
            check(worker.request(argv=command(path), workdir=str(folder), label=writer), f"aliases {kinds}")
        assert {p: p.resolve() for p in folder.iterdir() if p.is_symlink()} == links, "a link was replaced"
        assert not [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name or p.name.endswith(".lock")]


# -- 7. plugins that exit, interrupt, raise or hang ---------------------------------------------------------

WHERE = ["import", "register", "commands", "__init__", "rewrite_forward", "rewrite_training", "report", "before_step",
         "after_step", "save_state", "load_state"]
WHAT = {"exit0": "sys.exit(0)", "exit1": "sys.exit(1)", "exit-text": "sys.exit('bye')", "systemexit": "raise SystemExit",
        "interrupt": "raise KeyboardInterrupt", "generator": "raise GeneratorExit", "error": "raise ValueError('plugin bug')",
        "recursion": "raise RecursionError('deep')", "memory": "raise MemoryError()", "os-error": "raise OSError(5, 'I/O error')",
        "swallow": "_swallow_forever()", "none": "return None"}


PASS_PHASES = ("__init__", "rewrite_forward", "rewrite_training", "report")
"""Where the time limit applies; a hang anywhere else is a documented limit (docs/reliability.md)."""


def plugin_code(where: str, what: str) -> str:
    """A plugin with a pass `fuzzy` (and runtime hooks) that runs WHAT[what] at `where`."""
    action = WHAT[what]

    def at(place: str, indent: int) -> str:
        return " " * indent + (action if place == where else "pass")

    lines = [
        "import sys", "import time", "import edgeplug", "",
        "def _swallow_forever():", "    while True:", "        try:", "            time.sleep(0.05)",
        "        except BaseException:", "            pass", "",
        action if where == "import" else "", "",
        "class Hooks:",
    ]
    for hook, arguments in (("before_step", "step"), ("after_step", "step, loss"), ("save_state", "directory"),
                            ("load_state", "directory")):
        lines += ["    @edgeplug.hookimpl", f"    def edgeplug_{hook}(self, {arguments}):", at(hook, 8), ""]
    lines += [
        "class Fuzzy(edgeplug.Pass):", '    name = "fuzzy"', '    summary = "misbehaves where told"', "",
        "    def __init__(self, options):", "        super().__init__(options)", at("__init__", 8), "",
        "    def rewrite_forward(self, state, context):", at("rewrite_forward", 8), "        return state", "",
        "    def rewrite_training(self, models, context):", at("rewrite_training", 8), "        return models", "",
        "    def report(self):", at("report", 8), '        return edgeplug.PassReport(False, "fuzzy")', "",
        "    def runtime_hooks(self, context):", "        return Hooks()", "",
        "@edgeplug.hookimpl", "def edgeplug_register_passes(register):", at("register", 4), "    register(Fuzzy)", "",
        "@edgeplug.hookimpl", "def edgeplug_register_commands(commands):", at("commands", 4), "",
    ]
    return "\n".join(lines) + "\n"


@settings(max_examples=examples(4), **SETTINGS)
@given(where=st.sampled_from(WHERE), what=st.sampled_from(sorted(WHAT)))
def test_fuzzed_plugin_exits(worker: Worker, pristine: dict[str, Path], where: str, what: str) -> None:
    with tempfile.TemporaryDirectory(prefix="edgeplug-hostile-") as name:
        folder = Path(name)
        if what == "none" and where not in ("rewrite_forward", "rewrite_training", "report"):
            what = "error"  # returning None is a fault only where a result is expected
        if what == "swallow" and where not in PASS_PHASES:
            what = "exit0"  # only pass phases have a time limit
        site = folder / "site"
        site.mkdir()
        write_plugin_distribution(site, "fuzzy", "edgeplug_fuzzy", plugin_code(where, what))
        shutil.copy(pristine["model"], folder / "model.onnx")
        (folder / "r.yaml").write_text("passes:\n  - name: fuzzy\n")
        results = worker.request(chain=str(folder), model="model.onnx", recipe=str(folder / "r.yaml"), pythonpath=[str(site)],
                                 rewrite_args=["--pass-timeout", "1"], train_args=["--checkpoint-every", "1"])
        check(results, f"plugin {what} in {where}", interrupt=what == "interrupt")
        if what != "none" and where in ("import", "register", "commands", "__init__", "rewrite_forward", "rewrite_training", "report"):
            rewrite = next(r for r in results if r["step"] == "rewrite")
            assert rewrite["code"] != 0, f"the rewrite succeeded although the plugin ran {WHAT[what]} in {where}"
