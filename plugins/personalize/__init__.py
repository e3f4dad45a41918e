"""Built-in plugin: the `personalize` pass (backprop-free personalisation through cloud-device collaboration)
and the `edgeplug personalize` commands (anchors, train-generator, generate, baseline, apply)."""

from __future__ import annotations

from collections.abc import Callable

import edgeplug
from edgeplug.plugin_api import CommandRegistry

from .personalize_pass import PersonalizePass


@edgeplug.hookimpl
def edgeplug_register_passes(register: Callable[[type[edgeplug.Pass]], None]) -> None:
    register(PersonalizePass)


@edgeplug.hookimpl
def edgeplug_register_commands(commands: CommandRegistry) -> None:
    from .commands import register

    register(commands)
