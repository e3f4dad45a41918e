"""Built-in plugin: the `qcore` pass, the `quantize` / `calibrate` / `export-quantized` commands (QCore;
`export_quantized()` from Python), and the
`quantize-frozen` pass (int8 frozen weights in the training graph)."""

from __future__ import annotations

from collections.abc import Callable

import edgeplug
from edgeplug.plugin_api import CommandRegistry

from .commands import register
from .export import export_quantized
from .qcore_pass import QCorePass
from .quantize_frozen_pass import QuantizeFrozenPass


@edgeplug.hookimpl
def edgeplug_register_passes(register: Callable[[type[edgeplug.Pass]], None]) -> None:
    register(QCorePass)
    register(QuantizeFrozenPass)


@edgeplug.hookimpl
def edgeplug_register_commands(commands: CommandRegistry) -> None:
    register(commands)


__all__ = ["export_quantized"]
