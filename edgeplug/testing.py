"""Helpers for plugin authors: run a pass the way edgeplug does.

``rewrite_with`` runs the real pipeline with extra pass classes registered, so a test
sees exactly what a user would; ``host_with`` gives a plugin host with them. Neither needs
pytest (unittest, hypothesis or a script can call them). Under pytest,
``pytest_plugins = ["edgeplug.testing"]`` also gives the ``edgeplug_host`` fixture; the
fixture is defined only when pytest is installed, which edgeplug does not require.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeplug.passes import Pass
from edgeplug.pipeline import RewriteResult, rewrite
from edgeplug.plugins import PluginHost, hookimpl
from edgeplug.recipe import recipe_from_dict


class _PassesPlugin:
    """Registers given pass classes, as an installed plugin would."""

    def __init__(self, passes: Sequence[type[Pass]]) -> None:
        self.passes = list(passes)

    @hookimpl
    def edgeplug_register_passes(self, register: Any) -> None:
        for factory in self.passes:
            register(factory)


def host_with(*passes: type[Pass], installed: bool = True) -> PluginHost:
    """A plugin host with the installed plugins (when `installed`) plus `passes`."""
    host = PluginHost(load_entry_points=installed)
    if passes:
        host.register(_PassesPlugin(passes), name="under-test", version="test")
    return host


def rewrite_with(
    model: str | Path | onnx.ModelProto,
    recipe: Mapping[str, Any],
    output_dir: str | Path,
    *passes: type[Pass],
    calibration: Mapping[str, np.ndarray] | None = None,
) -> RewriteResult:
    """Run the full rewrite pipeline with `passes` registered beside the installed ones."""
    host = host_with(*passes)
    return rewrite(model, recipe_from_dict(dict(recipe), host=host), output_dir, host=host, calibration=calibration)


try:
    import pytest
except ImportError:  # pytest is not a dependency of edgeplug: the helpers above work without it
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def edgeplug_host() -> Iterator[PluginHost]:
        """A fresh host with every installed plugin; register more with ``host.register(...)``."""
        yield host_with()
