"""Every command, plugins' included, follows the CLI conventions (docs/cli.md, "Conventions").

The parser is walked as a whole: a command added later (by the core or a built-in plugin) is checked
without anyone listing it here, except in `JSON_RUNS`/`ERROR_RUNS`, which a new command must join
(the last test says so).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import mlp

from edgeplug import cli
from edgeplug.commands import GLOBAL_OPTIONS, is_command, walk
from edgeplug.plugins import reset_default_host


@pytest.fixture(scope="module")
def parser() -> Iterator[argparse.ArgumentParser]:
    reset_default_host()
    yield cli.build_parser()
    reset_default_host()


def _commands(parser: argparse.ArgumentParser) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    return [(path, sub) for path, sub in walk(parser) if path and is_command(sub)]


def _options(sub: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in sub._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction))]


def test_the_tree_holds_core_fleet_and_plugin_commands(parser: argparse.ArgumentParser) -> None:
    names = {" ".join(path) for path, _ in _commands(parser)}
    assert {"passes", "inspect", "rewrite", "train", "export", "profile", "schema", "pack-data", "fleet simulate", "fleet app",
            "fleet credentials", "quantize", "calibrate", "personalize anchors", "personalize apply"} <= names


def test_every_option_has_a_help_line_its_default_and_its_choices(parser: argparse.ArgumentParser) -> None:
    problems = []
    for path, sub in walk(parser):
        text = " ".join(sub.format_help().split())
        for action in _options(sub):
            name = "/".join(action.option_strings) or action.dest
            where = f"edgeplug {' '.join(path)} {name}"
            if not action.help or action.help == argparse.SUPPRESS:
                problems.append(f"{where}: no help line")
                continue
            default = action.default
            if not (default is None or default is False or default is argparse.SUPPRESS or isinstance(action, argparse._CountAction)):
                if f"default: {default}" not in text and "default" not in action.help.lower():
                    problems.append(f"{where}: help does not show the default {default!r}")
            if action.choices and not all(str(choice) in text for choice in action.choices):
                problems.append(f"{where}: help does not list the choices")
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                described = {choice.dest for choice in action._choices_actions if choice.help}
                problems += [f"edgeplug {' '.join(path)} {name}: no help line" for name in action.choices if name not in described]
    assert problems == []


def _required_arguments(sub: argparse.ArgumentParser, path: str = "x") -> list[str]:
    """Values for the positionals and required options, so the command line parses: the first choice, 1 for
    numbers, `path` for the rest (files and folders)."""
    values: list[str] = []
    for action in sub._actions:
        if not (action.required or not action.option_strings) or isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        value = str(action.choices[0]) if action.choices else ("1" if action.type in (int, float) else path)
        values += ([action.option_strings[0]] if action.option_strings else []) + [value]
    return values


def test_global_options_are_taken_before_and_after_every_command(parser: argparse.ArgumentParser) -> None:
    for path, sub in _commands(parser):
        needed = _required_arguments(sub)
        after = parser.parse_args([*path, *needed, "--json", "-qq", "--no-progress", "--debug"])
        before = parser.parse_args(["--json", "-v", "--debug", *path, *needed])
        plain = parser.parse_args([*path, *needed])
        assert after.json is True and after.quiet == 2 and after.no_progress and after.debug, path
        assert before.json is True and before.verbose == 1 and before.debug, path  # not reset by the command's parser
        assert plain.json is False and plain.quiet == 0 and plain.verbose == 0 and not plain.debug, path
        assert callable(after.run), path
    global_flags = {flag for flags, _ in GLOBAL_OPTIONS for flag in flags}
    assert {"--json", "-q", "-v", "--no-progress", "--debug"} <= global_flags


def test_plugin_hooks_get_no_private_argparse_type() -> None:
    import inspect

    from edgeplug import hookspecs
    from edgeplug.commands import CommandRegistry

    hint = inspect.signature(hookspecs.edgeplug_register_commands).parameters["commands"].annotation
    assert hint == "CommandRegistry" and "_" not in hint
    assert hasattr(CommandRegistry, "add_parser")


def test_version_loads_no_plugin_and_no_onnx() -> None:
    code = ("import sys, time; started = time.perf_counter()\n"
            "from edgeplug.cli import main\n"
            "assert main(['--version']) == 0\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'numpy', 'onnxruntime', 'pluggy', 'edgeplug_plugins'))\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0].startswith("edgeplug ") and out.splitlines()[-1] == "[]"


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run([sys.executable, "-m", "edgeplug", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("edgeplug ")


# -- --json on every command -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small model, its artifact folder (rewritten once) and data for the commands that run for real."""
    folder = tmp_path_factory.mktemp("conventions")
    model = folder / "mlp.onnx"
    onnx.save(mlp(8, (16,), 3, seed=1), str(model))
    rng = np.random.default_rng(0)
    data = folder / "train.npz"
    np.savez(data, x=rng.standard_normal((40, 8)).astype(np.float32), y=rng.integers(0, 3, 40).astype(np.int64))
    out = folder / "out"
    reset_default_host()
    assert cli.main(["rewrite", str(model), "-o", str(out), "-q"]) == 0
    return {"folder": folder, "model": model, "out": out, "data": data}


JSON_RUNS: dict[str, list[str]] = {
    "passes": [],
    "inspect": ["{model}"],
    "rewrite": ["{model}", "-o", "{folder}/again"],
    "train": ["{out}", "--data", "{data}", "--batch-size", "8"],
    "pack-data": ["{out}", "{data}", "-o", "{folder}/data.safetensors"],
    "export": ["{out}", "-o", "{folder}/trained.onnx"],
    "profile": ["{out}", "--static-only"],
    "schema": [],
    "fleet credentials": ["-o", "{folder}/credentials"],
    "completion": [],
}
"""Commands run for real with --json here; each must print exactly one JSON document on stdout."""

ERROR_RUNS: dict[str, str] = {
    "fleet simulate": "Flower and a digits-sized model: tests/test_fleet.py runs it with --json",
    "fleet app": "Flower; tests/test_fleet_deployment.py runs the app with flwr run",
    "quantize": "minutes of qcore training: tests/test_qcore_cli.py runs it with --json",
    "calibrate": "needs quantize first: tests/test_qcore_cli.py runs it with --json",
    "export-quantized": "needs quantize first: tests/test_qcore_cli.py runs it with --json",
    "meta-pretrain": "needs image-shaped source episodes: tests/test_meta_pretrain.py runs it with --json",
    "personalize anchors": "tests/test_personalize.py runs every step with --json",
    "personalize train-generator": "tests/test_personalize.py",
    "personalize generate": "tests/test_personalize.py",
    "personalize baseline": "tests/test_personalize.py",
    "personalize apply": "tests/test_personalize.py",
}
"""Commands too slow or too networked for this module: run here on a folder that does not exist (one error line on
stderr, nothing on stdout), and for real with --json in the test module named."""


@pytest.mark.parametrize("command", sorted(JSON_RUNS))
def test_json_prints_one_document_and_nothing_else(command: str, workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    arguments = [argument.format(**workspace) for argument in JSON_RUNS[command]]
    assert cli.main([*command.split(), *arguments, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)  # the whole of stdout is one document
    assert document
    assert cli.main([*command.split(), *arguments, *(["--force"] if command in ("rewrite", "fleet credentials") else [])]) == 0
    text = capsys.readouterr().out
    assert text.strip() and text.lstrip()[0] not in "{[", "without --json a command prints text"


def test_quiet_keeps_the_result_and_qq_prints_nothing(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["train", str(workspace["out"]), "--data", str(workspace["data"]), "--batch-size", "8", "--epochs", "3"]
    assert cli.main([*arguments, "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("done: ") and "epoch" not in captured.out  # epoch lines are information
    assert cli.main([*arguments, "--epochs", "4", "-qq"]) == 0
    assert capsys.readouterr().out == ""
    assert cli.main([*arguments, "--epochs", "5"]) == 0
    assert "epoch 5/5" in capsys.readouterr().out  # by default information shows on stdout (as pip does)
    assert cli.main([*arguments, "--epochs", "6", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["steps_run"] == 5 and "epoch 6/6" in captured.err


@pytest.mark.parametrize("command", sorted(ERROR_RUNS))
def test_json_errors_leave_stdout_empty(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        parser: argparse.ArgumentParser) -> None:
    sub = dict(_commands(parser))[tuple(command.split())]
    arguments = [*command.split(), *_required_arguments(sub, str(tmp_path / "missing")), "--json"]
    code = cli.main(arguments)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("edgeplug: error: ")


def test_every_command_is_checked_for_json(parser: argparse.ArgumentParser) -> None:
    """A new command joins JSON_RUNS (run here) or ERROR_RUNS (run for real elsewhere)."""
    names = {" ".join(path) for path, _ in _commands(parser)}
    assert names - set(JSON_RUNS) - set(ERROR_RUNS) == set()


def test_a_command_that_predates_print_result_still_gives_one_document(capsys: pytest.CaptureFixture[str]) -> None:
    from edgeplug import hookimpl
    from edgeplug.plugins import default_host

    class Old:
        @hookimpl
        def edgeplug_register_commands(self, commands: object) -> None:
            parser = commands.add_parser("hello", help="say hello")  # type: ignore[attr-defined]
            parser.set_defaults(run=lambda args: print("hello") or 0)

    reset_default_host()
    try:
        default_host().register(Old(), name="old")
        assert cli.main(["hello", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == {"command": "hello", "output": "hello\n"}
        assert cli.main(["hello"]) == 0
        assert capsys.readouterr().out == "hello\n"
    finally:
        reset_default_host()


def test_the_cli_reference_names_every_command_and_option(parser: argparse.ArgumentParser) -> None:
    """docs/cli.md stays complete: every command (by its name) and every long option of it appear there."""
    import re

    reference = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text(encoding="utf-8")
    global_flags = {flag for flags, _ in GLOBAL_OPTIONS for flag in flags}
    missing = []
    for path, sub in _commands(parser):
        name = " ".join(path)
        if not any(form in reference for form in (f"edgeplug {name}", f"`{path[-1]} ", f"`{path[-1]}`", f"`{name}")):
            missing.append(f"command {name}")
        for action in sub._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag not in global_flags and flag != "--help" and \
                        not re.search(re.escape(flag) + r"(?![\w-])", reference):
                    missing.append(f"{name} {flag}")
    assert missing == []


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_completes_commands_options_and_choices(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    reset_default_host()
    assert cli.main(["completion", "bash"]) == 0
    script = tmp_path / "edgeplug.bash"
    script.write_text(capsys.readouterr().out)
    cases = {"edgeplug tr": "train", "edgeplug train out --ep": "--epochs", "edgeplug train out --runtime ''": "python node",
             "edgeplug fleet si": "simulate", "edgeplug -q train --js": "--json", "edgeplug calibrate out --str": "--stream",
             "edgeplug personalize apply --sl": "--slots"}
    program = "source " + str(script) + "\n" + "\n".join(
        f"COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}}-1)); COMPREPLY=(); _edgeplug; echo \"${{COMPREPLY[*]}}\""
        for words in cases)
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == list(cases.values())


def test_progress_names_each_phase_on_a_terminal_and_is_silent_otherwise(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeplug import progress

    arguments = ["rewrite", str(workspace["model"]), "-o", str(workspace["folder"] / "watched"), "--force"]
    assert cli.main(arguments) == 0
    assert "rewrite:" not in capsys.readouterr().err  # captured stderr is not a terminal: no bar
    monkeypatch.setattr(progress, "enabled", lambda: True)  # what a terminal gets
    assert cli.main(arguments) == 0
    drawn = capsys.readouterr().err
    assert "rewrite:" in drawn and "normalize: rewrite_forward" in drawn and "rewrite_training" in drawn
    assert cli.main(["profile", str(workspace["out"]), "--steps", "1", "--warmup", "0", "--nodes", "0"]) == 0
    drawn = capsys.readouterr().err
    assert all(phase in drawn for phase in ("counting bytes and MACs", "measuring inference", "onnxruntime's profiler"))
