"""Training-graph surgery: weight gradients from a compressed input, exact input gradients.

For every compressed layer the forward part of the training graph gets a few nodes
right after the layer that compute the compressed form from its input X; the
gradient node(s) that read X are replaced by nodes that read only the compressed
form, dY and the weight. Afterwards nothing in backward reads X, so onnxruntime's
memory planner frees it once forward has used it.

- ASI (Tucker): core S = X x_m U_m^T and, per compressed mode, P_m = X_(m) X_(m)^T U_m
  (one subspace iteration, orthonormalised by the runtime hook for the next step).
  The factors U_m are graph inputs, the P_m graph outputs.
- gradient filter: mean of the kernel-centre input taps over r x r output patches.
- dX = ConvTranspose(dY, W) (exact, with output_padding for strided convs); for
  Gemm/MatMul onnxruntime's own dX nodes stay (they never read X).
- the layer's forward consumers read its output through an alias that depends on
  the compressed tensors (`_anchor`), so onnxruntime runs the compression right
  after the layer instead of at the end of the step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeplug.plugin_api import GraphEditor, ModelError, remove_unused

from . import contract, tucker
from .layers import Layer

DIMS = "abcd"
RANKS = "efgh"


@dataclasses.dataclass
class Plan:
    """How one layer is compressed: ranks (ASI) or patch (gradient filter)."""

    layer: Layer
    method: str
    ranks: tuple[int, ...] = ()
    patch: int = 1

    @property
    def active(self) -> list[int]:
        return [m for m, (d, k) in enumerate(zip(self.layer.x_shape, self.ranks)) if k < d]

    def factor_input(self, mode: int) -> str:
        return f"{self.layer.node}.asi.U{mode}"

    def factor(self, mode: int) -> str:
        """The factor refreshed in the graph from this step's input: what compresses it, and a graph output."""
        return f"{self.layer.node}.asi.U{mode}.next"


@dataclasses.dataclass
class Built:
    """What a layer's rewrite kept for backward, and its counted backward MACs."""

    stored: dict[str, tuple[int, ...]]  # tensor name -> shape (core / pooled input, and factors)
    backward_macs: int
    vanilla_backward_macs: int
    forward_extra_macs: int
    anchored: tuple[str, str] | None = None  # (layer output, its alias that forward consumers read instead)
    backward_intermediate: int = 0  # elements of the largest weight-gradient intermediate


class Nodes:
    """Builds nodes through a GraphEditor, with an optional fixed name for the last output."""

    def __init__(self, editor: GraphEditor) -> None:
        self.editor = editor

    def op(self, op_type: str, inputs: Sequence[str], base: str, output: str | None = None, domain: str = "", **attrs: Any) -> str:
        name = self.editor.node(op_type, list(inputs), base, **attrs)
        node = self.editor.last_node()
        if domain:
            node.domain = domain
        if output:
            node.output[0] = output
            return output
        return name

    def const(self, base: str, value: np.ndarray) -> str:
        """An initializer of the training graph: a constant there (parameters are graph inputs)."""
        name = self.editor.fresh(base)
        self.editor.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def ints(self, base: str, values: Sequence[int]) -> str:
        return self.const(base, np.array(list(values), dtype=np.int64))

    def take(self) -> list[onnx.NodeProto]:
        return self.editor.take_nodes()


def _replace_letter(term: str, old: str, new: str) -> str:
    return term.replace(old, new)


# -- forward: the compressed form ----------------------------------------------------------------

def asi_forward(nodes: Nodes, plan: Plan) -> tuple[str, str, dict[int, str], int]:
    """One subspace iteration per compressed mode on this step's X, orthonormalised in the graph,
    then the core S = X x_m U_m^T with the refreshed factors.

    Returns (core name, core einsum term, {mode: refreshed factor}, MACs). The refreshed factors
    are graph outputs too: the runtime hook feeds them back as next step's warm start."""
    layer, base = plan.layer, f"{plan.layer.node}.asi"
    rank = len(layer.x_shape)
    dims = DIMS[:rank]
    refreshed: dict[int, str] = {}
    macs = 0
    for mode in plan.active:
        k = plan.ranks[mode]
        letter = RANKS[mode]
        projected_term = _replace_letter(dims, dims[mode], letter)
        # V = A_(m)^T U_m (kept as a tensor), P = A_(m) V
        projected = nodes.op("Einsum", [layer.input, plan.factor_input(mode)], f"{base}.T{mode}",
                             equation=f"{dims},{dims[mode]}{letter}->{projected_term}")
        power = nodes.op("Einsum", [layer.input, projected], f"{base}.P{mode}", equation=f"{dims},{projected_term}->{dims[mode]}{letter}")
        macs += 2 * math.prod(layer.x_shape) * k
        refreshed[mode] = orthonormalise(nodes, power, plan.factor_input(mode), k, plan.factor(mode), f"{base}.orth{mode}")
        macs += orthonormalise_macs(layer.x_shape[mode], k)
    term, core = dims, layer.input
    size = math.prod(layer.x_shape)
    for mode in plan.active:
        new_term = _replace_letter(term, dims[mode], RANKS[mode])
        core = nodes.op("Einsum", [core, refreshed[mode]], f"{base}.S{mode}", equation=f"{term},{dims[mode]}{RANKS[mode]}->{new_term}")
        macs += size * plan.ranks[mode]
        size = size // layer.x_shape[mode] * plan.ranks[mode]
        term = new_term
    if not plan.active:
        core = nodes.op("Identity", [layer.input], f"{base}.S")
    return core, term, refreshed, macs


def orthonormalise(nodes: Nodes, power: str, previous: str, rank: int, output: str, base: str) -> str:
    """Q = orth(P) in the graph (ONNX has no QR): classical Gram-Schmidt with re-orthogonalisation
    (CGS2), unrolled over the K columns. P is first scaled to unit Frobenius norm and
    tucker.ORTH_MIX x U_prev is added, so that a column that P leaves (numerically) empty still gets a
    direction; each column is divided by sqrt(||v||^2 + tucker.ORTH_EPS). Two projection passes keep
    Q^T Q = I to float32 round-off even when P is badly conditioned (P = A A^T U squares A's spectrum)."""
    norm = nodes.op("Sqrt", [nodes.op("Add", [nodes.op("ReduceSumSquare", [power], f"{base}.fro2", keepdims=1),
                                              nodes.const(f"{base}.eps", np.array(tucker.ORTH_EPS, np.float32))], f"{base}.fro2eps")], f"{base}.fro")
    scaled = nodes.op("Div", [power, norm], f"{base}.scaled")
    mixed = nodes.op("Add", [scaled, nodes.op("Mul", [previous, nodes.const(f"{base}.mix", np.array(tucker.ORTH_MIX, np.float32))], f"{base}.prev")],
                     f"{base}.mixed")
    eps = nodes.const(f"{base}.col_eps", np.array(tucker.ORTH_EPS, np.float32))
    basis = ""
    for column in range(rank):
        v = nodes.op("Gather", [mixed, nodes.ints(f"{base}.col{column}", [column])], f"{base}.v{column}", axis=1)  # D x 1
        if column:
            transposed = nodes.op("Transpose", [basis], f"{base}.bt{column}", perm=[1, 0])
            for sweep in range(2):
                h = nodes.op("MatMul", [transposed, v], f"{base}.h{column}_{sweep}")
                v = nodes.op("Sub", [v, nodes.op("MatMul", [basis, h], f"{base}.p{column}_{sweep}")], f"{base}.v{column}_{sweep}")
        length = nodes.op("Sqrt", [nodes.op("Add", [nodes.op("ReduceSumSquare", [v], f"{base}.n{column}", keepdims=1), eps], f"{base}.ne{column}")],
                          f"{base}.len{column}")
        last = column == rank - 1
        q = nodes.op("Div", [v, length], f"{base}.q{column}", output=output if last and not column else None)
        if column:
            basis = nodes.op("Concat", [basis, q], f"{base}.Q{column}", output=output if last else None, axis=1)
        else:
            basis = q
    return basis


def orthonormalise_macs(size: int, rank: int) -> int:
    """Multiply-adds of `orthonormalise` on a size x rank P: the scaling and mixing (3 D K), the column
    norms (D K) and two projection sweeps per column j (2 x 2 D j), i.e. about 2 D K^2 + 2 D K."""
    return 4 * size * rank + sum(4 * size * j for j in range(rank))


def filter_forward(nodes: Nodes, plan: Plan) -> str:
    """Mean of the kernel-centre input taps over r x r output patches: [B, C, ceil(H'/r), ceil(W'/r)]."""
    layer, base = plan.layer, f"{plan.layer.node}.gf"
    g = layer.geometry
    assert g is not None
    _, channels, height, width = layer.x_shape
    ho, wo = layer.y_shape[2:]
    sizes, outs = (height, width), (ho, wo)
    starts, pads_begin, pads_end = [], [0, 0], [0, 0]
    for axis in range(2):
        centre = (g.kernel[axis] // 2) * g.dilation[axis]
        first = centre - g.pads[axis]
        last = first + g.stride[axis] * (outs[axis] - 1)
        if first < 0 or last >= sizes[axis]:
            pads_begin[axis], pads_end[axis] = g.pads[axis], g.pads[axis + 2] + max(0, last - (sizes[axis] + g.pads[axis] + g.pads[axis + 2]) + 1)
            first = centre
        starts.append(first)
    taps = layer.input
    if any(pads_begin) or any(pads_end):
        taps = nodes.op("Pad", [taps, nodes.ints(f"{base}.pads", [0, 0, *pads_begin, 0, 0, *pads_end])], f"{base}.padded")
    if any(s != 0 for s in starts) or g.stride != (1, 1) or outs != sizes:
        ends = [starts[a] + g.stride[a] * (outs[a] - 1) + 1 for a in range(2)]
        taps = nodes.op("Slice", [taps, nodes.ints(f"{base}.starts", starts), nodes.ints(f"{base}.ends", ends),
                                  nodes.ints(f"{base}.axes", [2, 3]), nodes.ints(f"{base}.steps", list(g.stride))], f"{base}.taps")
    return _patch_reduce(nodes, taps, channels, (ho, wo), plan.patch, f"{base}.x", mean=True)


def _patch_reduce(nodes: Nodes, tensor: str, channels: int, size: tuple[int, int], patch: int, base: str, *, mean: bool) -> str:
    h, w = size
    hr, wr = -(-h // patch), -(-w // patch)
    if hr * patch != h or wr * patch != w:
        tensor = nodes.op("Pad", [tensor, nodes.ints(f"{base}.pads", [0, 0, 0, 0, 0, 0, hr * patch - h, wr * patch - w])], f"{base}.padded")
    shaped = nodes.op("Reshape", [tensor, nodes.ints(f"{base}.shape", [-1, channels, hr, patch, wr, patch])], f"{base}.patches")
    summed = nodes.op("ReduceSum", [shaped, nodes.ints(f"{base}.axes", [3, 5])], f"{base}.sum", keepdims=0)
    if not mean:
        return summed
    counts = np.zeros((hr * patch, wr * patch), dtype=np.float32)
    counts[:h, :w] = 1
    inverse = 1.0 / counts.reshape(hr, patch, wr, patch).sum(axis=(1, 3))
    return nodes.op("Mul", [summed, nodes.const(f"{base}.inverse_counts", inverse.astype(np.float32))], f"{base}.mean")


# -- backward -------------------------------------------------------------------------------------

def conv_input_grad(nodes: Nodes, layer: Layer, dy: str, output: str) -> str:
    """dX = ConvTranspose(dY, W): exact, needs only X's (static) shape."""
    g = layer.geometry
    assert g is not None
    padding = []
    for axis in range(2):
        produced = g.stride[axis] * (layer.y_shape[2 + axis] - 1) + (g.kernel[axis] - 1) * g.dilation[axis] + 1 - g.pads[axis] - g.pads[axis + 2]
        padding.append(layer.x_shape[2 + axis] - produced)
    return nodes.op("ConvTranspose", [dy, layer.weight], f"{layer.node}.shortcut.dX", output=output, strides=list(g.stride),
                    pads=list(g.pads), dilations=list(g.dilation), group=g.group, kernel_shape=list(g.kernel), output_padding=padding)


def conv_bias_grad(nodes: Nodes, layer: Layer, dy: str, output: str) -> str:
    return nodes.op("ReduceSum", [dy, nodes.ints(f"{layer.node}.shortcut.bias_axes", [0, 2, 3])], f"{layer.node}.shortcut.dB",
                    output=output, keepdims=0)


def _shifted_factor(nodes: Nodes, plan: Plan, mode: int, base: str) -> str:
    """W[u, i, k] = U_pad[i s + u d, k]: the spatial factor seen by kernel tap u at output row i
    (zero rows stand for the padding). Built from the factor alone, so it may run in forward: it is tiny."""
    layer = plan.layer
    g = layer.geometry
    assert g is not None
    axis = mode - 2
    begin, end = g.pads[axis], g.pads[axis + 2]
    size, out = layer.x_shape[mode], layer.y_shape[mode]
    index = np.array([[i * g.stride[axis] + u * g.dilation[axis] for i in range(out)] for u in range(g.kernel[axis])], dtype=np.int64)
    if mode not in plan.active:  # the identity factor, as a constant
        padded = np.zeros((size + begin + end, size), dtype=np.float32)
        padded[begin : begin + size] = np.eye(size, dtype=np.float32)
        return nodes.const(f"{base}.W{mode}", padded[index])
    factor = plan.factor(mode)
    if begin or end:
        factor = nodes.op("Pad", [factor, nodes.ints(f"{base}.U{mode}_pads", [begin, 0, end, 0])], f"{base}.U{mode}p")
    return nodes.op("Gather", [factor, nodes.ints(f"{base}.W{mode}_index", index.ravel().tolist())], f"{base}.W{mode}_flat", axis=0)


def _einsum(nodes: Nodes, base: str) -> Callable[[str, str, str, str], str]:
    return lambda first, second, equation, step: nodes.op("Einsum", [first, second], f"{base}.{step}", equation=equation)


def _spatial_is_identity(plan: Plan, mode: int) -> bool:
    """A whole spatial mode of a 1x1, stride-1, unpadded conv: output row i reads input row i, no factor."""
    layer = plan.layer
    g = layer.geometry
    assert g is not None
    axis = mode - 2
    return (mode not in plan.active and g.kernel[axis] == 1 and g.stride[axis] == 1 and g.pads[axis] == 0
            and g.pads[axis + 2] == 0 and layer.y_shape[mode] == layer.x_shape[mode])


def asi_conv_weight_grad(nodes: Nodes, plan: Plan, core: str, dy: str, output: str) -> tuple[int, int]:
    """dW[g,o,c,u,v] = sum dY[b,g,o,i,j] U0[b,e] U1[g,c,f] S[e,f,k,l] W2[u,i,k] W3[v,j,l] (W2[u,i,k] =
    U2pad[i s + u d, k]; whole modes drop their factor), contracted in the cheapest order whose
    intermediates stay within the larger of X and dY (contract.py). X is never rebuilt in full, and
    every intermediate depends on dY, so nothing large is computed in forward and kept.
    Returns (MACs, largest intermediate in elements)."""
    layer, base = plan.layer, f"{plan.layer.node}.asi.dW"
    g = layer.geometry
    assert g is not None
    batch, channels = layer.x_shape[:2]
    out, ho, wo = layer.y_shape[1], layer.y_shape[2], layer.y_shape[3]
    og, cg = out // g.group, channels // g.group
    active = set(plan.active)
    sizes = {"b": batch, "g": g.group, "o": og, "c": cg, "i": ho, "j": wo, "u": g.kernel[0], "v": g.kernel[1]}
    grouped_dy = nodes.op("Reshape", [dy, nodes.ints(f"{base}.dY_shape", [0, g.group, og, ho, wo])], f"{base}.dY")
    operands = [contract.Operand(grouped_dy, "bgoij")]
    core_terms = ["b", "gc", "", ""]
    if 0 in active:
        sizes["e"] = plan.ranks[0]
        operands.append(contract.Operand(plan.factor(0), "be"))
        core_terms[0] = "e"
    core_shape = [0, channels]
    if 1 in active:
        sizes["f"] = plan.ranks[1]
        u1 = nodes.op("Reshape", [plan.factor(1), nodes.ints(f"{base}.U1_shape", [g.group, cg, plan.ranks[1]])], f"{base}.U1")
        operands.append(contract.Operand(u1, "gcf"))
        core_terms[1] = "f"
        core_shape = [0, plan.ranks[1]]
    else:
        core_shape = [0, g.group, cg]
    taps = ""
    for mode, (tap, row, rank) in zip((2, 3), (("u", "i", "k"), ("v", "j", "l"))):
        size = plan.ranks[mode] if mode in active else layer.x_shape[mode]
        core_shape.append(size)
        if _spatial_is_identity(plan, mode):
            core_terms[mode] = row
            continue
        sizes[rank] = size
        shifted = nodes.op("Reshape", [_shifted_factor(nodes, plan, mode, base),
                                       nodes.ints(f"{base}.W{mode}_shape", [g.kernel[mode - 2], layer.y_shape[mode], size])], f"{base}.W{mode}")
        operands.append(contract.Operand(shifted, tap + row + rank))
        core_terms[mode] = rank
        taps += tap
    if 1 not in active:
        core = nodes.op("Reshape", [core, nodes.ints(f"{base}.S_shape", core_shape)], f"{base}.S")
    operands.append(contract.Operand(core, "".join(core_terms)))
    limit = max(math.prod(layer.x_shape), math.prod(layer.y_shape))
    grad, macs, largest = contract.contract(operands, sizes, "goc" + taps, limit, _einsum(nodes, base))
    nodes.op("Reshape", [grad, nodes.ints(f"{base}.dW_shape", [out, cg, *g.kernel])], f"{base}.dW", output=output)
    return macs, largest


def asi_linear_weight_grad(nodes: Nodes, plan: Plan, core: str, term: str, dy: str, output: str) -> tuple[int, int]:
    """dW[i,o] = sum over the leading modes of X~[..., i] dY[..., o], X~ = S x_m U_m: the network of dY, the
    core and the factors, contracted in the cheapest order (contract.py); transposed for Gemm `transB`,
    scaled by `alpha`. Returns (MACs, largest intermediate in elements)."""
    layer, base = plan.layer, f"{plan.layer.node}.asi.dW"
    rank = len(layer.x_shape)
    dims, last = DIMS[:rank], rank - 1
    sizes = {"o": layer.y_shape[-1], **{dims[m]: d for m, d in enumerate(layer.x_shape)}}
    operands = [contract.Operand(dy, dims[:last] + "o"), contract.Operand(core, term)]
    for mode in plan.active:
        sizes[RANKS[mode]] = plan.ranks[mode]
        operands.append(contract.Operand(plan.factor(mode), dims[mode] + RANKS[mode]))
    final = ("o" + dims[last]) if layer.op_type == "Gemm" and layer.trans_b else (dims[last] + "o")
    scale = layer.alpha if layer.op_type == "Gemm" else 1.0
    limit = max(math.prod(layer.x_shape), math.prod(layer.y_shape))
    grad, macs, largest = contract.contract(operands, sizes, final, limit, _einsum(nodes, base))
    if scale != 1.0:
        nodes.op("Mul", [grad, nodes.const(f"{base}.alpha", np.array(scale, dtype=np.float32))], f"{base}.scaled", output=output)
    else:
        nodes.op("Identity", [grad], f"{base}.W", output=output)
    return macs, largest


def filter_conv_weight_grad(nodes: Nodes, plan: Plan, pooled: str, dy: str, output: str) -> int:
    layer, base = plan.layer, f"{plan.layer.node}.gf.dW"
    g = layer.geometry
    assert g is not None
    batch, channels = layer.x_shape[:2]
    out, ho, wo = layer.y_shape[1:]
    hr, wr = -(-ho // plan.patch), -(-wo // plan.patch)
    gsum = _patch_reduce(nodes, dy, out, (ho, wo), plan.patch, f"{base}.g", mean=False)
    og, cg = out // g.group, channels // g.group
    gg = nodes.op("Reshape", [gsum, nodes.ints(f"{base}.g_shape", [-1, g.group, og, hr, wr])], f"{base}.g_grouped")
    xg = nodes.op("Reshape", [pooled, nodes.ints(f"{base}.x_shape", [-1, g.group, cg, hr, wr])], f"{base}.x_grouped")
    value = nodes.op("Einsum", [gg, xg], f"{base}.value", equation="bgohw,bgchw->goc")
    value = nodes.op("Reshape", [value, nodes.ints(f"{base}.w_shape", [out, cg, 1, 1])], f"{base}.value_w")
    nodes.op("Expand", [value, nodes.ints(f"{base}.kernel", [out, cg, *g.kernel])], f"{base}.dW", output=output)
    return batch * out * cg * hr * wr + batch * out * ho * wo


# -- the rewrite of one training graph --------------------------------------------------------------

def vanilla_backward_macs(layer: Layer, needs_input_grad: bool) -> int:
    """MACs of onnxruntime's own gradient of the layer: dW, plus dX when it is needed."""
    if layer.is_conv:
        g = layer.geometry
        assert g is not None
        weight = math.prod(layer.w_shape)
        per_output = weight * math.prod(layer.y_shape[2:]) * layer.x_shape[0]
        return per_output * (2 if needs_input_grad else 1)
    rows = math.prod(layer.x_shape[:-1])
    return rows * layer.x_shape[-1] * layer.y_shape[-1] * (2 if needs_input_grad else 1)


def rewrite_layer(model: onnx.ModelProto, editor: GraphEditor, plan: Plan) -> tuple[Built, list[onnx.NodeProto], dict[str, list[onnx.NodeProto]], list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """Build the nodes for one layer. Returns what is stored, the forward nodes (placed after the
    layer), replacements for gradient nodes (by name), new graph inputs and outputs."""
    layer = plan.layer
    nodes = Nodes(editor)
    inputs: list[onnx.ValueInfoProto] = []
    outputs: list[onnx.ValueInfoProto] = []
    stored: dict[str, tuple[int, ...]] = {}
    forward_macs = 0
    if plan.method == "asi":
        core, term, powers, forward_macs = asi_forward(nodes, plan)
        core_shape = tuple(k if m in plan.active else d for m, (d, k) in enumerate(zip(layer.x_shape, plan.ranks)))
        stored[core] = core_shape
        for mode in plan.active:
            dim: int | str = "batch" if mode == 0 else layer.x_shape[mode]
            inputs.append(helper.make_tensor_value_info(plan.factor_input(mode), TensorProto.FLOAT, [dim, plan.ranks[mode]]))
            outputs.append(helper.make_tensor_value_info(powers[mode], TensorProto.FLOAT, [dim, plan.ranks[mode]]))
            stored[plan.factor(mode)] = (layer.x_shape[mode], plan.ranks[mode])
        compressed = core
    else:
        powers = {}
        compressed = filter_forward(nodes, plan)
        ho, wo = layer.y_shape[2:]
        stored[compressed] = (layer.x_shape[0], layer.x_shape[1], -(-ho // plan.patch), -(-wo // plan.patch))
        forward_macs += math.prod(layer.x_shape)
    anchored = (layer.output, _anchor(nodes, layer, [compressed, *(powers.values() if plan.method == "asi" else [])]))
    forward = nodes.take()

    replacements: dict[str, list[onnx.NodeProto]] = {}
    if layer.is_conv:
        grad = _conv_grad_node(model, layer)
        dy = grad.input[0]
        dx, dw = grad.output[0], grad.output[1] if len(grad.output) > 1 else ""
        db = grad.output[2] if len(grad.output) > 2 else ""
        if not dw:
            raise ModelError(f"{grad.name} computes no weight gradient for {layer.weight}")
        if plan.method == "asi":
            macs, peak = asi_conv_weight_grad(nodes, plan, compressed, dy, dw)
        else:
            macs, peak = filter_conv_weight_grad(nodes, plan, compressed, dy, dw), 0
        if dx:
            conv_input_grad(nodes, layer, dy, dx)
            macs += vanilla_backward_macs(layer, False)
        if db:
            conv_bias_grad(nodes, layer, dy, db)
        replacements[grad.name] = nodes.take()
        vanilla = vanilla_backward_macs(layer, bool(dx))
    else:
        target = f"{layer.weight}_grad"
        producer = next((n for n in model.graph.node if target in n.output), None)
        dy = f"{layer.output}_grad"
        if producer is None or not any(dy in n.output for n in model.graph.node):
            raise ModelError(f"no weight gradient '{target}' or output gradient '{dy}' for {layer.node}")
        macs, peak = asi_linear_weight_grad(nodes, plan, compressed, term, dy, target)
        replacements[producer.name] = nodes.take()
        needs_dx = any(f"{layer.input}_grad" in n.output for n in model.graph.node)
        vanilla = vanilla_backward_macs(layer, needs_dx)
        macs += vanilla - vanilla_backward_macs(layer, False)  # onnxruntime's own dX stays
    return Built(stored, macs, vanilla, forward_macs, anchored, peak), forward, replacements, inputs, outputs


def _anchor(nodes: Nodes, layer: Layer, needed: Sequence[str]) -> str:
    """An alias of the layer's output (zero-copy Reshape to its own shape) whose shape input depends on
    the compressed tensors. Forward consumers read the alias, so onnxruntime's topological order must
    run the compression right after the layer, while X is still the newest activation; without it the
    compression (consumed only by backward and by graph outputs) is scheduled at the end of the step and
    X stays alive through forward and backward."""
    base = f"{layer.node}.shortcut.anchor"
    shape = nodes.op("Shape", [layer.output], f"{base}.shape")
    for index, name in enumerate(needed):
        # A zero that depends on the tensor's values (x > x is false even for NaN), so that no
        # constant folding of static shapes can cut the dependency.
        flat = nodes.op("Reshape", [name, nodes.ints(f"{base}.flat", [-1])], f"{base}.dep{index}")
        first = nodes.op("Slice", [flat, nodes.ints(f"{base}.zero_start", [0]), nodes.ints(f"{base}.one_end", [1])], f"{base}.dep{index}_first")
        zero = nodes.op("Cast", [nodes.op("Greater", [first, first], f"{base}.dep{index}_false")], f"{base}.dep{index}_zero", to=TensorProto.INT64)
        shape = nodes.op("Add", [shape, zero], f"{base}.shape{index}")
    return nodes.op("Reshape", [layer.output, shape], f"{layer.output}.after_shortcut")


def _conv_grad_node(model: onnx.ModelProto, layer: Layer) -> onnx.NodeProto:
    for node in model.graph.node:
        if node.op_type == "ConvGrad" and len(node.input) >= 3 and node.input[1] == layer.input and node.input[2] == layer.weight:
            return node
    raise ModelError(f"no ConvGrad for {layer.node} in the training graph")


def apply(model: onnx.ModelProto, forward: dict[str, list[onnx.NodeProto]], replacements: dict[str, list[onnx.NodeProto]],
          removable: set[str], aliases: dict[str, str]) -> None:
    """Place forward nodes after their layer, replace gradient nodes, make the original forward nodes read
    the layers' anchored outputs (`aliases`), then drop what is left unused (gradient helpers)."""
    for node in model.graph.node:
        if node.name not in removable:
            for slot, name in enumerate(node.input):
                if name in aliases:
                    node.input[slot] = aliases[name]
    placed: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.name in replacements:
            placed.extend(replacements[node.name])
            continue
        placed.append(node)
        placed.extend(forward.get(node.name, []))
    del model.graph.node[:]
    model.graph.node.extend(placed)
    remove_unused(model)
