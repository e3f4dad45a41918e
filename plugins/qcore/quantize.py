"""Integer grids: per-output-channel weights and per-tensor activations at 2..8 bits.

Every grid is stored in 8-bit containers (int8 weights, uint8 activations) because
onnxruntime 1.19.2 runs QuantizeLinear/DequantizeLinear on int8/uint8 in every
opset edgeplug emits; a b-bit grid uses only 2**b of the 256 codes
(weights [-2**(b-1), 2**(b-1)-1], activations [0, 2**b-1]).
"""

from __future__ import annotations

import dataclasses

import numpy as np


def weight_limits(bits: int) -> tuple[int, int]:
    """Signed integer range of a b-bit weight grid."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def activation_limits(bits: int) -> tuple[int, int]:
    """Unsigned integer range of a b-bit activation grid."""
    return 0, 2**bits - 1


@dataclasses.dataclass(frozen=True)
class WeightGrid:
    """Asymmetric per-output-channel grid of one weight matrix [out, fan_in]."""

    scale: np.ndarray  # float32 [out]
    zero_point: np.ndarray  # int8 [out]
    bits: int

    @property
    def limits(self) -> tuple[int, int]:
        return weight_limits(self.bits)


def weight_grid(matrix: np.ndarray, bits: int) -> WeightGrid:
    """Min/max grid per row of `matrix` [out, fan_in]; the range always contains 0."""
    low, high = weight_limits(bits)
    lo = np.minimum(matrix.min(axis=1), 0.0).astype(np.float64)
    hi = np.maximum(matrix.max(axis=1), 0.0).astype(np.float64)
    scale = (hi - lo) / (high - low)
    scale = np.where(scale > 0, scale, 1.0)
    zero_point = np.clip(np.round(low - lo / scale), low, high)
    return WeightGrid(scale.astype(np.float32), zero_point.astype(np.int8), bits)


def quantize_weights(matrix: np.ndarray, grid: WeightGrid) -> np.ndarray:
    """Integer codes (int8) of `matrix` [out, fan_in] on `grid`, saturating like QuantizeLinear."""
    low, high = grid.limits
    codes = np.round(matrix / grid.scale[:, None]) + grid.zero_point[:, None].astype(np.float64)
    return np.clip(codes, low, high).astype(np.int8)


def dequantize_weights(codes: np.ndarray, grid: WeightGrid) -> np.ndarray:
    """Float values of integer codes [out, fan_in], as DequantizeLinear computes them."""
    centred = codes.astype(np.int32) - grid.zero_point[:, None].astype(np.int32)
    return (centred.astype(np.float32) * grid.scale[:, None]).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ActivationGrid:
    """Per-tensor uint8 grid: scale, zero point and the float range it covers exactly."""

    scale: float
    zero_point: int
    bits: int

    @property
    def low(self) -> float:
        return float(np.float32(-self.zero_point * self.scale))

    @property
    def high(self) -> float:
        return float(np.float32((activation_limits(self.bits)[1] - self.zero_point) * self.scale))


def activation_grid(values: np.ndarray, bits: int, percentile: float) -> ActivationGrid:
    """Clipped range of calibration activations (`percentile` of the values at each end), widened to hold 0."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    lo = min(float(np.percentile(flat, 100.0 - percentile)), 0.0)
    hi = max(float(np.percentile(flat, percentile)), 0.0)
    top = activation_limits(bits)[1]
    # a range so small that its step underflows float32 (denormal activations) is no range: scale 1
    scale = (hi - lo) / top if hi - lo > float(np.finfo(np.float32).tiny) * top else 1.0
    zero_point = int(np.clip(np.round(-lo / scale), 0, top))
    return ActivationGrid(float(np.float32(scale)), zero_point, bits)
