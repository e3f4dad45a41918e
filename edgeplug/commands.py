"""The command-line surface that core and plugin commands share: the options every command takes, the help
format, and `CommandRegistry`, what the `edgeplug_register_commands` hook receives.

Every command (and every subcommand of a plugin's command group) accepts the global options before or
after its name: `--json`, `-q`, `-v`, `--no-progress`, `--debug`. Help shows each option's default and
choices.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

from edgeplug.errors import EdgeplugError


class UsageError(EdgeplugError):
    """A command line argparse cannot read (an unknown option, a bad choice, a missing argument)."""


class ArgumentParser(argparse.ArgumentParser):
    """Argparse whose usage errors are one line like every other error (`edgeplug: error: ...`, exit 2),
    pointing at the command's help instead of printing the usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


class HelpFormatter(argparse.HelpFormatter):
    """Argparse's help with each option's default appended, unless the help line already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default is argparse.SUPPRESS
                     or isinstance(action, (argparse._VersionAction, argparse._CountAction)))
        if shown and "%(default)" not in text and "default" not in text.lower():
            text += " (default: %(default)s)"
        return text


GLOBAL_OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("--json",), {"action": "store_true", "help": "print the result as one JSON document on stdout (logs and progress go to stderr)"}),
    (("-q", "--quiet"), {"action": "count", "default": 0,
                         "help": "less output: -q hides progress and information (warnings stay), -qq the result too"}),
    (("-v", "--verbose"), {"action": "count", "default": 0,
                           "help": "more output: -v shows edgeplug's debug messages, -vv also other libraries' logs"}),
    (("--no-progress",), {"action": "store_true", "help": "no progress bars (they are shown only on a terminal anyway)"}),
    (("--debug",), {"action": "store_true", "help": "also show the Python traceback of an error (the exit status stays the same)"}),
)
"""Options every command accepts. The top-level parser sets their defaults; each command's parser takes them
with `default=SUPPRESS` so that an option given before the command is not reset by the command's parser."""


def add_global_options(parser: argparse.ArgumentParser, *, top_level: bool) -> None:
    """Add the global options `parser` does not have yet (a command may define one itself, e.g. `--json FILE`)."""
    group = parser.add_argument_group("global options") if not top_level else parser
    for flags, settings in GLOBAL_OPTIONS:
        if any(flag in parser._option_string_actions for flag in flags):
            continue
        options = dict(settings)
        if not top_level:
            options["default"] = argparse.SUPPRESS
        group.add_argument(*flags, **options)


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser of the command tree with its command path, `parser` first (aliases once)."""
    yield path, parser
    seen: set[int] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    yield from walk(sub, (*path, name))


def is_command(parser: argparse.ArgumentParser) -> bool:
    """A parser that runs something (not only a group of subcommands)."""
    return not any(isinstance(action, argparse._SubParsersAction) and action.required for action in parser._actions)


class CommandRegistry:
    """What `edgeplug_register_commands` receives: add a subcommand with `add_parser`, as on argparse.

    `add_parser(name, help=..., **kwargs)` returns a plain `argparse.ArgumentParser`; give it a `run`
    default (`parser.set_defaults(run=function)`). The parser gets edgeplug's help format and, like
    every command, the global options (`--json`, `-q`, `-v`, ...).
    """

    def __init__(self, subparsers: Any) -> None:
        self._subparsers = subparsers

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        """Add the command `name`; keyword arguments as for argparse's `add_parser` (`help`, `description`, `aliases`)."""
        kwargs.setdefault("formatter_class", HelpFormatter)
        if "help" in kwargs and "description" not in kwargs:
            kwargs["description"] = kwargs["help"]
        parser: argparse.ArgumentParser = self._subparsers.add_parser(name, **kwargs)
        return parser

    @property
    def choices(self) -> Mapping[str, argparse.ArgumentParser]:
        """The commands registered so far, by name."""
        return dict(self._subparsers.choices)

    def __getattr__(self, name: str) -> Any:
        """Anything else argparse's subcommand collection has (plugins written against it keep working)."""
        return getattr(self._subparsers, name)
