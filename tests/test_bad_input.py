"""Every bad input through the CLI: one line on stderr, `edgeplug: error: ...`, exit 2, nothing half-written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).parent))

import builders

from edgeplug.cli import main

PREFIX = "edgeplug: error: "


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expect_error(capsys: pytest.CaptureFixture[str], *args: object, names: tuple[str, ...]) -> str:
    code, _out, err = cli(capsys, *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    message = lines[0]
    assert message.startswith(PREFIX), message
    assert "Traceback" not in err
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    return message


def assert_nothing_written(output: Path) -> None:
    assert not output.exists(), f"{output} exists after a failed command"
    leftovers = [p.name for p in output.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]
    assert not leftovers, f"staging leftovers: {leftovers}"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-input")
    paths: dict[str, Path] = {}

    def save(name: str, model: onnx.ModelProto) -> None:
        paths[name] = root / f"{name}.onnx"
        onnx.save(model, str(paths[name]))

    save("mlp", builders.mlp(hidden=(8,)))
    data = paths["mlp"].read_bytes()
    paths["truncated"] = root / "truncated.onnx"
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["empty"] = root / "empty.onnx"
    paths["empty"].write_bytes(b"")
    paths["text"] = root / "text.onnx"
    paths["text"].write_text("name,value\nnot,onnx\n")

    unknown = builders.mlp(hidden=(8,))
    unknown.graph.node[1].op_type = "Frobnicate"
    save("unknown", unknown)

    rounding = builders.mlp(hidden=(8,))
    rounding.graph.node[1].op_type = "Round"
    save("round", rounding)

    cumsum = builders.mlp(hidden=(8,))
    cumsum.graph.node[1].op_type = "CumSum"
    cumsum.graph.node[1].input.append("axis")
    cumsum.graph.initializer.append(numpy_helper.from_array(np.array(1, dtype=np.int64), "axis"))
    save("cumsum", cumsum)

    good = builders.classification_data((8,), 3, n=16)
    for name, arrays in {
        "good": good,
        "shape": {"x": np.zeros((4, 5), np.float32), "y": np.zeros(4, np.int64)},
        "rank": {"x": np.zeros((4, 8, 1), np.float32), "y": np.zeros(4, np.int64)},
        "dtype": {"x": np.zeros((4, 8), np.complex64), "y": np.zeros(4, np.int64)},
        "label_range": {"x": np.zeros((4, 8), np.float32), "y": np.array([0, 1, 2, 3])},
        "label_dtype": {"x": np.zeros((4, 8), np.float32), "y": np.zeros(4, np.float32)},
        "input_key": {"inputs": np.zeros((4, 8), np.float32), "y": np.zeros(4, np.int64)},
        "label_key": {"x": np.zeros((4, 8), np.float32), "targets": np.zeros(4, np.int64)},
        "lengths": {"x": np.zeros((4, 8), np.float32), "y": np.zeros(3, np.int64)},
    }.items():
        paths[f"npz_{name}"] = root / f"{name}.npz"
        np.savez(paths[f"npz_{name}"], **arrays)
    paths["npz_text"] = root / "text.npz"
    paths["npz_text"].write_text("this is not an npz\n")
    paths["npz_onnx"] = root / "model.npz"
    paths["npz_onnx"].write_bytes(data)

    paths["artifacts"] = root / "artifacts"
    assert main(["rewrite", str(paths["mlp"]), "-o", str(paths["artifacts"])]) == 0
    paths["a_file"] = root / "a-file"
    paths["a_file"].write_text("I am a file\n")
    return paths


# -- models ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "rewrite"])
@pytest.mark.parametrize("model, names", [
    ("text", ("text.onnx", "not a readable ONNX model")),
    ("truncated", ("truncated.onnx", "not a readable ONNX model")),
    ("empty", ("empty.onnx", "no ONNX graph")),
])
def test_unreadable_model(capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path,
                          command: str, model: str, names: tuple[str, ...]) -> None:
    extra = ["-o", tmp_path / "out"] if command == "rewrite" else []
    expect_error(capsys, command, files[model], *extra, names=names)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("command", ["inspect", "rewrite"])
def test_missing_model(capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str) -> None:
    extra = ["-o", tmp_path / "out"] if command == "rewrite" else []
    expect_error(capsys, command, tmp_path / "nope.onnx", *extra, names=("not found", "nope.onnx"))
    assert_nothing_written(tmp_path / "out")


def test_unknown_op(capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path) -> None:
    expect_error(capsys, "rewrite", files["unknown"], "-o", tmp_path / "out", names=("Frobnicate", "act0"))
    assert_nothing_written(tmp_path / "out")
    # inspect describes the model instead of failing, and lists the unknown op.
    code, out, _ = cli(capsys, "inspect", files["unknown"])
    assert code == 0 and "Frobnicate" in out and "unknown ops" in out


@pytest.mark.parametrize("model", ["round", "cumsum"])
def test_op_without_gradient(capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path, model: str) -> None:
    op = {"round": "Round", "cumsum": "CumSum"}[model]
    message = expect_error(capsys, "rewrite", files[model], "-o", tmp_path / "out", names=(op, "act0", "fc0.weight", "no gradient"))
    assert "fc1" not in message  # fc1 comes after the op: it does not need the op's gradient
    assert_nothing_written(tmp_path / "out")
    # inspect warns about the same op.
    code, out, _ = cli(capsys, "inspect", files[model])
    assert code == 0 and op in out and "act0" in out
    # Training only the classifier needs no gradient through the op.
    recipe = tmp_path / "classifier.yaml"
    recipe.write_text("passes:\n  - name: trainable\n    options: {layers: classifier}\n")
    code, out, err = cli(capsys, "rewrite", files[model], "--recipe", recipe, "-o", tmp_path / "ok")
    assert code == 0, err
    assert (tmp_path / "ok" / "report.json").is_file()


# -- recipes -------------------------------------------------------------------------------------


RECIPES = {
    "bad_yaml": ("passes: [\n", ("bad_yaml.yaml", "not valid YAML")),
    "bad_json": ('{"passes": [}', ("bad_json.json", "not valid JSON")),
    "unknown_pass": ("passes:\n  - name: frobnicate\n", ("passes[0].name", "frobnicate")),
    "unknown_option": ("passes:\n  - name: normalize\n  - name: trainable\n    options: {layres: 2}\n", ("passes[1].options", "layres")),
    "wrong_type": ("passes:\n  - name: trainable\n    options: {layers: two}\n", ("passes[0].options.layers", "two")),
    "wrong_lr_type": ("optimizer: {lr: fast}\n", ("optimizer.lr", "fast")),
    "negative_lr": ("optimizer: {lr: -1}\n", ("optimizer.lr",)),
    "unknown_top_level": ("epochs: 3\n", ("epochs",)),
    "unknown_loss": ("loss: hinge\n", ("loss", "hinge")),
    "not_a_mapping": ("- normalize\n", ("not of type 'object'",)),
    "output_not_in_model": ("output: probs\n", ("probs", "logits")),
    "pattern_matches_nothing": ("passes:\n  - name: trainable\n    options: {include: ['conv*']}\n", ("conv*", "matches no parameter")),
    "bad_regex": ("passes:\n  - name: trainable\n    options: {syntax: regex, include: ['fc(']}\n", ("fc(", "regular expression")),
    "too_many_layers": ("passes:\n  - name: trainable\n    options: {layers: 9}\n", ("layers=9",)),
    "nothing_trainable": ("passes:\n  - name: trainable\n    options: {layers: none}\n", ("no parameter is trainable",)),
}


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_bad_recipe(capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path, case: str) -> None:
    text, names = RECIPES[case]
    recipe = tmp_path / (case + (".json" if case == "bad_json" else ".yaml"))
    recipe.write_text(text)
    expect_error(capsys, "rewrite", files["mlp"], "--recipe", recipe, "-o", tmp_path / "out", names=names)
    assert_nothing_written(tmp_path / "out")


def test_missing_recipe(capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path) -> None:
    expect_error(capsys, "rewrite", files["mlp"], "--recipe", tmp_path / "nope.yaml", "-o", tmp_path / "out", names=("nope.yaml", "not found"))
    assert_nothing_written(tmp_path / "out")


# -- data ------------------------------------------------------------------------------------------


DATA = {
    "npz_shape": ("(4, 5)", "(N, 8)"),
    "npz_rank": ("(4, 8, 1)", "(N, 8)"),
    "npz_dtype": ("complex64", "float32"),
    "npz_label_range": ("holds label 3 but", "3 outputs (labels 0..2)"),
    "npz_label_dtype": ("float32", "integer"),
    "npz_input_key": ("no array for model input 'x'", "inputs"),
    "npz_label_key": ("no labels", "y or labels"),
    "npz_lengths": ("number of samples",),
    "npz_text": ("text.npz", "not a readable .npz"),
    "npz_onnx": ("model.npz", "not a readable .npz"),
}


@pytest.mark.parametrize("case", sorted(DATA))
@pytest.mark.parametrize("flag", ["--data", "--eval"])
def test_bad_data(capsys: pytest.CaptureFixture[str], files: dict[str, Path], case: str, flag: str) -> None:
    args = ["--data", files[case]] if flag == "--data" else ["--data", files["npz_good"], "--eval", files[case]]
    expect_error(capsys, "train", files["artifacts"], *args, "--no-progress", names=(files[case].name, *DATA[case]))
    # Data is checked before any step: no checkpoint was written.
    assert not (files["artifacts"] / "checkpoints").exists()


def test_missing_data(capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path) -> None:
    expect_error(capsys, "train", files["artifacts"], "--data", tmp_path / "nope.npz", names=("nope.npz", "not found"))


def test_not_an_artifact_folder(capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path) -> None:
    expect_error(capsys, "train", tmp_path, "--data", files["npz_good"], names=(str(tmp_path), "rewrite"))
    expect_error(capsys, "export", tmp_path, "-o", tmp_path / "m.onnx", names=(str(tmp_path), "rewrite"))
    assert not (tmp_path / "m.onnx").exists()


# -- outputs -----------------------------------------------------------------------------------------


def test_output_exists(capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_error(capsys, "rewrite", files["mlp"], "-o", out, names=(str(out), "--force"))
    assert (out / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    # --force replaces only artifact folders (#24): a folder of other files is refused, never emptied
    expect_error(capsys, "rewrite", files["mlp"], "-o", out, "--force", names=(str(out), "not an edgeplug artifact folder"))
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    code, _, err = cli(capsys, "rewrite", files["mlp"], "-o", out)
    assert code == 0, err
    code, _, err = cli(capsys, "rewrite", files["mlp"], "-o", out, "--force")
    assert code == 0, err
    assert (out / "report.json").is_file()


def test_output_exists_as_file(capsys: pytest.CaptureFixture[str], files: dict[str, Path]) -> None:
    expect_error(capsys, "rewrite", files["mlp"], "-o", files["a_file"], names=(files["a_file"].name, "already exists"))
    assert files["a_file"].read_text() == "I am a file\n"


@pytest.mark.parametrize("command", ["rewrite", "export", "metrics"])
def test_output_parent_is_a_file(capsys: pytest.CaptureFixture[str], files: dict[str, Path], command: str) -> None:
    target = files["a_file"] / "out"
    if command == "rewrite":
        args = ["rewrite", files["mlp"], "-o", target]
    elif command == "export":
        args = ["export", files["artifacts"], "-o", target]
    else:
        args = ["train", files["artifacts"], "--data", files["npz_good"], "--metrics", target, "--no-progress", "--restart"]
    expect_error(capsys, *args, names=("a-file",))
    assert files["a_file"].read_text() == "I am a file\n"
    assert not [p for p in files["a_file"].parent.iterdir() if ".partial-" in p.name]


def test_output_grandparent_is_a_file(capsys: pytest.CaptureFixture[str], files: dict[str, Path]) -> None:
    target = files["a_file"] / "deeper" / "out"
    expect_error(capsys, "rewrite", files["mlp"], "-o", target, names=("a-file",))


def test_unknown_schema_name(capsys: pytest.CaptureFixture[str]) -> None:
    expect_error(capsys, "schema", "frobnicate", names=("frobnicate",))


# -- as a real process ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["truncated", "recipe", "data"])
def test_subprocess_exit_code_and_no_traceback(files: dict[str, Path], tmp_path: Path, case: str) -> None:
    if case == "truncated":
        args = ["rewrite", str(files["truncated"]), "-o", str(tmp_path / "out")]
    elif case == "recipe":
        recipe = tmp_path / "r.yaml"
        recipe.write_text("passes:\n  - name: trainable\n    options: {layres: 2}\n")
        args = ["rewrite", str(files["mlp"]), "--recipe", str(recipe), "-o", str(tmp_path / "out")]
    else:
        args = ["train", str(files["artifacts"]), "--data", str(files["npz_shape"])]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "edgeplug.cli", *args], check=False, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), result.stderr
    assert_nothing_written(tmp_path / "out")
