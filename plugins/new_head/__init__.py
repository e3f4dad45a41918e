"""Built-in plugin: the `new-head` pass."""

from __future__ import annotations

from collections.abc import Callable

import edgeplug

from .new_head_pass import NewHeadPass


@edgeplug.hookimpl
def edgeplug_register_passes(register: Callable[[type[edgeplug.Pass]], None]) -> None:
    register(NewHeadPass)
