"""Hostile models (issue #24, items 1-4): external data sizes, zero-width outputs, IR 11, terminal escapes.

Each case ran a real command to a native crash, a memory blow-up or a wrong answer
before it was fixed; the commands that could crash run in child processes.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from builders import mlp
from onnx import TensorProto, helper, numpy_helper

import edgeplug
import edgeplug.modelio
from edgeplug.modelio import load_model
from edgeplug.pipeline import rewrite

PREFIX = "edgeplug: error: "
GiB = 2**30


def cli(*args: object, memory: int | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m edgeplug.cli ARGS` in a child, optionally under an address-space limit (ulimit -v)."""

    def limit() -> None:
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run([sys.executable, "-m", "edgeplug.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=timeout, check=False, preexec_fn=limit)


def assert_user_error(result: subprocess.CompletedProcess[str], *names: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and "Traceback" not in result.stderr, result.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


# -- 1. external data: declared sizes are checked before anything is read ------------------------------


def external(folder: Path, *, dims: tuple[int, ...], length: int, file_size: int, offset: int = 0) -> Path:
    """mlp() whose fc0.weight (declared `dims`) points at `length` bytes of a sparse file of `file_size` bytes."""
    model = mlp(8, (16,), 3)
    tensor = next(t for t in model.graph.initializer if t.name == "fc0.weight")
    tensor.ClearField("raw_data")
    del tensor.dims[:]
    tensor.dims.extend(dims)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "w.bin", "wb") as stream:
        stream.truncate(file_size)  # sparse: takes no disk space
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    return folder / "model.onnx"


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file modelio opens (external data is read only there)."""
    opened: list[Path] = []
    real_open = open

    def spy(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(edgeplug.modelio, "open", spy, raising=False)
    return opened


def test_external_length_larger_than_the_declared_shape_is_refused_before_reading(tmp_path: Path, reads: list[Path]) -> None:
    """A 3 GiB length on a sparse file for an [8, 16] tensor: inspect allocated 6.3 GB (and segfaulted under ulimit -v)."""
    path = external(tmp_path, dims=(8, 16), length=3 * GiB, file_size=3 * GiB)
    with pytest.raises(edgeplug.ModelError, match=r"fc0.weight.*\[8, 16\].*512 bytes.*3,221,225,472"):
        load_model(path)
    assert reads == [], "the external data was opened before its size was checked"


def test_inspect_of_a_length_bomb_under_a_memory_limit_is_a_user_error(tmp_path: Path) -> None:
    path = external(tmp_path, dims=(8, 16), length=3 * GiB, file_size=3 * GiB)
    assert_user_error(cli("inspect", path, memory=4 * GiB), "fc0.weight")


def test_a_consistent_tensor_larger_than_the_memory_left_is_refused_with_its_size(tmp_path: Path) -> None:
    """Shape and length agree (6 GiB), the file holds them, but the process may only map 4 GiB."""
    path = external(tmp_path, dims=(3 * 2**29, 1), length=6 * GiB, file_size=6 * GiB)
    message = assert_user_error(cli("inspect", path, memory=4 * GiB), "fc0.weight", "memory")
    assert "6.0 GiB" in message


@pytest.mark.parametrize("length", [0, 511, 513])
def test_external_length_must_equal_the_declared_shape(tmp_path: Path, reads: list[Path], length: int) -> None:
    path = external(tmp_path, dims=(8, 16), length=length, file_size=4096)
    with pytest.raises(edgeplug.ModelError, match="fc0.weight"):
        load_model(path)
    assert reads == []


def test_external_data_of_the_declared_size_still_loads(tmp_path: Path) -> None:
    weights = numpy_helper.to_array(next(t for t in mlp(8, (16,), 3).graph.initializer if t.name == "fc0.weight"))
    path = external(tmp_path, dims=(8, 16), length=512, file_size=0, offset=0)
    (tmp_path / "w.bin").write_bytes(weights.tobytes())
    loaded = load_model(path)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), weights)


# -- 2. zero-width outputs ---------------------------------------------------------------------------------


def zero_width_model(case: str) -> onnx.ModelProto:
    """MatMul with W[4, 0] (logits [N, 0]); or a zero-width trainable weight feeding a normal output."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    if case == "output":
        nodes = [helper.make_node("MatMul", ["x", "W"], ["logits"], name="mm")]
        inits = [numpy_helper.from_array(np.zeros((4, 0), np.float32), "W")]
        width: int = 0
    else:  # a hidden layer of width 0
        nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("MatMul", ["h", "W2"], ["logits"], name="mm2")]
        inits = [numpy_helper.from_array(np.zeros((4, 0), np.float32), "W"), numpy_helper.from_array(np.zeros((0, 3), np.float32), "W2")]
        width = 3
    graph = helper.make_graph(nodes, "zero", [x], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("case", ["output", "hidden"])
def test_a_zero_width_model_is_refused_by_rewrite(tmp_path: Path, case: str) -> None:
    """The [N, 0] output rewrote fine and then train segfaulted (exit 139) with no message."""
    onnx.save(zero_width_model(case), str(tmp_path / "m.onnx"))
    message = assert_user_error(cli("rewrite", tmp_path / "m.onnx", "-o", tmp_path / "out"), "zero")
    assert ("logits" in message) if case == "output" else ("W" in message)
    assert not (tmp_path / "out").exists()


def test_train_refuses_a_zero_width_folder_written_before_the_check(tmp_path: Path) -> None:
    """A folder rewritten by an older edgeplug (no check): train names the problem instead of crashing."""
    import edgeplug.pipeline

    original = edgeplug.pipeline.check_trainable_widths
    edgeplug.pipeline.check_trainable_widths = lambda *args, **kwargs: None  # type: ignore[assignment]
    try:
        rewrite(zero_width_model("output"), None, tmp_path / "out")
    finally:
        edgeplug.pipeline.check_trainable_widths = original  # type: ignore[assignment]
    np.savez(tmp_path / "d.npz", x=np.ones((4, 4), np.float32), y=np.zeros(4, np.int64))
    assert_user_error(cli("train", tmp_path / "out", "--data", tmp_path / "d.npz", "--no-progress"), "logits", "zero")


# -- 3. IR 11 -----------------------------------------------------------------------------------------


def test_an_ir_11_model_is_lowered_by_normalize_not_refused_by_the_checker(tmp_path: Path) -> None:
    model = mlp()
    model.ir_version = 11
    onnx.save(model, str(tmp_path / "m.onnx"))
    result = rewrite(tmp_path / "m.onnx", None, tmp_path / "out")
    assert result.report["source"]["ir_version"] == 11
    assert onnx.load(str(tmp_path / "out" / "training_model.onnx")).ir_version <= 10


def test_an_ir_11_model_through_the_cli(tmp_path: Path) -> None:
    model = mlp()
    model.ir_version = 11
    onnx.save(model, str(tmp_path / "m.onnx"))
    result = cli("rewrite", tmp_path / "m.onnx", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr


# -- 4. terminal escapes in normal output -------------------------------------------------------------


HOSTILE = "x\x1b]0;PWNED\x07\x1b[2J\r\nfake line\x9b1m"


def renamed(model: onnx.ModelProto, old: str, new: str) -> onnx.ModelProto:
    for value in (*model.graph.input, *model.graph.output):
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    return model


def assert_no_control_characters(text: str) -> None:
    bad = sorted({c for line in text.split("\n") for c in line if not c.isprintable() and c != "\t"})
    assert not bad, f"control characters reach the terminal: {bad!r} in {text!r}"


@pytest.mark.parametrize("json_output", [False, True], ids=["text", "json"])
def test_inspect_escapes_control_characters_in_names(tmp_path: Path, json_output: bool) -> None:
    model = renamed(renamed(mlp(), "x", HOSTILE), "logits", "out" + HOSTILE)
    model.producer_name = "evil\x1b[31m"
    onnx.save(model, str(tmp_path / "m.onnx"))
    result = cli("inspect", tmp_path / "m.onnx", *(["--json"] if json_output else []))
    assert result.returncode == 0, result.stderr
    assert_no_control_characters(result.stdout)
    if not json_output:
        assert "\\x1b]0;PWNED\\x07" in result.stdout
        assert len([line for line in result.stdout.splitlines() if line.startswith("input")]) == 1


def test_rewrite_escapes_the_output_name(tmp_path: Path) -> None:
    model = renamed(mlp(), "logits", "out" + HOSTILE)
    onnx.save(model, str(tmp_path / "m.onnx"))
    result = cli("rewrite", tmp_path / "m.onnx", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert_no_control_characters(result.stdout)
    assert "\\x1b]0;PWNED" in result.stdout
