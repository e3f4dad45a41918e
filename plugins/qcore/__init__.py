"""Built-in plugin: the `qcore` pass and the `quantize` / `calibrate` commands (QCore)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import edgeplug

from .commands import register
from .qcore_pass import QCorePass


@edgeplug.hookimpl
def edgeplug_register_passes(register: Callable[[type[edgeplug.Pass]], None]) -> None:
    register(QCorePass)


@edgeplug.hookimpl
def edgeplug_register_commands(commands: argparse._SubParsersAction) -> None:
    register(commands)
