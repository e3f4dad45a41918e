"""No file escapes, and untrusted plugins cannot hide: external data, output paths, plugin names, hangs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from builders import classification_data, mlp, write_plugin_distribution
from onnx import TensorProto

import edgeplug
import edgeplug.modelio
from edgeplug.checkpoints import LATEST, checkpoints_dir, latest_checkpoint
from edgeplug.modelio import load_model
from edgeplug.pipeline import rewrite
from edgeplug.plugins import PluginHost
from edgeplug.recipe import PassSpec, Recipe
from edgeplug.trainer import Trainer

PREFIX = "edgeplug: error: "


def cli(*args: object, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgeplug.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, check=False)


def assert_user_error(result: subprocess.CompletedProcess[str], *names: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and "Traceback" not in result.stderr, result.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


# -- external data ------------------------------------------------------------------------------------


def external_model(folder: Path, location: str, *, offset: int | None = None, length: int | None = None,
                   tensor: str = "fc0.weight") -> Path:
    """mlp() with one initializer's bytes moved to external data at `location` (not written)."""
    model = mlp(8, (16,), 3)
    init = next(t for t in model.graph.initializer if t.name == tensor)
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = init.external_data.add()
            entry.key, entry.value = key, str(value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def weights_bytes() -> bytes:
    init = next(t for t in mlp(8, (16,), 3).graph.initializer if t.name == "fc0.weight")
    return onnx.numpy_helper.to_array(init).tobytes()


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file edgeplug.modelio opens itself (external data is read only there)."""
    paths: list[Path] = []
    real_open = open

    def spy(file: Any, *args: Any, **kwargs: Any) -> Any:
        paths.append(Path(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(edgeplug.modelio, "open", spy, raising=False)
    return paths


def test_external_data_inside_the_folder_loads(tmp_path: Path, opened: list[Path]) -> None:
    (tmp_path / "model" / "data").mkdir(parents=True)
    (tmp_path / "model" / "data" / "w.bin").write_bytes(b"pad!" + weights_bytes())
    path = external_model(tmp_path / "model", "data/w.bin", offset=4, length=len(weights_bytes()))
    model = load_model(path)
    reference = mlp(8, (16,), 3)
    assert model.graph.initializer[0].raw_data == reference.graph.initializer[0].raw_data
    assert opened == [(tmp_path / "model" / "data" / "w.bin").resolve()]
    rewrite(path, None, tmp_path / "out")  # and the whole pipeline takes it


@pytest.mark.parametrize("case", ["absolute", "dotdot", "symlink-file", "symlink-dir", "symlink-dev-zero", "nul",
                                  "long", "empty", "folder-itself", "loop"])
def test_external_data_that_leaves_the_folder_is_refused_before_any_read(tmp_path: Path, opened: list[Path], case: str) -> None:
    outside = tmp_path / "secret.bin"
    outside.write_bytes(weights_bytes())
    folder = tmp_path / "model"
    folder.mkdir()
    location = {"absolute": str(outside), "dotdot": "../secret.bin", "symlink-file": "link.bin",
                "symlink-dir": "linkdir/secret.bin", "symlink-dev-zero": "zero.bin", "nul": "w\0.bin",
                "long": "a/" * 3000 + "w.bin", "empty": "", "folder-itself": ".", "loop": "loop/w.bin"}[case]
    if case == "symlink-file":
        (folder / "link.bin").symlink_to(outside)
    elif case == "symlink-dir":
        (folder / "linkdir").symlink_to(tmp_path)
    elif case == "symlink-dev-zero":
        (folder / "zero.bin").symlink_to("/dev/zero")
    elif case == "loop":
        (folder / "loop").symlink_to(folder / "loop")
    path = external_model(folder, location)
    with pytest.raises(edgeplug.ModelError, match="fc0.weight") as caught:
        load_model(path)
    assert "\n" not in str(caught.value)
    assert opened == [], f"opened {opened} before refusing"


@pytest.mark.parametrize("offset, length, match", [
    (0, 2**40, "declares external data bytes"),
    (2**40, 16, "declares external data bytes"),
    (-4, 16, "declares external data bytes"),
    (0, 16, "declares shape"),  # fewer bytes than the [8, 16] float tensor needs
])
def test_external_data_ranges_are_checked(tmp_path: Path, offset: int, length: int, match: str) -> None:
    (tmp_path / "w.bin").write_bytes(weights_bytes())
    with pytest.raises(edgeplug.ModelError, match=match):
        load_model(external_model(tmp_path, "w.bin", offset=offset, length=length))


def test_absurd_declared_shape_is_refused(tmp_path: Path) -> None:
    model = mlp(8, (16,), 3)
    model.graph.initializer[0].dims[0] = 2**40
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(edgeplug.ModelError, match="fc0.weight.*damaged"):
        load_model(tmp_path / "m.onnx")


def test_a_fifo_is_never_opened(tmp_path: Path) -> None:
    """Reading a FIFO would block forever: it must be refused from its type, in a process that would hang."""
    folder = tmp_path / "model"
    folder.mkdir()
    os.mkfifo(folder / "w.bin")
    path = external_model(folder, "w.bin", offset=0, length=512)
    assert_user_error(cli("inspect", path, timeout=60), "not a regular file")


# -- outputs stay under the output folder --------------------------------------------------------------


def passes_host(*passes: type[edgeplug.Pass]) -> PluginHost:
    class Plugin:
        @edgeplug.hookimpl
        def edgeplug_register_passes(self, register: Any) -> None:
            for factory in passes:
                register(factory)

    host = PluginHost(only={"normalize"})
    host.register(Plugin(), name="test-plugin", version="0.0")
    return host


def make_pass(name: str, **methods: Any) -> type[edgeplug.Pass]:
    methods.setdefault("report", lambda self: edgeplug.PassReport(False, "nothing"))
    return type("P", (edgeplug.Pass,), {"name": name, "summary": "test", **methods})


def test_rewrite_writes_only_the_output_folder(tmp_path: Path) -> None:
    def note(self: edgeplug.Pass, state: edgeplug.ForwardState, context: edgeplug.PassContext) -> edgeplug.ForwardState:
        context.work_dir.mkdir(parents=True)
        (context.work_dir / "n.txt").write_text("x")
        return state

    (tmp_path / "out").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    noter = make_pass("noter", rewrite_forward=note)
    rewrite(mlp(), Recipe((PassSpec("noter", {}),)), tmp_path / "out", force=True, host=passes_host(noter))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no lock file, staging or retired folder left
    assert (tmp_path / "out" / "passes" / "noter" / "n.txt").is_file()


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", "x" * 65, ""])
def test_pass_names_that_are_not_plain_folder_names_are_refused(name: str) -> None:
    bad = type("Bad", (edgeplug.Pass,), {"name": name, "summary": "s"})
    with pytest.raises(edgeplug.PluginError, match="test-plugin"):
        passes_host(bad).passes()


def test_checkpoints_are_not_written_through_a_symlink(tmp_path: Path) -> None:
    rewrite(mlp(), None, tmp_path / "out")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    checkpoints_dir(tmp_path / "out").symlink_to(elsewhere)
    with pytest.raises(edgeplug.OutputError, match="symbolic link"):
        Trainer(tmp_path / "out", progress=False).fit(classification_data((8,), 3, n=8), epochs=1, batch_size=4)
    assert list(elsewhere.iterdir()) == []


def test_latest_pointing_outside_is_ignored(tmp_path: Path) -> None:
    rewrite(mlp(), None, tmp_path / "out")
    Trainer(tmp_path / "out", progress=False).fit(classification_data((8,), 3, n=8), epochs=1, batch_size=4)
    good = latest_checkpoint(tmp_path / "out")
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "state").write_bytes(b"x")
    (decoy / "trainer.json").write_text("{}")
    (checkpoints_dir(tmp_path / "out") / LATEST).write_text("../../decoy\n")
    assert latest_checkpoint(tmp_path / "out") == good


# -- plugins --------------------------------------------------------------------------------------------


SHADOW = """
import edgeplug

class Impostor(edgeplug.Pass):
    name = {name!r}
    summary = "pretends to be a built-in"

    def report(self):
        return edgeplug.PassReport(changed=True, summary="impostor ran")

@edgeplug.hookimpl
def edgeplug_register_passes(register):
    register(Impostor)
"""


@pytest.mark.parametrize("only", [None, {"evil", "trainable"}], ids=["all-plugins", "built-in-not-loaded"])
def test_a_plugin_cannot_replace_a_built_in_pass(fake_plugin, only: set[str] | None) -> None:
    fake_plugin("evil", SHADOW.format(name="normalize"))
    with pytest.raises(edgeplug.PluginError, match="plugin 'evil' registers a pass named 'normalize', the name of a built-in pass"):
        PluginHost(only=only).passes()


def test_an_entry_point_named_like_a_built_in_plugin_is_refused(fake_plugin) -> None:
    fake_plugin("trainable", SHADOW.format(name="trainable-impostor"))
    with pytest.raises(edgeplug.PluginError, match="plugin name 'trainable' is declared by two installed distributions"):
        PluginHost()


def test_an_entry_point_named_like_a_core_stage_is_refused(fake_plugin) -> None:
    fake_plugin("normalize", SHADOW.format(name="normalize-impostor"))
    with pytest.raises(edgeplug.PluginError, match="plugin name 'normalize' .* is taken by a stage of the core"):
        PluginHost()


def test_a_plugin_calling_sys_exit_is_a_pass_error(tmp_path: Path) -> None:
    quitter = make_pass("quitter", rewrite_forward=lambda self, state, context: sys.exit(0))
    with pytest.raises(edgeplug.PassError, match=r"pass 'quitter' \(rewrite_forward\): raised SystemExit"):
        rewrite(mlp(), Recipe((PassSpec("quitter", {}),)), tmp_path / "out", host=passes_host(quitter))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("phase", ["__init__", "rewrite_forward", "rewrite_training", "report"])
def test_a_hanging_pass_is_stopped_and_named(tmp_path: Path, phase: str) -> None:
    def hang(self: edgeplug.Pass, *args: Any) -> Any:
        while True:
            try:
                time.sleep(0.01)
            except Exception:  # noqa: BLE001, S110 - swallows everything, as careless plugin code does
                pass

    stuck = make_pass("stuck", **{phase: hang})
    started = time.monotonic()
    with pytest.raises(edgeplug.PassError, match=rf"pass 'stuck' \({phase}\): did not finish within 0.3 s \(plugin 'test-plugin' 0.0\)"):
        rewrite(mlp(), Recipe((PassSpec("stuck", {}),)), tmp_path / "out", host=passes_host(stuck), pass_timeout=0.3)
    assert time.monotonic() - started < 30
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_pass_timeout_from_the_environment_through_the_cli(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    write_plugin_distribution(site, "sleepy", "edgeplug_sleepy", ("""
        import time
        import edgeplug

        class Sleepy(edgeplug.Pass):
            name = "sleepy"
            summary = "sleeps"

            def rewrite_forward(self, state, context):
                time.sleep(600)
                return state

            def report(self):
                return edgeplug.PassReport(False, "slept")

        @edgeplug.hookimpl
        def edgeplug_register_passes(register):
            register(Sleepy)
    """))
    onnx.save(mlp(), str(tmp_path / "m.onnx"))
    (tmp_path / "r.yaml").write_text("passes:\n  - name: sleepy\n")
    env = {"PYTHONPATH": str(site), "EDGEPLUG_PASS_TIMEOUT": "1"}
    started = time.monotonic()
    result = cli("rewrite", tmp_path / "m.onnx", "--recipe", tmp_path / "r.yaml", "-o", tmp_path / "out", env=env)
    assert_user_error(result, "pass 'sleepy' (rewrite_forward): did not finish within 1 s", "plugin 'sleepy' 1.0")
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out").exists()
    # The allow-list: the plugin is not loaded, so a recipe naming it is a recipe error, and a plain rewrite works.
    env["EDGEPLUG_PLUGINS"] = "normalize,trainable"
    assert_user_error(cli("rewrite", tmp_path / "m.onnx", "--recipe", tmp_path / "r.yaml", "-o", tmp_path / "out", env=env), "sleepy")
    assert cli("rewrite", tmp_path / "m.onnx", "-o", tmp_path / "out", env=env).returncode == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["passes"][0]["name"] == "normalize"


def test_cli_errors_are_one_line_even_with_control_characters(tmp_path: Path) -> None:
    onnx.save(mlp(), str(tmp_path / "m.onnx"))
    (tmp_path / "r.json").write_text(json.dumps({"bad\nfield\r": 1}))
    message = assert_user_error(cli("rewrite", tmp_path / "m.onnx", "--recipe", tmp_path / "r.json", "-o", tmp_path / "out"))
    assert "bad\\nfield\\r" in message


def test_data_npz_with_pickles_is_refused(tmp_path: Path) -> None:
    rewrite(mlp(), None, tmp_path / "out")
    np.save(tmp_path / "x.npy", np.array([object()], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "d.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4, np.int64))
    assert_user_error(cli("train", tmp_path / "out", "--data", tmp_path / "d.npz", "--no-progress"), "d.npz")
