"""Numpy side of the pass: Tucker factors, reconstruction and reference weight gradients.

The rank selection runs here, and the tests compare the rewritten graph (which
refreshes and orthonormalises its factors itself, see build.orthonormalise) against
these formulas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .layers import ConvGeometry


def unfold(array: np.ndarray, mode: int) -> np.ndarray:
    """Mode-m unfolding: D_m x (product of the other dimensions)."""
    return np.moveaxis(array, mode, 0).reshape(array.shape[mode], -1)


def mode_product(array: np.ndarray, matrix: np.ndarray, mode: int) -> np.ndarray:
    """array x_mode matrix: contracts dimension `mode` of array with the columns of matrix (rows -> new size)."""
    moved = np.tensordot(matrix, np.moveaxis(array, mode, 0), axes=(1, 0))
    return np.moveaxis(moved, 0, mode)


def orth(matrix: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the column space (reduced Householder QR; always orthonormal)."""
    q, _ = np.linalg.qr(np.asarray(matrix, dtype=np.float64))
    return q.astype(np.float32)


ORTH_EPS = 1e-12  # added to squared norms (of the Frobenius-normalised P and of each column)
ORTH_MIX = 1e-6  # share of the previous factor mixed into P: a direction for a column P leaves empty


def subspace_step(array: np.ndarray, factor: np.ndarray, mode: int) -> np.ndarray:
    """One warm-started subspace iteration as the graph does it each step (build.orthonormalise):
    orth(P / ||P||_F + ORTH_MIX U) with P = A_(m) A_(m)^T U."""
    unfolded = unfold(array, mode).astype(np.float64)
    power = unfolded @ (unfolded.T @ factor.astype(np.float64))
    return orth(power / np.sqrt((power**2).sum() + ORTH_EPS) + ORTH_MIX * factor)


def centre(array: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean over every axis but `axis`, kept as size-1 axes; array minus it), as the graph computes them."""
    others = tuple(a for a in range(array.ndim) if a != axis)
    mean = array.astype(np.float64).mean(axis=others, keepdims=True)
    return mean.astype(np.float32), (array - mean).astype(np.float32)


def mode_order(ndim: int, channel_axis: int) -> list[int]:
    """The order in which the modes are compressed: the channel axis first (it shrinks the tensor most and
    the weight contracts it), then the others in axis order, each on the tensor the earlier ones left."""
    return [channel_axis, *(m for m in range(ndim) if m != channel_axis)]


def asi_step(array: np.ndarray, fed: Sequence[np.ndarray | None], channel_axis: int, center: bool
             ) -> tuple[np.ndarray | None, list[np.ndarray | None], np.ndarray]:
    """What the graph does each step (build.asi_forward): the per-channel mean (`center`), then per mode with a
    factor, in `mode_order`, one warm-started subspace iteration on the tensor left by the earlier modes
    (`subspace_step`) and its projection. Returns (mean or None, refreshed factors, core)."""
    mean, current = (centre(array, channel_axis) if center else (None, array))
    current = current.astype(np.float64)
    factors: list[np.ndarray | None] = [None] * array.ndim
    for mode in mode_order(array.ndim, channel_axis):
        start = fed[mode]
        if start is None:
            continue
        factor = subspace_step(current, start, mode)
        factors[mode] = factor
        current = mode_product(current, factor.astype(np.float64).T, mode)
    return mean, factors, current.astype(np.float32)


def energy_rank(singular: np.ndarray, energy: float) -> int:
    """Smallest rank whose singular values hold `energy` of the squared Frobenius norm (at least 1)."""
    squares = singular.astype(np.float64) ** 2
    total = squares.sum()
    if energy >= 1.0 or total <= 0:
        return len(singular) if energy >= 1.0 else 1
    return min(len(singular), int(np.searchsorted(np.cumsum(squares) / total, energy - 1e-12)) + 1)


def compress(array: np.ndarray, factors: Sequence[np.ndarray | None]) -> np.ndarray:
    """Core S = A x_m U_m^T over the modes that have a factor (None: the mode is kept whole)."""
    core = array
    for mode, factor in enumerate(factors):
        if factor is not None:
            core = mode_product(core, factor.T, mode)
    return core


def reconstruct(core: np.ndarray, factors: Sequence[np.ndarray | None]) -> np.ndarray:
    """A~ = S x_m U_m over the modes that have a factor."""
    array = core
    for mode, factor in enumerate(factors):
        if factor is not None:
            array = mode_product(array, factor, mode)
    return array


def tucker_elements(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Values kept: the core plus the factor of every compressed mode (rank < size)."""
    return math.prod(ranks) + sum(d * k for d, k in zip(shape, ranks) if k < d)


def conv_weight_grad(x: np.ndarray, dy: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """dW[o, c, u, v] = sum_{b,i,j} dY[b, o, i, j] * Xpad[b, g(o) Cg + c, i s + u d, j s + v d]."""
    g = geometry
    pt, pl, pb, pr = g.pads
    xpad = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    batch, channels = x.shape[:2]
    ho, wo = dy.shape[2:]
    out = dy.shape[1]
    og, cg = out // g.group, channels // g.group
    # [group, out per group, positions] @ [group, positions, in per group]: batched BLAS per kernel tap
    dyg = np.ascontiguousarray(dy.astype(np.float64).reshape(batch, g.group, og, ho * wo).transpose(1, 2, 0, 3)).reshape(g.group, og, -1)
    grad = np.zeros((out, cg, g.kernel[0], g.kernel[1]))
    for u in range(g.kernel[0]):
        for v in range(g.kernel[1]):
            top, left = u * g.dilation[0], v * g.dilation[1]
            patch = xpad[:, :, top : top + g.stride[0] * (ho - 1) + 1 : g.stride[0], left : left + g.stride[1] * (wo - 1) + 1 : g.stride[1]]
            patch = np.ascontiguousarray(patch.reshape(batch, g.group, cg, ho * wo).transpose(1, 0, 3, 2)).reshape(g.group, -1, cg)
            grad[:, :, u, v] = np.matmul(dyg, patch).reshape(out, cg)
    return grad.astype(np.float32)


def linear_weight_grad(x: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """dW[i, o] = sum over all leading axes of X[..., i] dY[..., o] (MatMul layout; transpose for Gemm transB)."""
    return (x.reshape(-1, x.shape[-1]).astype(np.float64).T @ dy.reshape(-1, dy.shape[-1]).astype(np.float64)).astype(np.float32)


def filter_tensors(x: np.ndarray, dy: np.ndarray, geometry: ConvGeometry, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Gradient filtering: (mean of the kernel-centre input taps, sum of dY) over r x r output patches."""
    g = geometry
    ho, wo = dy.shape[2:]
    pt, pl, pb, pr = g.pads
    xpad = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    ch, cw = (g.kernel[0] // 2) * g.dilation[0], (g.kernel[1] // 2) * g.dilation[1]
    taps = xpad[:, :, ch : ch + g.stride[0] * (ho - 1) + 1 : g.stride[0], cw : cw + g.stride[1] * (wo - 1) + 1 : g.stride[1]]
    return _patch_reduce(taps, patch, mean=True), _patch_reduce(dy.astype(np.float64), patch, mean=False)


def _patch_reduce(array: np.ndarray, patch: int, *, mean: bool) -> np.ndarray:
    b, c, h, w = array.shape
    hr, wr = -(-h // patch), -(-w // patch)
    padded = np.zeros((b, c, hr * patch, wr * patch))
    padded[:, :, :h, :w] = array
    sums = padded.reshape(b, c, hr, patch, wr, patch).sum(axis=(3, 5))
    if not mean:
        return sums
    counts = np.zeros((hr * patch, wr * patch))
    counts[:h, :w] = 1
    return sums / counts.reshape(hr, patch, wr, patch).sum(axis=(1, 3))


def filter_weight_grad(x: np.ndarray, dy: np.ndarray, geometry: ConvGeometry, patch: int) -> np.ndarray:
    """dW[o, c, u, v] ~= sum_{b,P} dYsum[b, o, P] * Xmean[b, g(o) Cg + c, P], the same for every (u, v)."""
    g = geometry
    xbar, gsum = filter_tensors(x, dy, geometry, patch)
    b, channels, hr, wr = xbar.shape
    out = gsum.shape[1]
    value = np.einsum("bgohw,bgchw->goc", gsum.reshape(b, g.group, out // g.group, hr, wr),
                      xbar.reshape(b, g.group, channels // g.group, hr, wr)).reshape(out, channels // g.group)
    return np.broadcast_to(value[:, :, None, None], (out, channels // g.group, *g.kernel)).astype(np.float32)
