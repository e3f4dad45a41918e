"""The fixed projection bases of LLS heads: one periodic wave per class, or a random baseline.

Recomputed from (kind, classes, length, seed) whenever needed, never trained. The
formulas follow the LLS reference code (arXiv 2405.15868):

- sine:   B[c, t] = sin(f_c * t),                    f_c = linspace(50, 512, C),  t = 0..D-1
- square: B[c, t] = sign(sin(f_c * t))               (entries in {-1, 0, +1}: additions only)
- cosine: B[c, t] = cos(pi * f_c * (t + 0.5) / D),   f_c = linspace(100, 512, C)  (the paper's first version)
- random: B[c, t] ~ N(0, 1) / sqrt(D), seeded        (fixed random projection baseline)
"""

from __future__ import annotations

import numpy as np

KINDS = ("square", "sine", "cosine", "random")


def basis(kind: str, classes: int, length: int, seed: int = 0) -> np.ndarray:
    """The `classes` x `length` basis of `kind`, float32."""
    if classes < 1 or length < 1:
        raise ValueError(f"a basis needs at least one class and one feature, got {classes} x {length}")
    t = np.arange(length, dtype=np.float64)
    if kind in ("sine", "square"):
        frequencies = np.linspace(50, 512, classes)
        waves = np.sin(frequencies[:, None] * t[None, :])
        return (np.sign(waves) if kind == "square" else waves).astype(np.float32)
    if kind == "cosine":
        frequencies = np.linspace(100, 512, classes)
        return np.cos(np.pi * frequencies[:, None] * (t[None, :] + 0.5) / length).astype(np.float32)
    if kind == "random":
        rng = np.random.default_rng(seed)
        return (rng.standard_normal((classes, length)) / np.sqrt(length)).astype(np.float32)
    raise ValueError(f"unknown basis {kind!r}; choose one of {', '.join(KINDS)}")
