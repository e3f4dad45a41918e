"""Plugins add CLI subcommands through edgeplug_register_commands."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from edgeplug import cli, hookimpl
from edgeplug.errors import RecipeError
from edgeplug.plugins import default_host, reset_default_host


class GreetPlugin:
    """Adds `edgeplug greet NAME`; `greet nobody` is a user error."""

    @hookimpl
    def edgeplug_register_commands(self, commands: argparse._SubParsersAction) -> None:
        parser = commands.add_parser("greet", help="say hello")
        parser.add_argument("name")
        parser.set_defaults(run=self.run)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        if args.name == "nobody":
            raise RecipeError("cannot greet nobody: give a name")
        print(f"hello {args.name}")
        return 0


class ShadowPlugin:
    @hookimpl
    def edgeplug_register_commands(self, commands: argparse._SubParsersAction) -> None:
        commands.add_parser("train", help="a second train command")


class NoRunPlugin:
    @hookimpl
    def edgeplug_register_commands(self, commands: argparse._SubParsersAction) -> None:
        commands.add_parser("idle")


@pytest.fixture
def host_plugin() -> Iterator[object]:
    reset_default_host()
    yield default_host()
    reset_default_host()


@pytest.mark.covers_hook("edgeplug_register_commands")
def test_a_plugin_command_runs_and_its_user_errors_are_one_line(host_plugin, capsys) -> None:
    default_host().register(GreetPlugin(), name="greet")
    assert cli.main(["greet", "ada"]) == 0
    assert capsys.readouterr().out == "hello ada\n"
    assert cli.main(["greet", "nobody"]) == 2
    assert capsys.readouterr().err == "edgeplug: error: cannot greet nobody: give a name\n"


@pytest.mark.parametrize(("plugin", "message"), [
    (ShadowPlugin(), "plugin 'bad' adds a command whose name is taken"),
    (NoRunPlugin(), "plugin 'bad' added command 'idle' without a run function"),
])
def test_a_bad_command_plugin_is_named(host_plugin, capsys, plugin: object, message: str) -> None:
    default_host().register(plugin, name="bad")
    assert cli.main(["passes"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeplug: error: " + message) and err.count("\n") == 1
