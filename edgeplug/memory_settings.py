"""The training sessions' memory setting (recipe `training.memory`): one name, two onnxruntime switches.

onnxruntime keeps more than the live tensors: its allocation planner hands a buffer freed in forward to a
same-sized tensor created much later (often a gradient in backward) and holds it in between, and its CPU arena
keeps what it once grew to. Measured on MiniLM-L6 and EfficientNet-Lite0 (bench/results/memory_settings.md),
turning the planner's reuse off while keeping the arena lowers peak memory by up to a quarter at the same step
time, so that is the default; turning the arena off too holds only live tensors but costs page faults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

ARENA = "arena"
COMPACT = "compact"
LEAN = "lean"
MEMORY_SETTINGS = (COMPACT, ARENA, LEAN)
DEFAULT_MEMORY = COMPACT


@dataclasses.dataclass(frozen=True)
class SessionSwitches:
    """The onnxruntime session options a memory setting stands for."""

    cpu_mem_arena: bool
    mem_reuse: bool


SWITCHES = {
    ARENA: SessionSwitches(cpu_mem_arena=True, mem_reuse=True),  # onnxruntime's own defaults
    COMPACT: SessionSwitches(cpu_mem_arena=True, mem_reuse=False),
    LEAN: SessionSwitches(cpu_mem_arena=False, mem_reuse=False),
}


def recipe_memory(recipe: Any) -> str:
    """The memory setting of a recipe document (a recipe.json's dict), the default when it names none."""
    training = recipe.get("training") if isinstance(recipe, Mapping) else None
    return str(training.get("memory", DEFAULT_MEMORY)) if isinstance(training, Mapping) else DEFAULT_MEMORY


def switches(memory: str) -> SessionSwitches:
    """The session switches of `memory` (one of MEMORY_SETTINGS)."""
    return SWITCHES[memory]


PREFIX_CACHE_DTYPES = ("float32", "float16")
DEFAULT_PREFIX_CACHE_DTYPE = "float32"
"""How the frozen-prefix cache (edgeplug.prefix_cache, Python trainer only) stores float32 boundary tensors (recipe
`training.prefix_cache_dtype`): float32 keeps them exactly (bit-identical training); float16 halves their bytes and
casts them back to float32 before each step, so the trained part and the artifacts are unchanged but its inputs are
rounded (about 3 significant digits)."""


def recipe_prefix_cache_dtype(recipe: Any) -> str:
    """The frozen-prefix cache's storage type of a recipe document (a recipe.json's dict), the default when it names none."""
    training = recipe.get("training") if isinstance(recipe, Mapping) else None
    return str(training.get("prefix_cache_dtype", DEFAULT_PREFIX_CACHE_DTYPE)) if isinstance(training, Mapping) else DEFAULT_PREFIX_CACHE_DTYPE
