"""Hostile recipes, flags, special files and data (issue #24, items 5-6).

Every case ends in exit status 2 with one line `edgeplug: error: ...` that names the
problem, quickly, without reading more than it needs: never a hang, a traceback, a
MemoryError or a recipe.json that is not JSON. The commands run as child processes
(a FIFO would block the test run itself; a memory blow-up is capped by `ulimit -v`).
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import mlp
from hostile import array_member, bomb_member, sparse_file, write_zip

from edgeplug.cli import main
from edgeplug.pipeline import rewrite

PREFIX = "edgeplug: error: "
GiB = 2**30


def cli(*args: object, memory: int | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run([sys.executable, "-m", "edgeplug.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=timeout, check=False, preexec_fn=limit)


def run(*args: object) -> subprocess.CompletedProcess[str]:
    """The command in this process (cases that cannot hang or crash): much faster than a child."""
    out, err = io.StringIO(), io.StringIO()
    real = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = main([str(a) for a in args])
    finally:
        sys.stdout, sys.stderr = real
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def assert_user_error(result: subprocess.CompletedProcess[str], *names: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and "Traceback" not in result.stderr, result.stderr
    for name in names:
        assert name.lower() in lines[0].lower(), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.onnx"
    onnx.save(mlp(8, (16,), 3), str(path))
    return path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, model: Path) -> Path:
    out = tmp_path_factory.mktemp("artifacts") / "out"
    rewrite(model, None, out)
    return out


@pytest.fixture(scope="module")
def good_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.standard_normal((16, 8)).astype(np.float32), y=rng.integers(0, 3, 16))
    return path


# -- 5. recipes: numbers, depth, special files ---------------------------------------------------------


@pytest.mark.parametrize("text, field", [
    ("optimizer: {lr: .nan}", "optimizer.lr"),
    ("optimizer: {lr: .inf}", "optimizer.lr"),
    ("optimizer: {lr: -.inf}", "optimizer.lr"),
    ("optimizer: {lr: 1.0e+308}", "optimizer.lr"),
    ("optimizer: {lr: 0.1, schedule: {name: step, step_size: 1, gamma: .nan}}", "gamma"),
    ("optimizer: {lr: 0.1, schedule: {name: step, step_size: 1, gamma: 1.0e+300}}", "gamma"),
    ("optimizer: {lr: 0.1, schedule: {name: cosine, final_lr_fraction: .nan}}", "final_lr_fraction"),
    ("passes: [{name: qcore, options: {drift_strength: .inf}}]", "passes[0].options.drift_strength"),
])
def test_non_finite_and_absurd_numbers_in_a_recipe_are_refused(tmp_path: Path, model: Path, text: str, field: str) -> None:
    """They were accepted and written into recipe.json as `"lr": NaN`, which is not JSON."""
    (tmp_path / "r.yaml").write_text(text + "\n")
    assert_user_error(run("rewrite", model, "--recipe", tmp_path / "r.yaml", "-o", tmp_path / "out"), field)
    assert not (tmp_path / "out").exists()


def test_recipe_json_is_strict_json(tmp_path: Path, model: Path) -> None:
    """`NaN` is not JSON: Python's json module reads it unless told otherwise."""
    (tmp_path / "r.json").write_text('{"optimizer": {"lr": NaN}}')
    assert_user_error(run("rewrite", model, "--recipe", tmp_path / "r.json", "-o", tmp_path / "out"), "r.json")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_recipe_nested_ten_thousand_levels_deep_is_a_user_error(tmp_path: Path, model: Path, suffix: str) -> None:
    """It exited 1 with a RecursionError."""
    depth = 10_000
    text = "passes: " + "[" * depth + "]" * depth if suffix == ".yaml" else '{"passes": ' + "[" * depth + "]" * depth + "}"
    (tmp_path / f"r{suffix}").write_text(text)
    assert_user_error(run("rewrite", model, "--recipe", tmp_path / f"r{suffix}", "-o", tmp_path / "out"), "deep")


def test_a_yaml_billion_laughs_recipe_is_refused_without_expanding_it(tmp_path: Path, model: Path) -> None:
    """Nine levels of ten aliases: 10**9 values if expanded (the schema validator would walk them all)."""
    lines = ['a0: &a0 ["lol"]'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)] + ["passes: *a9"]
    (tmp_path / "r.yaml").write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    assert_user_error(cli("rewrite", model, "--recipe", tmp_path / "r.yaml", "-o", tmp_path / "out", timeout=60), "values")
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "/dev/null", "folder", "/dev/urandom"])
def test_a_recipe_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path, model: Path, special: str) -> None:
    """A FIFO hung forever; /dev/zero was read until MemoryError."""
    if special == "fifo":
        recipe = tmp_path / "r.yaml"
        os.mkfifo(recipe)
    elif special == "folder":
        recipe = tmp_path / "r.yaml"
        recipe.mkdir()
    else:
        recipe = Path(special)
    started = time.monotonic()
    assert_user_error(cli("rewrite", model, "--recipe", recipe, "-o", tmp_path / "out", timeout=60), str(recipe))
    assert time.monotonic() - started < 30


def test_a_huge_recipe_file_is_refused_without_reading_it_all(tmp_path: Path, model: Path) -> None:
    recipe = sparse_file(tmp_path / "r.yaml", 2 * GiB)
    assert_user_error(cli("rewrite", model, "--recipe", recipe, "-o", tmp_path / "out", memory=GiB + GiB // 2), "r.yaml")


@pytest.mark.parametrize("target", ["fifo", "/dev/zero", "fifo-in-folder"])
def test_export_checkpoint_that_is_not_a_regular_file_is_refused(tmp_path: Path, artifacts: Path, target: str) -> None:
    """`export --checkpoint <fifo>` hung."""
    if target == "fifo":
        checkpoint = tmp_path / "state"
        os.mkfifo(checkpoint)
    elif target == "fifo-in-folder":
        checkpoint = tmp_path / "step"
        checkpoint.mkdir()
        os.mkfifo(checkpoint / "state")
    else:
        checkpoint = Path(target)
    assert_user_error(cli("export", artifacts, "--checkpoint", checkpoint, "-o", tmp_path / "e.onnx"), "checkpoint")
    assert not (tmp_path / "e.onnx").exists()


@pytest.mark.parametrize("flag, value, name", [
    ("--lr", "-1", "--lr"), ("--lr", "0", "--lr"), ("--lr", "nan", "--lr"), ("--lr", "inf", "--lr"), ("--lr", "1e308", "--lr"),
    ("--seed", "-1", "--seed"),
    ("--checkpoint-every", "0", "--checkpoint-every"), ("--checkpoint-every", "-3", "--checkpoint-every"),
    ("--epochs", "0", "epochs"), ("--batch-size", "-1", "batch"),
])
def test_bad_numbers_on_the_train_command_line(tmp_path: Path, artifacts: Path, good_data: Path, flag: str, value: str, name: str) -> None:
    """`--lr -1`/`--lr 0` were accepted; `train --restart --seed -1` exited 1."""
    assert_user_error(run("train", artifacts, "--data", good_data, "--restart", "--no-progress", "--no-checkpoints", flag, value), name)


@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_bad_pass_timeouts_are_refused(tmp_path: Path, model: Path, value: str) -> None:
    assert_user_error(run("rewrite", model, "-o", tmp_path / "out", "--pass-timeout", value), "--pass-timeout")


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--steps", "0"), ("--warmup", "-1"), ("--nodes", "-1")])
def test_bad_profile_numbers_are_refused(artifacts: Path, flag: str, value: str) -> None:
    assert_user_error(run("profile", artifacts, "--static-only", flag, value), flag)


# -- 6. data: corrupt archives, bombs, members never used, non-finite values --------------------------------


def test_corrupt_deflate_data_is_a_user_error(tmp_path: Path, artifacts: Path) -> None:
    """A flipped byte inside a compressed member: zlib.error, exit 1."""
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez_compressed(path, x=rng.standard_normal((64, 8)).astype(np.float32), y=rng.integers(0, 3, 64))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("x.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 40
    for position in range(start, start + 64, 3):
        data[position] ^= 0x5A
    path.write_bytes(bytes(data))
    assert_user_error(run("train", artifacts, "--data", path, "--restart", "--no-checkpoints", "--no-progress"), "d.npz")


def test_an_npy_header_claiming_2_to_the_40_rows_is_refused_from_the_header(tmp_path: Path, artifacts: Path) -> None:
    path = tmp_path / "d.npz"
    write_zip(path, [bomb_member("x.npy", (2**40, 8), payload=64 * 32), array_member("y.npy", np.zeros(64, np.int64))])
    assert_user_error(cli("train", artifacts, "--data", path, "--restart", "--no-checkpoints", "--no-progress", memory=3 * GiB),
                      "x.npy")


def test_an_npy_file_renamed_npz_is_named_as_such(tmp_path: Path, artifacts: Path) -> None:
    np.save(tmp_path / "d.npy", np.zeros((4, 8), np.float32))
    (tmp_path / "d.npy").rename(tmp_path / "d.npz")
    assert_user_error(run("train", artifacts, "--data", tmp_path / "d.npz", "--restart", "--no-checkpoints", "--no-progress"), ".npy")


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """x: 2**25 x 8 float32 zeros (1 GiB) deflated to about 1 MB; y: 64 labels."""
    path = write_zip(tmp_path_factory.mktemp("bomb") / "bomb.npz",
                     [bomb_member("x.npy", (2**25, 8)), array_member("y.npy", np.zeros(64, np.int64))])
    assert path.stat().st_size < 4 * 2**20
    return path


def test_a_deflate_bomb_that_disagrees_with_the_labels_is_refused_before_it_is_inflated(artifacts: Path, bomb: Path) -> None:
    """A 4 MB bomb took 4.2 GB. Here the headers already say 33,554,432 samples against 64 labels."""
    started = time.monotonic()
    assert_user_error(cli("train", artifacts, "--data", bomb, "--restart", "--no-checkpoints", "--no-progress", memory=GiB + GiB // 4),
                      "samples")
    assert time.monotonic() - started < 30


def test_data_larger_than_the_memory_left_is_refused_with_its_size(tmp_path: Path, artifacts: Path) -> None:
    path = tmp_path / "d.npz"
    rows = 2**25
    write_zip(path, [bomb_member("x.npy", (rows, 8)), bomb_member("y.npy", (rows,), "<i8")])
    message = assert_user_error(cli("train", artifacts, "--data", path, "--restart", "--no-checkpoints", "--no-progress",
                                    memory=GiB + GiB // 2), "memory")
    assert "1.2 GiB" in message or "1.5 GiB" in message


def test_a_bomb_member_that_is_never_used_is_never_inflated(tmp_path: Path, artifacts: Path, good_data: Path) -> None:
    """Every member used to be decompressed: a 1 MB npz with an unused bomb took 1.1 GB."""
    path = tmp_path / "d.npz"
    with np.load(good_data) as good:
        write_zip(path, [array_member("x.npy", good["x"]), array_member("y.npy", good["y"]), bomb_member("junk.npy", (2**25, 8))])
    metrics = tmp_path / "metrics.json"
    result = cli("train", artifacts, "--data", path, "--restart", "--no-checkpoints", "--no-progress", "--metrics", metrics,
                 memory=GiB + GiB // 2)
    assert result.returncode == 0, result.stderr
    assert json.loads(metrics.read_text())["peak_rss_bytes"] < 600 * 2**20


def test_a_member_whose_zip_size_disagrees_with_its_header_is_refused(tmp_path: Path, artifacts: Path) -> None:
    path = tmp_path / "d.npz"
    write_zip(path, [bomb_member("x.npy", (64, 8), payload=64 * 8 * 4 - 100), array_member("y.npy", np.zeros(64, np.int64))])
    assert_user_error(run("train", artifacts, "--data", path, "--restart", "--no-checkpoints", "--no-progress"), "x.npy")


@pytest.mark.parametrize("where, value", [("x", np.nan), ("x", np.inf), ("x", -np.inf), ("y-mse", np.nan)])
def test_non_finite_data_is_named_not_blamed_on_the_learning_rate(tmp_path: Path, model: Path, where: str, value: float) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 8)).astype(np.float32)
    if where == "x":
        x[5, 3] = value
        out, y = tmp_path / "out", rng.integers(0, 3, 16)
        rewrite(model, None, out)
    else:
        (tmp_path / "r.yaml").write_text("loss: mse\n")
        out, y = tmp_path / "out", rng.standard_normal((16, 3)).astype(np.float32)
        y[2, 1] = value
        rewrite(model, tmp_path / "r.yaml", out)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    message = assert_user_error(run("train", out, "--data", tmp_path / "d.npz", "--no-progress"), "sample")
    assert ("'x'" in message) if where == "x" else ("'y'" in message)
    assert "nan" in message.lower() or "inf" in message.lower()
    assert "--lr" not in message
    assert "sample 5" in message if where == "x" else "sample 2" in message


def test_deflate_stream_errors_are_caught_for_stored_members_too(tmp_path: Path, artifacts: Path) -> None:
    """A stored (uncompressed) member whose CRC does not match its bytes."""
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.standard_normal((64, 8)).astype(np.float32), y=rng.integers(0, 3, 64))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("x.npy")
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 200] ^= 0xFF
    path.write_bytes(bytes(data))
    assert_user_error(run("train", artifacts, "--data", path, "--restart", "--no-checkpoints", "--no-progress"), "d.npz")

