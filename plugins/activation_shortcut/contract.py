"""Weight gradients as small tensor networks, contracted pairwise in the cheapest order that keeps
every intermediate under a size limit.

A weight gradient from a Tucker-compressed input is a network of dY, the core and the factors
(build.py writes it down per layer). The order of the pairwise contractions decides both the
multiply-adds and the size of the intermediates: contracting in a fixed order made a 28 MiB
intermediate (eight times the input it replaced) for a 5x5 depthwise conv of EfficientNet-Lite0,
and cost more MACs than vanilla's ConvGrad on small layers. numpy's optimal path search
(`np.einsum_path`, exhaustive over the few operands here, with a memory limit) picks the order;
each step becomes one two-operand ONNX Einsum, which onnxruntime runs as transposes + MatMul.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Operand:
    """A graph tensor in the network: its name and one index letter per axis."""

    name: str
    indices: str


def _placeholder(indices: str, sizes: Mapping[str, int]) -> np.ndarray:
    """An array of the right shape that owns no memory (einsum_path reads shapes only)."""
    return np.broadcast_to(np.zeros((), dtype=np.float32), tuple(sizes[i] for i in indices))


def order(operands: Sequence[Operand], sizes: Mapping[str, int], output: str, limit: int) -> list[tuple[int, int]]:
    """Pairwise contraction order (numpy's positions: the pair is removed, the result appended), cheapest
    in multiply-adds with every intermediate at most `limit` elements; the limit is doubled until such an
    order exists (numpy falls back to one n-ary contraction when none does)."""
    if len(operands) < 2:
        return []
    equation = ",".join(op.indices for op in operands) + "->" + output
    arrays = [_placeholder(op.indices, sizes) for op in operands]
    bound = max(1, limit)
    while True:
        path, _ = np.einsum_path(equation, *arrays, optimize=("optimal", bound))
        steps = [tuple(step) for step in path[1:]]
        if all(len(step) == 2 for step in steps):
            return [(int(a), int(b)) for a, b in steps]
        bound *= 2


def macs(first: str, second: str, sizes: Mapping[str, int]) -> int:
    """Multiply-adds of one pairwise contraction: the product of every index size it touches."""
    return math.prod(sizes[i] for i in set(first) | set(second))


def contract(operands: Sequence[Operand], sizes: Mapping[str, int], output: str, limit: int,
             einsum: Callable[[str, str, str, str], str]) -> tuple[str, int, int]:
    """Contract the network down to `output` (indices, in that order) with `einsum(first, second,
    equation, base)`, which builds one node and returns its output name. Returns (tensor name,
    multiply-adds, largest intermediate in elements)."""
    live = list(operands)
    total, largest = 0, 0
    steps = order(live, sizes, output, limit)
    for number, (a, b) in enumerate(steps):
        first, second = live[a], live[b]
        rest = [op for n, op in enumerate(live) if n not in (a, b)]
        needed = set(output).union(*(set(op.indices) for op in rest))
        last = number == len(steps) - 1
        kept = output if last else "".join(i for i in dict.fromkeys(first.indices + second.indices) if i in needed)
        total += macs(first.indices, second.indices, sizes)
        if not last:
            largest = max(largest, math.prod(sizes[i] for i in kept))
        name = einsum(first.name, second.name, f"{first.indices},{second.indices}->{kept}", f"c{number}")
        live = [*rest, Operand(name, kept)]
    (result,) = live
    if result.indices != output:
        raise ValueError(f"network ends in {result.indices}, not {output}")
    return result.name, total, largest
