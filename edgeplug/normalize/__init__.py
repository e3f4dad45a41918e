"""The `normalize` stage of the core: brings any exporter's model into what onnxruntime-training accepts.

It runs first in every rewrite, whatever plugins are loaded. It is a `Pass` like the
plugins' (options schema, report entry, `edgeplug passes` lists it under the plugin
name `edgeplug`), registered by the core itself (`edgeplug.plugins.CorePasses`).
"""

from __future__ import annotations

from .normalize_pass import NormalizePass

__all__ = ["NormalizePass"]
