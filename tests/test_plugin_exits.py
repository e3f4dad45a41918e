"""Plugins that exit, interrupt, raise or refuse to stop (issue #24, item 9).

A plugin runs in-process, so `sys.exit`, `KeyboardInterrupt` and `except BaseException`
in its code reach edgeplug. Each must end the command with a message that names the
plugin: never a silent exit 0 that did nothing, never a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import classification_data, mlp, write_plugin_distribution

from edgeplug.cli import main
from edgeplug.pipeline import rewrite

PREFIX = "edgeplug: error: "


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str, *names: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


# -- import and registration ---------------------------------------------------------------------------


@pytest.mark.parametrize("statement", ["import sys; sys.exit(0)", "raise SystemExit(3)", "raise GeneratorExit()"])
def test_a_plugin_exiting_at_import_is_named_not_a_silent_success(fake_plugin, capsys: pytest.CaptureFixture[str],
                                                                  statement: str) -> None:
    """`sys.exit(0)` at import made every command exit 0, having done nothing."""
    fake_plugin("quitter", statement + "\n")
    code, out, err = run(capsys, "passes")
    assert code == 2, (out, err)
    one_line(err, PREFIX, "plugin 'quitter'", "import")


def test_keyboard_interrupt_at_import_is_one_line_naming_the_plugin(fake_plugin, capsys: pytest.CaptureFixture[str]) -> None:
    """It printed a traceback."""
    fake_plugin("sleeper", "raise KeyboardInterrupt\n")
    code, _out, err = run(capsys, "passes")
    assert code == 130
    one_line(err, "interrupted", "plugin 'sleeper'")


@pytest.mark.parametrize("phase", ["__init__", "rewrite_forward", "report"])
def test_generator_exit_in_a_pass_phase_is_a_pass_error(tmp_path: Path, phase: str) -> None:
    """Found by the fuzz suite: GeneratorExit (a BaseException) escaped the pass wrapper (exit 99 in the worker)."""
    import edgeplug
    from edgeplug.plugins import PluginHost
    from edgeplug.recipe import PassSpec, Recipe

    def leave(self: object, *args: object) -> None:
        raise GeneratorExit

    methods = {phase: leave, "summary": "leaves", "name": "leaver"}
    methods.setdefault("report", lambda self: edgeplug.PassReport(False, "x"))
    leaver = type("Leaver", (edgeplug.Pass,), methods)

    class Plugin:
        @edgeplug.hookimpl
        def edgeplug_register_passes(self, register: object) -> None:
            register(leaver)  # type: ignore[operator]

    host = PluginHost(only={"normalize"})
    host.register(Plugin(), name="leaving", version="1")
    with pytest.raises(edgeplug.PassError, match=rf"pass 'leaver' \({phase}\): raised GeneratorExit"):
        rewrite(mlp(), Recipe((PassSpec("leaver", {}),)), tmp_path / "out", host=host)


@pytest.mark.parametrize("statement", ["sys.exit(0)", "raise SystemExit(1)", "raise KeyboardInterrupt"])
def test_an_exit_in_the_registration_hook_is_named(fake_plugin, capsys: pytest.CaptureFixture[str], statement: str) -> None:
    """SystemExit in edgeplug_register_passes emptied the pass list (exit 0)."""
    fake_plugin("registrar", f"""
import sys
import edgeplug

@edgeplug.hookimpl
def edgeplug_register_passes(register):
    {statement}
""")
    code, out, err = run(capsys, "passes")
    if "KeyboardInterrupt" in statement:
        assert code == 130
        one_line(err, "interrupted", "plugin 'registrar'")
    else:
        assert code == 2, (out, err)
        one_line(err, PREFIX, "plugin 'registrar'", "SystemExit")


def test_an_exit_while_adding_commands_is_named(fake_plugin, capsys: pytest.CaptureFixture[str]) -> None:
    fake_plugin("commander", """
import sys
import edgeplug

@edgeplug.hookimpl
def edgeplug_register_commands(commands):
    sys.exit(0)
""")
    code, _out, err = run(capsys, "passes")
    assert code == 2
    one_line(err, PREFIX, "plugin 'commander'", "SystemExit")


# -- runtime hooks -------------------------------------------------------------------------------------


HOOKED = """
import os
import sys
import edgeplug


class Hooks:
    @edgeplug.hookimpl
    def edgeplug_after_step(self, step, loss):
        if step.step == 2:
            mode = os.environ.get("HOOK_MODE", "")
            if mode == "raise":
                raise ValueError("hook bug at step 2")
            if mode == "exit":
                sys.exit(0)
            if mode == "interrupt":
                raise KeyboardInterrupt


class Hooked(edgeplug.Pass):
    name = "hooked"
    summary = "has runtime hooks that misbehave on request"

    def runtime_hooks(self, context):
        return Hooks()

    def report(self):
        return edgeplug.PassReport(False, "hooks only")


@edgeplug.hookimpl
def edgeplug_register_passes(register):
    register(Hooked)
"""


@pytest.fixture
def hooked(fake_plugin, tmp_path: Path) -> tuple[Path, Path]:
    fake_plugin("hookedplugin", HOOKED)
    (tmp_path / "r.yaml").write_text("passes:\n  - name: hooked\n")
    rewrite(mlp(), tmp_path / "r.yaml", tmp_path / "out")
    np.savez(tmp_path / "d.npz", **classification_data((8,), 3, n=32))
    return tmp_path / "out", tmp_path / "d.npz"


@pytest.mark.parametrize("mode, expected", [("raise", 2), ("exit", 2), ("interrupt", 130)])
def test_a_misbehaving_runtime_hook_is_named_and_training_can_resume(hooked: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch, mode: str, expected: int) -> None:
    """A raising hook exited 1 without naming the plugin; sys.exit(0) in a hook ended train with exit 0 and no checkpoint."""
    out, data = hooked
    monkeypatch.setenv("HOOK_MODE", mode)
    code, stdout, err = run(capsys, "train", out, "--data", data, "--batch-size", "8", "--checkpoint-every", "1", "--no-progress")
    assert code == expected, (stdout, err)
    line = one_line(err)
    if mode == "interrupt":
        assert "interrupted" in line
    else:
        assert line.startswith(PREFIX) and "pass 'hooked'" in line and "plugin 'hookedplugin'" in line and "edgeplug_after_step" in line
        assert ("ValueError: hook bug at step 2" if mode == "raise" else "SystemExit") in line
    monkeypatch.delenv("HOOK_MODE")
    code, stdout, err = run(capsys, "train", out, "--data", data, "--batch-size", "8", "--checkpoint-every", "1", "--no-progress")
    assert code == 0, err
    assert "resuming from step-00000002" in stdout  # the checkpoint before the failing step


# -- a pass that will not stop ---------------------------------------------------------------------------


STUBBORN = """
import time
import edgeplug


class Stubborn(edgeplug.Pass):
    name = "stubborn"
    summary = "swallows every exception, the timeout's included"

    def rewrite_forward(self, state, context):
        context.work_dir.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                time.sleep(0.05)
            except BaseException:
                pass

    def report(self):
        return edgeplug.PassReport(False, "never")


@edgeplug.hookimpl
def edgeplug_register_passes(register):
    register(Stubborn)
"""


def test_a_pass_that_catches_base_exception_is_stopped_by_the_cli(tmp_path: Path) -> None:
    """Catching BaseException defeated --pass-timeout: the rewrite ran forever."""
    site = tmp_path / "site"
    site.mkdir()
    write_plugin_distribution(site, "stubborn", "edgeplug_stubborn", STUBBORN)
    onnx.save(mlp(), str(tmp_path / "m.onnx"))
    (tmp_path / "r.yaml").write_text("passes:\n  - name: stubborn\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(site)}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "edgeplug.cli", "rewrite", tmp_path / "m.onnx", "--recipe", tmp_path / "r.yaml",
                             "-o", tmp_path / "out", "--pass-timeout", "1"], env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    assert time.monotonic() - started < 60
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr, PREFIX, "pass 'stubborn' (rewrite_forward)", "plugin 'stubborn' 1.0", "stopped")
    assert "did not finish within 1 s" in line
    assert not (tmp_path / "out").exists()
    # the next rewrite of that folder takes the lock and removes what the stopped one left
    result = subprocess.run([sys.executable, "-m", "edgeplug.cli", "rewrite", tmp_path / "m.onnx", "-o", tmp_path / "out"],
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out", "r.yaml", "site"]
