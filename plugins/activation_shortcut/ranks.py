"""ASI rank selection ("activation perplexity"): per-layer candidates, then a budgeted choice.

For each explained-energy threshold eps, a layer's candidate takes per mode the HOSVD
rank that explains eps of the energy of that mode's unfolding of the calibration
activation; its memory is core + factors (float32) and its error the Frobenius norm
of the weight gradient computed from the reconstruction minus the exact one. The
choice minimises the summed error under the memory budget exactly, by merging Pareto
fronts layer by layer (a knapsack DP over (memory, error) pairs without discretising).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from edgeplug.plugin_api import RecipeError

from . import tucker
from .layers import Layer

FLOAT_BYTES = 4


@dataclasses.dataclass(frozen=True)
class Candidate:
    energy: float
    ranks: tuple[int, ...]
    bytes: int
    error: float  # ||dW(reconstruction) - dW||_F
    relative_error: float

    def to_dict(self) -> dict[str, object]:
        return {"energy": self.energy, "ranks": list(self.ranks), "bytes": self.bytes, "error": self.error,
                "relative_error": self.relative_error}


def weight_grad(layer: Layer, x: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """The layer's weight gradient (in the weight's own layout) from an input and an output gradient."""
    if layer.is_conv:
        assert layer.geometry is not None
        return tucker.conv_weight_grad(x, dy, layer.geometry)
    grad = tucker.linear_weight_grad(x, dy)
    if layer.op_type == "Gemm":
        grad = layer.alpha * (grad.T if layer.trans_b else grad)
    return grad


def candidates(layer: Layer, x: np.ndarray, dy: np.ndarray, thresholds: Sequence[float], compress_batch: bool
               ) -> tuple[list[Candidate], list[tuple[np.ndarray, np.ndarray]]]:
    """One candidate per distinct rank vector over the thresholds, and the mode spectra (for initial factors)."""
    spectra = tucker.mode_spectra(x)
    exact = weight_grad(layer, x, dy)
    norm = float(np.linalg.norm(exact)) or 1.0
    found: dict[tuple[int, ...], Candidate] = {}
    for energy in sorted(thresholds):
        ranks = tuple(d if (mode == 0 and not compress_batch) else tucker.energy_rank(values, energy)
                      for mode, (d, (values, _)) in enumerate(zip(x.shape, spectra)))
        if ranks in found:
            continue
        factors = initial_factors(spectra, ranks)
        approx = tucker.reconstruct(tucker.compress(x, factors), factors)
        error = float(np.linalg.norm(weight_grad(layer, approx, dy) - exact))
        found[ranks] = Candidate(energy, ranks, tucker.tucker_elements(x.shape, ranks) * FLOAT_BYTES, error, error / norm)
    return list(found.values()), spectra


def initial_factors(spectra: Sequence[tuple[np.ndarray, np.ndarray]], ranks: Sequence[int]) -> list[np.ndarray | None]:
    """Leading singular vectors per compressed mode (None where the rank is the full size)."""
    return [vectors[:, :k].astype(np.float32) if k < vectors.shape[0] else None for (_, vectors), k in zip(spectra, ranks)]


def choose(options: Sequence[Sequence[Candidate]], budget: int, *, ratio: float | None = None, vanilla: int = 0) -> list[int]:
    """Index of one candidate per layer, minimising the summed error with summed bytes <= budget.
    `ratio` / `vanilla`: the budget came from a compression ratio of these input bytes (for the message)."""
    front: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for layer_options in options:
        merged = [(mem + c.bytes, err + c.error, picks + (i,)) for mem, err, picks in front for i, c in enumerate(layer_options)
                  if mem + c.bytes <= budget]
        if not merged:
            smallest = sum(min(c.bytes for c in opts) for opts in options)
            if ratio is not None:
                raise RecipeError(f"compression {ratio:g} is more than these layers allow: at most {vanilla / smallest:.1f}x "
                                  f"({smallest:,} of {vanilla:,} input bytes with the lowest threshold for every layer); lower "
                                  "it, lower the smallest threshold or compress fewer/other layers")
            raise RecipeError(f"memory_budget_bytes {budget:,} is below the smallest choice "
                              f"({smallest:,} bytes with the lowest threshold for every layer); raise the budget or "
                              "lower the smallest threshold")
        merged.sort(key=lambda t: (t[0], t[1]))
        front = []
        for item in merged:  # keep the Pareto front: more memory only for less error
            if not front or item[1] < front[-1][1] - 1e-15:
                front.append(item)
    best = min(front, key=lambda t: (t[1], t[0]))
    return list(best[2])
