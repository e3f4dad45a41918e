"""Built-in plugin: the `lls` pass (local learning with fixed-basis heads, no gradient across blocks)."""

from __future__ import annotations

from collections.abc import Callable

import edgeplug

from .lls_pass import LocalLearningPass


@edgeplug.hookimpl
def edgeplug_register_passes(register: Callable[[type[edgeplug.Pass]], None]) -> None:
    register(LocalLearningPass)
