"""Options of generator training (a light module: the CLI parser reads its defaults)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GeneratorOptions:
    """How the generator trains; the defaults are the settings bench/personalize.py measured."""

    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    hidden: int = 128
    device_samples: int = 256
    draws: int = 8
    count: int = 8
    method: str = "kmeans"
    validation_domains: float = 0.2
    evaluations: int = 10
    device_statistics: bool = True  # the device re-estimates normalisation statistics first (when the model has them)
    seed: int = 0
