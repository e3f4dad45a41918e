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
    factors: tuple[np.ndarray | None, ...] = dataclasses.field(default=(), repr=False, compare=False)  # initial factors

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


def candidates(layer: Layer, x: np.ndarray, dy: np.ndarray, thresholds: Sequence[float], compress_batch: bool,
               center: bool = True) -> list[Candidate]:
    """One candidate per distinct rank vector over the thresholds, with its initial factors.

    As the graph compresses (tucker.asi_step), modes are taken channel first, each on what the earlier
    projections left (sequentially truncated HOSVD): per threshold eps a mode keeps the smallest rank that
    explains eps of that tensor's energy along it. With `center` the per-channel mean is kept exactly and
    the Tucker form approximates X minus it: post-ReLU activations are dominated by their mean, which
    otherwise takes the first component and leaves little of how samples differ. A candidate's error is
    that of the weight gradient it gives on the calibration batch."""
    axis = layer.channel_axis
    mean, centred = tucker.centre(x, axis) if center else (np.zeros((), np.float32), x)
    mean_bytes = x.shape[axis] * FLOAT_BYTES if center else 0
    exact = weight_grad(layer, x, dy)
    norm = float(np.linalg.norm(exact)) or 1.0
    found: dict[tuple[int, ...], Candidate] = {}
    spectra: dict[tuple[tuple[int, ...], int], tuple[np.ndarray, np.ndarray]] = {}  # (ranks so far, mode) -> spectrum

    def spectrum(current: np.ndarray, done: tuple[int, ...], mode: int) -> tuple[np.ndarray, np.ndarray]:
        """Singular values and vectors of the unfolding: the channel mode's (over the full X) is computed once."""
        key = (done, mode)
        if key not in spectra:
            unfolded = tucker.unfold(current, mode)
            values, vectors = np.linalg.eigh(unfolded @ unfolded.T)
            order = np.argsort(values)[::-1]
            spectra[key] = np.sqrt(np.clip(values[order], 0, None)), vectors[:, order]
        return spectra[key]

    for energy in sorted(thresholds):
        ranks = list(x.shape)
        factors: list[np.ndarray | None] = [None] * x.ndim
        current = centred.astype(np.float64)
        for mode in tucker.mode_order(x.ndim, axis):
            if mode == 0 and not compress_batch:
                continue
            values, vectors = spectrum(current, tuple(ranks), mode)
            ranks[mode] = tucker.energy_rank(values, energy)
            if ranks[mode] < x.shape[mode]:
                factors[mode] = vectors[:, : ranks[mode]].astype(np.float32)
                current = tucker.mode_product(current, vectors[:, : ranks[mode]].T, mode)
        key = tuple(ranks)
        if key in found:
            continue
        # dW is linear in X: the error is the weight gradient of what the Tucker form leaves out
        residual = centred - tucker.reconstruct(tucker.compress(centred, factors), factors)
        error = float(np.linalg.norm(weight_grad(layer, residual, dy)))
        found[key] = Candidate(energy, key, tucker.tucker_elements(x.shape, key) * FLOAT_BYTES + mean_bytes, error, error / norm,
                               tuple(factors))
    return list(found.values())


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
