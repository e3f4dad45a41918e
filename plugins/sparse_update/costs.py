"""Predicted backward cost of a sparse-update plan, with the profiler's definitions.

Backward memory = retained activations (forward tensors a backward node reads)
+ gradient buffers + optimizer state of the trainable values; backward MACs =
per Conv/Gemm/MatMul, one forward-sized product per input that gets a gradient
(`edgeplug.profiling.static`). The prediction follows the rewritten graph
(`split.py`): a channel-sliced layer keeps only its sliced input for the weight
gradient; layers between the earliest updated layer and the output keep what
onnxruntime-training's gradient ops read to pass the gradient on (ConvGrad
reads its input X even when only dX is needed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import onnx

from edgeplug.plugin_api import OPTIMIZER_STATES, forward_macs

from .candidates import FLOAT_BYTES, Candidate, ModelFacts
from .lean import is_pointwise_frozen_conv

# Ops whose gradient reads no activation (only shapes, constants or the incoming gradient).
PASS_THROUGH = frozenset({
    "Add", "Sub", "Concat", "Split", "Reshape", "Flatten", "Transpose", "Identity", "Squeeze", "Unsqueeze",
    "GlobalAveragePool", "AveragePool", "ReduceMean", "ReduceSum", "Pad", "Slice", "Gather", "Neg", "Cast",
    "Expand", "Tile", "Dropout", "Shape", "Size",
})
READS_OUTPUT = frozenset({"Sigmoid", "Tanh", "Softmax", "LogSoftmax", "Relu"})
READS_INPUT = frozenset({"Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Elu", "Selu", "Gelu", "Erf", "Sqrt", "Exp", "Log",
                         "BatchNormalization", "InstanceNormalization", "LayerNormalization"})


@dataclasses.dataclass(frozen=True)
class Update:
    """A layer whose weight trains: all of it (`channels` None) or the channels listed along `axis`."""

    candidate: Candidate
    channels: tuple[int, ...] | None = None
    axis: str | None = None  # "input" (conv input channels, or depthwise channels) or "output"

    @property
    def ratio(self) -> float:
        if self.channels is None:
            return 1.0
        total = self.candidate.slice_channels if self.axis == "input" else self.candidate.channels
        return len(self.channels) / total

    @property
    def weight_values(self) -> int:
        return round(self.candidate.weight_values * self.ratio)


@dataclasses.dataclass(frozen=True)
class Cost:
    retained_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    backward_macs: int

    @property
    def memory_bytes(self) -> int:
        return self.retained_bytes + self.gradient_bytes + self.optimizer_bytes

    def to_dict(self) -> dict[str, int]:
        return {"retained_activation_bytes": self.retained_bytes, "gradient_bytes": self.gradient_bytes,
                "optimizer_state_bytes": self.optimizer_bytes, "backward_memory_bytes": self.memory_bytes,
                "backward_macs": self.backward_macs}


def trained_biases(facts: ModelFacts, candidates: list[Candidate], updates: Mapping[int, Update], mode: str) -> set[int]:
    """Positions of the candidates whose bias trains: of updated layers ('chosen'), or also of every
    layer the gradient passes through anyway ('path'), or none."""
    if mode == "none":
        return set()
    with_bias = {p for p in updates if candidates[p].bias}
    if mode == "chosen":
        return with_bias
    needs, _ = _requires_grad(facts, candidates, updates, set())
    return with_bias | {c.position for c in candidates if c.bias and c.input in needs}


def plan_cost(facts: ModelFacts, candidates: list[Candidate], updates: Mapping[int, Update], biases: set[int],
              optimizer: str, loss: str, lean: bool = False) -> Cost:
    """Counted cost of training `updates` (and the biases of `biases`) at `facts.batch_size`.

    With `lean`, the frozen path is counted as `lean.lean_frozen_path` rewrites it: frozen
    1x1 convs keep nothing.
    """
    values = sum(u.weight_values for u in updates.values()) + sum(candidates[p].bias_values for p in biases)
    gradient_bytes = values * FLOAT_BYTES
    if not updates and not biases:
        return Cost(0, 0, 0, 0)
    needs, start = _requires_grad(facts, candidates, updates, biases)
    by_node = {c.node: c for c in candidates}
    retained: dict[str, int] = {}
    macs = 0
    for node in facts.path[start:]:  # nothing before the first trained parameter's consumer needs a gradient
        inputs_needing = [name for name in node.input if name in needs]
        candidate = by_node.get(node.name)
        update = updates.get(candidate.position) if candidate else None
        if update is not None:
            macs += _updated_layer(facts, update, node.input[0] in needs, retained, lean)
            continue
        if not inputs_needing:
            continue
        if node.name in facts.fused_gelu:
            _keep(facts, facts.fused_gelu[node.name], retained)  # the runtime's fused Gelu keeps its input alone
            continue
        if node.op_type == "LayerNormalization":
            _keep_norm_statistics(facts, node, retained)
        if lean and node.input[0] in needs and _pointwise(facts, node):
            macs += (candidate.macs if candidate else 0)  # MatMul(W, x): its x gradient reads W only
        elif node.op_type in ("Conv", "ConvTranspose"):
            # ConvGrad takes X whatever it computes; dX costs one forward-sized product
            _keep(facts, node.input[0], retained)
            macs += (candidate.macs if candidate else 0) if node.input[0] in needs else 0
        elif node.op_type in ("Gemm", "MatMul"):
            for slot, other in ((0, 1), (1, 0)):
                if node.input[slot] in needs:
                    _keep(facts, node.input[other], retained)
                    macs += candidate.macs if candidate else (forward_macs(node, facts.shapes) or 0)  # attention's products too
        elif node.op_type in PASS_THROUGH:
            continue
        elif node.op_type in READS_OUTPUT:
            _keep(facts, node.output[0], retained)
        elif node.op_type in READS_INPUT:
            _keep(facts, node.input[0], retained)
        elif node.op_type == "Mul":
            for slot, other in ((0, 1), (1, 0)):
                if node.input[slot] in needs:
                    _keep(facts, node.input[other], retained)
        elif node.op_type == "Div" and node.input[1] not in needs:
            _keep(facts, node.input[1], retained)  # d(a/b)/da = 1/b: the divisor only (a constant: nothing; attention's scale)
        else:  # unknown gradient: assume it reads every activation input
            for name in node.input:
                _keep(facts, name, retained)
    batch = facts.batch_size
    # the loss gradient reads the loss node's probabilities and the labels
    retained["<loss>"] = facts.bytes_of(facts.output) + (batch * 8 if loss == "cross-entropy" else facts.bytes_of(facts.output))
    states = OPTIMIZER_STATES[optimizer]
    return Cost(sum(retained.values()), gradient_bytes, gradient_bytes * states, macs)


def _updated_layer(facts: ModelFacts, update: Update, input_needs: bool, retained: dict[str, int], lean: bool) -> int:
    c = update.candidate
    ratio = update.ratio
    if update.channels is not None and update.axis == "input":
        # weight gradient reads only the gathered channels; passing dX on reads the rest too
        # (unless the frozen rest is a 1x1 conv that the lean rewrite turns into a MatMul)
        retained[f"{c.input}[sliced for {c.node}]"] = round(c.input_bytes * ratio)
        # a linear layer's input gradient reads only the weight
        if input_needs and c.kind != "linear" and not (lean and c.kind == "conv" and _pointwise(facts, facts.index.producer.get(c.output))):
            retained[f"{c.input}[rest for {c.node}]"] = c.input_bytes - round(c.input_bytes * ratio)
    else:
        _keep(facts, c.input, retained)
    return round(c.macs * ratio) + (c.macs if input_needs else 0)


def _pointwise(facts: ModelFacts, node: onnx.NodeProto | None) -> bool:
    """A group-1 1x1 stride-1 unpadded Conv with an initializer weight and a static input shape (see `lean`)."""
    if node is None or node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in facts.index.initializers:
        return False
    if not is_pointwise_frozen_conv(node, facts.index, frozenset()):
        return False
    shape = facts.shapes.get(node.input[0])
    return shape is not None and len(shape) >= 3 and all(d > 0 for d in shape[1:])


def _keep_norm_statistics(facts: ModelFacts, node: onnx.NodeProto, retained: dict[str, int]) -> None:
    """LayerNormalization's gradient also reads the mean and inverse standard deviation it saved (float32,
    one value per normalised row)."""
    shape = facts.shapes.get(node.input[0])
    if shape is None:
        return
    axis = next((int(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == "axis"), -1)
    rows = math.prod(shape[: axis % len(shape)])
    retained.setdefault(f"{node.output[0]}[mean, inv_std_dev]", 2 * rows * FLOAT_BYTES)


def _keep(facts: ModelFacts, name: str, retained: dict[str, int]) -> None:
    if name and name not in facts.constants and name not in retained:
        retained[name] = facts.bytes_of(name)


def _requires_grad(facts: ModelFacts, candidates: list[Candidate], updates: Mapping[int, Update],
                   biases: set[int]) -> tuple[set[str], int]:
    """Tensors that get a gradient (outputs of nodes with a trained parameter or a gradient-carrying
    input), and the index in `facts.path` of the first node that reads a trained parameter."""
    trained = {candidates[p].weight for p in updates} | {candidates[p].bias for p in biases if candidates[p].bias}
    needs: set[str] = set(trained)  # type: ignore[arg-type]
    start = min((facts.first_use[name] for name in needs if name in facts.first_use), default=len(facts.path))
    is_float = facts.index.is_float
    for node in facts.path[start:]:
        if any(name in needs for name in node.input):
            needs.update(name for name in node.output if name and is_float(name))
    return needs, start
