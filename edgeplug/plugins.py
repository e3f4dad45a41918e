"""Plugin loading and the typed facade the core uses instead of `pm.hook.*`.

Plugins, built-in ones included, are found through the ``edgeplug`` entry-point
group. ``EDGEPLUG_PLUGINS=name,name`` loads only the named entry points,
``EDGEPLUG_BLOCK_PLUGINS=name,name`` loads all but the named ones;
``EDGEPLUG_TRACE_HOOKS=1`` prints every hook call to stderr.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pluggy

from edgeplug import hookspecs
from edgeplug.errors import EdgeplugError, PluginError
from edgeplug.passes import Pass, PassInfo

hookimpl = pluggy.HookimplMarker(hookspecs.PROJECT_NAME)
"""Decorator that marks a plugin function or method as a hook implementation."""

ONLY_PLUGINS_VARIABLE = "EDGEPLUG_PLUGINS"
BLOCK_PLUGINS_VARIABLE = "EDGEPLUG_BLOCK_PLUGINS"
TRACE_VARIABLE = "EDGEPLUG_TRACE_HOOKS"
CORE_PLUGIN = "edgeplug"
"""Plugin name of the core's own passes (the `normalize` stage) in `edgeplug passes` and report.json."""
CORE_STAGES = frozenset({"normalize"})
"""Passes of the core that run first in every rewrite; EDGEPLUG_PLUGINS need not name them (naming is harmless)."""
BUILT_IN_PACKAGE = "edgeplug_plugins"
"""Package of the built-in plugins; their pass names are reserved for them."""
PASS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""A pass name is also a folder name (out/passes/<name>/): no separators, no '..', at most 64 characters."""


class PluginHost:
    """Owns a pluggy manager; the rest of edgeplug talks to plugins only through it."""

    def __init__(self, *, load_entry_points: bool = True, only: Iterable[str] | None = None,
                 block: Iterable[str] | None = None) -> None:
        """Load the installed plugins: those in `only` if given, never those in `block`. When neither
        is given, EDGEPLUG_PLUGINS and EDGEPLUG_BLOCK_PLUGINS decide; either argument replaces both."""
        self._manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._manager.add_hookspecs(hookspecs)
        self._versions: dict[str, str] = {}
        self._descriptions: dict[str, str] = {}
        self._passes: dict[str, PassInfo] | None = None
        if os.environ.get(TRACE_VARIABLE):
            self._manager.trace.root.setwriter(lambda text: sys.stderr.write(f"[edgeplug hooks] {text}"))
            self._manager.enable_tracing()
        from edgeplug import __version__

        self.register(CorePasses(), name=CORE_PLUGIN, version=__version__)
        if load_entry_points:
            if only is None and block is None:
                self._load_entry_points(_names_from_environment(ONLY_PLUGINS_VARIABLE),
                                        _names_from_environment(BLOCK_PLUGINS_VARIABLE) or set())
            else:
                self._load_entry_points(set(only) if only is not None else None, set(block or ()))

    # -- loading -----------------------------------------------------------------

    def _load_entry_points(self, only: set[str] | None, block: set[str]) -> None:
        entry_points = importlib.metadata.entry_points(group=hookspecs.PROJECT_NAME)
        found = {entry.name for entry in entry_points}
        _refuse_duplicate_entry_points(entry_points)
        blocked_core = sorted(block & CORE_STAGES)
        if blocked_core:
            raise PluginError(f"{BLOCK_PLUGINS_VARIABLE} names {', '.join(blocked_core)}, a stage of the core that every "
                              "rewrite runs; it cannot be blocked")
        for variable, names in ((ONLY_PLUGINS_VARIABLE, only or set()), (BLOCK_PLUGINS_VARIABLE, block)):
            missing = sorted(names - found - CORE_STAGES)
            if missing:
                raise PluginError(
                    f"{variable} names plugins that are not installed: {', '.join(missing)} "
                    f"(installed: {', '.join(sorted(found)) or 'none'})"
                )
        for entry in entry_points:
            if entry.name in CORE_STAGES:
                raise PluginError(f"plugin name '{entry.name}' ({entry.value}) is taken by a stage of the core; rename the "
                                  "plugin's entry point (or, if an older edgeplug left it behind, reinstall edgeplug)")
        for entry in sorted(entry_points, key=lambda e: e.name):
            if (only is not None and entry.name not in only) or entry.name in block:
                continue
            if self._manager.get_plugin(entry.name) is not None:
                continue
            try:
                plugin = entry.load()
            except KeyboardInterrupt:  # Ctrl-C, or a plugin raising it: either way say where it happened
                raise PluginInterrupted(f"while importing plugin '{entry.name}' ({entry.value})") from None
            except BaseException as error:  # noqa: BLE001 - sys.exit() at import must not end the command silently
                raise PluginError(
                    f"plugin '{entry.name}' ({entry.value}) failed to import: {_describe(error)}"
                ) from error
            version = entry.dist.version if entry.dist is not None else "unknown"
            self.register(plugin, name=entry.name, version=version)

    def register(self, plugin: object, *, name: str, version: str = "unknown", described_as: str | None = None) -> None:
        """Register a plugin object (a module or an instance with hookimpls).

        `described_as` is how errors name it (default: `plugin '<name>' <version>`), e.g. a
        pass's runtime hooks: `runtime hooks of pass 'x' (plugin 'p' 1.0)`.
        """
        try:
            self._manager.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as error:
            raise PluginError(f"plugin '{name}' is invalid: {error}") from error
        self._versions[name] = version
        self._descriptions[name] = described_as or f"plugin '{name}' {version}"
        if any(impl.plugin is plugin for impl in self._manager.hook.edgeplug_register_passes.get_hookimpls()):
            self._passes = None  # only a plugin that registers passes changes the registry

    def unregister(self, plugin: object) -> None:
        name = self._manager.get_name(plugin)
        self._manager.unregister(plugin)
        self._versions.pop(name or "", None)
        self._descriptions.pop(name or "", None)

    def plugin_names(self) -> list[str]:
        """Names of the loaded plugins (the core's own passes are not a plugin)."""
        return sorted(name for name, _ in self._manager.list_name_plugin() if name in self._versions and name != CORE_PLUGIN)

    # -- passes --------------------------------------------------------------------

    def passes(self) -> dict[str, PassInfo]:
        """All registered passes by name."""
        if self._passes is None:
            self._passes = self._collect_passes()
        return dict(self._passes)

    def get_pass(self, name: str) -> PassInfo:
        passes = self.passes()
        if name not in passes:
            known = ", ".join(sorted(passes)) or "none"
            raise PluginError(f"no pass named '{name}' is registered (registered: {known}); see 'edgeplug passes'")
        return passes[name]

    def _collect_passes(self) -> dict[str, PassInfo]:
        collected: dict[str, PassInfo] = {}
        for impl in self._manager.hook.edgeplug_register_passes.get_hookimpls():
            plugin_name = impl.plugin_name
            version = self._versions.get(plugin_name, "unknown")

            def register(factory: type[Pass], plugin_name: str = plugin_name, version: str = version) -> None:
                _check_pass_class(factory, plugin_name)
                _check_not_shadowing_built_in(factory, plugin_name)
                if factory.name in collected:
                    other = collected[factory.name].plugin
                    raise PluginError(
                        f"pass '{factory.name}' is registered twice, by plugins '{other}' and '{plugin_name}'; "
                        f"uninstall one or use {ONLY_PLUGINS_VARIABLE} to load only one"
                    )
                collected[factory.name] = PassInfo(factory.name, factory.summary, plugin_name, version, factory)

            try:
                impl.function(register=register)
            except PluginError:
                raise
            except KeyboardInterrupt:
                raise PluginInterrupted(f"while plugin '{plugin_name}' registered its passes") from None
            except BaseException as error:  # noqa: BLE001 - SystemExit here used to leave no passes at all
                raise PluginError(
                    f"plugin '{plugin_name}' failed while registering passes: {_describe(error)}"
                ) from error
        return collected

    # -- training-loop hooks -------------------------------------------------------------

    def add_commands(self, commands: Any) -> None:
        """Let plugins add CLI subcommands to `commands` (a `CommandRegistry`, or argparse's subparsers action,
        which is wrapped in one); a name already taken is a PluginError naming the plugin."""
        from edgeplug.commands import CommandRegistry, is_command

        if not isinstance(commands, CommandRegistry):
            commands = CommandRegistry(commands)
        for impl in self._manager.hook.edgeplug_register_commands.get_hookimpls():
            before = dict(commands.choices)
            try:
                impl.function(commands=commands)
            except argparse.ArgumentError as error:
                raise PluginError(f"plugin '{impl.plugin_name}' adds a command whose name is taken: {error}") from error
            except KeyboardInterrupt:
                raise PluginInterrupted(f"while plugin '{impl.plugin_name}' added its commands") from None
            except BaseException as error:  # noqa: BLE001 - SystemExit included
                raise PluginError(
                    f"plugin '{impl.plugin_name}' failed while adding commands: {_describe(error)}"
                ) from error
            # Python 3.10's add_parser silently replaces a taken name (3.11+ raises ArgumentError)
            taken = sorted(name for name, parser in before.items() if commands.choices.get(name) is not parser)
            if taken:
                raise PluginError(f"plugin '{impl.plugin_name}' adds a command whose name is taken: {', '.join(taken)}")
            for name in set(commands.choices) - set(before):
                if commands.choices[name].get_default("run") is None and is_command(commands.choices[name]):
                    raise PluginError(f"plugin '{impl.plugin_name}' added command '{name}' without a run function "
                                      "(call parser.set_defaults(run=function))")

    def before_step(self, step: Any) -> None:
        self._call("edgeplug_before_step", step=step)

    def after_step(self, step: Any, loss: float) -> None:
        self._call("edgeplug_after_step", step=step, loss=loss)

    def epoch_end(self, epoch: Any, epochs: int, step: int, artifact_dir: Path) -> None:
        self._call("edgeplug_epoch_end", epoch=epoch, epochs=epochs, step=step, artifact_dir=artifact_dir)

    def save_state(self, directory: Path) -> None:
        self._call("edgeplug_save_state", directory=directory)

    def load_state(self, directory: Path) -> None:
        self._call("edgeplug_load_state", directory=directory)

    def _call(self, hook_name: str, **kwargs: Any) -> None:
        """Call a training-loop hook; a failure (SystemExit included) is a PluginError naming who failed.

        KeyboardInterrupt stays an interruption (Ctrl-C). An EdgeplugError keeps its type
        and gains the name. The failing implementation is found in the traceback.
        """
        hook = getattr(self._manager.hook, hook_name)
        try:
            hook(**kwargs)
        except KeyboardInterrupt:
            raise
        except EdgeplugError as error:
            error.args = (f"{self._culprit(hook, error)} ({hook_name}): {error}",)
            raise
        except BaseException as error:  # noqa: BLE001 - sys.exit(0) in a hook ended train with exit 0
            raise PluginError(f"{self._culprit(hook, error)} failed in {hook_name}: {_describe(error)}; "
                              "training stopped (its last checkpoint is intact)") from error

    def _culprit(self, hook: Any, error: BaseException) -> str:
        """Who raised `error`: the implementation of `hook` whose code is in its traceback."""
        codes = {}
        for impl in hook.get_hookimpls():
            function = getattr(impl.function, "__func__", impl.function)
            code = getattr(function, "__code__", None)
            if code is not None:
                codes[code] = impl.plugin_name
        traceback = error.__traceback__
        while traceback is not None:
            name = codes.get(traceback.tb_frame.f_code)
            if name is not None:
                return self._descriptions.get(name, f"plugin '{name}'")
            traceback = traceback.tb_next
        names = sorted({impl.plugin_name for impl in hook.get_hookimpls()})
        return "one of " + ", ".join(self._descriptions.get(name, f"plugin '{name}'") for name in names)


class PluginInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a plugin raising KeyboardInterrupt) while a plugin loaded; the message says which."""


def _describe(error: BaseException) -> str:
    """`ValueError: text`, or `SystemExit(0)` for exits (whose text is only the code)."""
    if isinstance(error, SystemExit):
        return f"SystemExit({error.code!r}) (the plugin called sys.exit)"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _check_pass_class(factory: object, plugin_name: str) -> None:
    if not (isinstance(factory, type) and issubclass(factory, Pass)):
        raise PluginError(f"plugin '{plugin_name}' registered {factory!r}, which is not a subclass of edgeplug.Pass")
    if not factory.name or not factory.summary:
        raise PluginError(f"plugin '{plugin_name}' registered {factory.__name__} without a name or summary")
    if not isinstance(factory.name, str) or not PASS_NAME.fullmatch(factory.name) or ".." in factory.name:
        raise PluginError(
            f"plugin '{plugin_name}' registered a pass named {factory.name!r}; a pass name is letters, digits, "
            "'-', '_' and '.', at most 64 characters, and no '..'"
        )


@functools.cache
def built_in_pass_names() -> frozenset[str]:
    """Names of the passes the built-in plugins register (one plugin may register several, e.g.
    qcore's quantize-frozen), whether or not EDGEPLUG_PLUGINS loads them."""
    names: set[str] = set(CORE_STAGES)
    for entry in importlib.metadata.entry_points(group=hookspecs.PROJECT_NAME):
        if entry.value.split(":")[0].split(".")[0] != BUILT_IN_PACKAGE:
            continue
        hook = getattr(entry.load(), "edgeplug_register_passes", None)
        if hook is not None:
            hook(register=lambda factory: names.add(factory.name))
    return frozenset(names)


class CorePasses:
    """The core's own passes, registered through the same hook as every plugin's."""

    @hookimpl
    def edgeplug_register_passes(self, register: Callable[[type[Pass]], None]) -> None:
        from edgeplug.normalize import NormalizePass  # on first use: the device side never needs it

        register(NormalizePass)


def _check_not_shadowing_built_in(factory: type[Pass], plugin_name: str) -> None:
    built_in = factory.__module__.split(".")[0] == BUILT_IN_PACKAGE or plugin_name == CORE_PLUGIN
    if not built_in and factory.name in built_in_pass_names():
        raise PluginError(
            f"plugin '{plugin_name}' registers a pass named '{factory.name}', the name of a built-in pass; "
            f"a plugin cannot replace a built-in pass: rename the pass (or uninstall the plugin)"
        )


def _refuse_duplicate_entry_points(entry_points: Iterable[importlib.metadata.EntryPoint]) -> None:
    """Two distributions declaring the same entry-point name: the first on sys.path would win silently."""
    seen: dict[str, importlib.metadata.EntryPoint] = {}
    for entry in entry_points:
        other = seen.setdefault(entry.name, entry)
        if other is not entry and other.value != entry.value:
            first = other.dist.name if other.dist is not None else other.value
            second = entry.dist.name if entry.dist is not None else entry.value
            raise PluginError(
                f"plugin name '{entry.name}' is declared by two installed distributions, {first} ({other.value}) "
                f"and {second} ({entry.value}); uninstall one of them"
            )


def _names_from_environment(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


_default_host: PluginHost | None = None


def default_host() -> PluginHost:
    """The process-wide host with every installed plugin (or those in EDGEPLUG_PLUGINS)."""
    global _default_host
    if _default_host is None:
        _default_host = PluginHost()
    return _default_host


def reset_default_host() -> None:
    """Forget the process-wide host (tests install plugins and reload)."""
    global _default_host
    _default_host = None

