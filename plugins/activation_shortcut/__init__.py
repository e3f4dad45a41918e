"""Built-in plugin: the `activation-shortcut` pass (ASI / gradient filtering: weight gradients from compressed activations)."""

from __future__ import annotations

from collections.abc import Callable

import edgeplug

from .activation_shortcut_pass import ActivationShortcutPass


@edgeplug.hookimpl
def edgeplug_register_passes(register: Callable[[type[edgeplug.Pass]], None]) -> None:
    register(ActivationShortcutPass)
