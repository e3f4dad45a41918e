"""Anchor selection and packing (the ADR role): a few representative feature vectors, 8-bit, for upload.

The device computes forward-only features of its unlabelled samples, picks `count`
representatives (k-means medoids, or greedy k-center), and sends their features
quantized per dimension to 8 bits together with how many samples each one stands
for. The cloud only ever sees this summary, never the samples.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from edgeplug.plugin_api import DataError, ModelError, RecipeError

from .archive import read_archive, write_archive

FORMAT = "edgeplug-personalize-anchors"
MADE_BY = "edgeplug personalize anchors"
LEVELS = 255
KMEANS_ITERATIONS = 25


@dataclasses.dataclass(frozen=True)
class Packed:
    """Quantized anchors: value = low + codes * step, per feature dimension."""

    codes: np.ndarray  # uint8 [count, width]
    low: np.ndarray  # float16 (or float32 for large values) [width]
    step: np.ndarray  # same dtype as low [width]
    weights: np.ndarray  # uint16 [count]: device samples each anchor stands for (saturating at 65535)

    def values(self) -> np.ndarray:
        return (self.low.astype(np.float64) + self.codes.astype(np.float64) * self.step.astype(np.float64)).astype(np.float32)


def select(features: np.ndarray, count: int, method: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of `count` representative rows and how many rows each represents (nearest-anchor counts)."""
    if count < 1:
        raise RecipeError("anchor count must be at least 1")
    n = len(features)
    if n == 0:
        raise DataError("no device samples to select anchors from")
    if n <= count:
        return np.arange(n), np.ones(n, dtype=np.int64)
    scale = features.std(axis=0)
    scaled = (features - features.mean(axis=0)) / np.where(scale > 1e-8, scale, 1.0)
    if method == "kcenter":
        chosen = _kcenter(scaled, count)
    elif method == "kmeans":
        chosen = _kmeans_medoids(scaled, count, np.random.default_rng(seed))
    else:
        raise RecipeError(f"unknown anchor method '{method}' (use kmeans or kcenter)")
    nearest = np.argmin(_distances(scaled, scaled[chosen]), axis=1)
    return chosen, np.bincount(nearest, minlength=len(chosen))


def _distances(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    squared = (points**2).sum(1)[:, None] - 2 * points @ centres.T + (centres**2).sum(1)[None, :]
    return np.maximum(squared, 0.0)


def _kcenter(points: np.ndarray, count: int) -> np.ndarray:
    """Greedy farthest-point selection, starting from the sample nearest the mean."""
    chosen = [int(np.argmin((points**2).sum(1)))]
    nearest = _distances(points, points[chosen])[:, 0]
    while len(chosen) < count:
        chosen.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, _distances(points, points[chosen[-1:]])[:, 0])
    return np.array(chosen)


def _kmeans_medoids(points: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ then Lloyd iterations; each centre is replaced by its nearest real sample (distinct)."""
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, count):
        d = _distances(points, np.array(centres)).min(axis=1)
        total = d.sum()
        centres.append(points[rng.choice(len(points), p=d / total)] if total > 0 else points[rng.integers(len(points))])
    centre_array = np.array(centres)
    for _ in range(KMEANS_ITERATIONS):
        assigned = np.argmin(_distances(points, centre_array), axis=1)
        moved = np.array([points[assigned == c].mean(0) if np.any(assigned == c) else centre_array[c] for c in range(count)])
        if np.allclose(moved, centre_array):
            break
        centre_array = moved
    distances = _distances(points, centre_array)
    chosen: list[int] = []
    for c in range(count):
        for index in np.argsort(distances[:, c]):
            if int(index) not in chosen:
                chosen.append(int(index))
                break
    return np.array(chosen)


def pack(values: np.ndarray, weights: np.ndarray) -> Packed:
    """Quantize each feature dimension to 8 bits over its range among the anchors (error <= step / 2).

    The offset and step are stored as float16 when that keeps them finite (half the bytes);
    codes are computed from the stored (rounded) offset and step, so the bound holds exactly.
    """
    values = values.astype(np.float64)
    low_exact, high = values.min(axis=0), values.max(axis=0)
    dtype = np.float16 if np.all(np.abs(np.concatenate([low_exact, high])) < 6e4) else np.float32
    low = _round(low_exact, dtype, down=True)
    step = _round(np.maximum(high - low.astype(np.float64), 0.0) / LEVELS, dtype, down=False)
    step = np.where(step > 0, step, np.ones_like(step))
    codes = np.clip(np.rint((values - low.astype(np.float64)) / step.astype(np.float64)), 0, LEVELS).astype(np.uint8)
    return Packed(codes, low, step, np.minimum(weights, np.iinfo(np.uint16).max).astype(np.uint16))


def _round(values: np.ndarray, dtype: type[np.floating[Any]], *, down: bool) -> np.ndarray:
    """`values` in `dtype`, rounded toward -inf (down) or +inf, so ranges only ever widen."""
    rounded = values.astype(dtype)
    wrong = rounded.astype(np.float64) > values if down else rounded.astype(np.float64) < values
    target = np.array(-np.inf if down else np.inf, dtype=dtype)
    return np.where(wrong, np.nextafter(rounded, target), rounded).astype(dtype)


def summary(packed: Packed) -> np.ndarray:
    """What the generator reads: the weighted mean and standard deviation of the anchors, per dimension."""
    values = packed.values().astype(np.float64)
    weights = packed.weights.astype(np.float64)
    weights = weights / weights.sum()
    mean = weights @ values
    std = np.sqrt(np.maximum(weights @ (values - mean) ** 2, 0.0))
    return np.concatenate([mean, std]).astype(np.float32)


def write_anchors(path: str | Path, packed: Packed, fingerprint: str, method: str, samples: int, raw_bytes: int, *,
                  statistics: bool) -> int:
    """Write the upload; return its size in bytes. `statistics`: features were computed under re-estimated statistics."""
    meta = {
        "format": FORMAT, "format_version": 1, "model_fingerprint": fingerprint, "method": method, "statistics": statistics,
        "count": int(packed.codes.shape[0]), "feature_width": int(packed.codes.shape[1]), "bits": 8,
        "samples": int(samples), "raw_bytes": int(raw_bytes),
    }
    arrays = {"codes": packed.codes, "range": np.stack([packed.low, packed.step]), "weights": packed.weights}
    return write_archive(path, arrays, meta)


def read_anchors(path: str | Path, fingerprint: str) -> tuple[Packed, dict[str, Any]]:
    """An anchors file made on the device model with this fingerprint, checked for consistency."""
    arrays, meta = read_archive(path, "personalize-anchors", "anchors file", MADE_BY)
    if meta["model_fingerprint"] != fingerprint:
        raise ModelError(f"{path} was computed on another model (fingerprint {meta['model_fingerprint'][:12]}, "
                         f"expected {fingerprint[:12]}); compute anchors with the device model this generator was trained for")
    scale_types = (np.dtype(np.float16), np.dtype(np.float32))
    expected = {"codes": ((meta["count"], meta["feature_width"]), (np.dtype(np.uint8),)),
                "range": ((2, meta["feature_width"]), scale_types), "weights": ((meta["count"],), (np.dtype(np.uint16),))}
    for name, (shape, dtypes) in expected.items():
        array = arrays.get(name)
        if array is None or array.shape != shape or array.dtype not in dtypes:
            got = "missing" if array is None else f"{array.dtype} {tuple(array.shape)}"
            wanted = " or ".join(str(d) for d in dtypes)
            raise DataError(f"{path}: array '{name}' should be {wanted} {shape}, got {got}; make it again with {MADE_BY}")
    if not np.all(np.isfinite(arrays["range"])) or arrays["weights"].sum() == 0:
        raise DataError(f"{path}: quantization ranges are not finite or the weights are all zero; make it again with {MADE_BY}")
    return Packed(arrays["codes"], arrays["range"][0], arrays["range"][1], arrays["weights"]), meta
