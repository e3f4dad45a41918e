"""Built-in plugin: the `lora` pass (low-rank adapters, merged into the weights at export)."""

from __future__ import annotations

from collections.abc import Callable

import edgeplug

from .lora_pass import LoraPass


@edgeplug.hookimpl
def edgeplug_register_passes(register: Callable[[type[edgeplug.Pass]], None]) -> None:
    register(LoraPass)
