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
    center: bool = False  # asi: compress X minus its per-channel mean; the mean is kept exactly
    opset: int = 17
    original: Layer | None = None  # the layer itself when `layer` is its view through a zero Pad

    @property
    def real(self) -> Layer:
        """The layer as the graph has it (its own input and padding): what dX and vanilla's ConvGrad see."""
        return self.original or self.layer

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
    batch_sized: frozenset[str] = frozenset()  # stored tensors whose first axis is the training batch


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

def reduce_mean(nodes: Nodes, tensor: str, axes: Sequence[int], base: str, opset: int) -> str:
    """ReduceMean keeping the reduced axes (its axes moved from an attribute to an input in opset 18)."""
    if opset >= 18:
        return nodes.op("ReduceMean", [tensor, nodes.ints(f"{base}_axes", axes)], base, keepdims=1)
    return nodes.op("ReduceMean", [tensor], base, axes=list(axes), keepdims=1)


def asi_forward(nodes: Nodes, plan: Plan) -> tuple[str, str, dict[int, str], str | None, int]:
    """This step's compressed X, mirrored by tucker.asi_step. Modes are taken channel first (it shrinks X
    most), each on what the earlier projections left: one warm-started subspace iteration
    P_m = A_(m) A_(m)^T U_m on that tensor A, orthonormalised in the graph (U'_m, a graph output that is
    carried to the next step), then A <- A x_m U'_m^T. Only the channel mode reads the full X (three
    passes: V = X x U^T, P = X V^T, the projection); the other modes work on the small core.

    With `plan.center` the per-channel mean mu (over batch and positions) is kept exactly and the rest is
    compressed, without building X - mu: for the channel mode, Vc = V - U^T mu gives P = X Vc^T exactly
    (Vc sums to zero over the positions) and the core is X x U'^T - U'^T mu. Returns (core, its einsum
    term, {mode: refreshed factor}, mean or None, MACs)."""
    layer, base = plan.layer, f"{plan.layer.node}.asi"
    shape = layer.x_shape
    rank = len(shape)
    dims = DIMS[:rank]
    channel = layer.channel_axis
    size = math.prod(shape)
    refreshed: dict[int, str] = {}
    macs = 0
    core, term = layer.input, dims
    mean = None
    mu = ""  # the mean as a vector over the channel axis
    if plan.center:
        others = [a for a in range(rank) if a != channel]
        mean = reduce_mean(nodes, layer.input, others, f"{base}.mean", plan.opset)
        mu = nodes.op("Reshape", [mean, nodes.ints(f"{base}.mu_shape", [shape[channel]])], f"{base}.mu")
        macs += size
        if channel not in plan.active:  # no cheap correction then: compress X - mu itself
            core = nodes.op("Sub", [layer.input, mean], f"{base}.centred")
            macs += size
    for mode in tucker.mode_order(rank, channel):
        if mode not in plan.active:
            continue
        k, letter, old = plan.ranks[mode], RANKS[mode], dims[mode]
        projected_term = _replace_letter(term, old, letter)
        fed = plan.factor_input(mode)
        projected = nodes.op("Einsum", [core, fed], f"{base}.T{mode}", equation=f"{term},{old}{letter}->{projected_term}")
        folded = plan.center and mode == channel  # the mean still sits in `core` (X)
        if folded:
            shift = nodes.op("Einsum", [fed, mu], f"{base}.m{mode}", equation=f"{old}{letter},{old}->{letter}")
            projected = nodes.op("Sub", [projected, _along(nodes, shift, rank, mode, f"{base}.m{mode}_b")], f"{base}.Tc{mode}")
        power = nodes.op("Einsum", [core, projected], f"{base}.P{mode}", equation=f"{term},{projected_term}->{old}{letter}")
        current = math.prod(_sizes(shape, plan, term))
        macs += 2 * current * k
        refreshed[mode] = orthonormalise(nodes, power, fed, k, plan.factor(mode), f"{base}.orth{mode}")
        macs += orthonormalise_macs(shape[mode], k)
        core = nodes.op("Einsum", [core, refreshed[mode]], f"{base}.S{mode}", equation=f"{term},{old}{letter}->{projected_term}")
        macs += current * k
        if folded:
            shift = nodes.op("Einsum", [refreshed[mode], mu], f"{base}.n{mode}", equation=f"{old}{letter},{old}->{letter}")
            core = nodes.op("Sub", [core, _along(nodes, shift, rank, mode, f"{base}.n{mode}_b")], f"{base}.Sc{mode}")
        term = projected_term
    if core == layer.input:
        core = nodes.op("Identity", [core], f"{base}.S")
    return core, term, refreshed, mean, macs


def _sizes(shape: Sequence[int], plan: Plan, term: str) -> list[int]:
    """Axis sizes of a partly compressed tensor whose einsum term shows which modes are projected."""
    return [plan.ranks[m] if letter in RANKS else shape[m] for m, letter in enumerate(term)]


def _along(nodes: Nodes, vector: str, rank: int, mode: int, base: str) -> str:
    """A vector reshaped to broadcast along axis `mode` of a rank-`rank` tensor."""
    return nodes.op("Reshape", [vector, nodes.ints(f"{base}_shape", [-1 if a == mode else 1 for a in range(rank)])], base)


def orthonormalise(nodes: Nodes, power: str, previous: str, rank: int, output: str, base: str) -> str:
    """Q = orth(P) in the graph (ONNX has no QR): classical Gram-Schmidt with re-orthogonalisation
    (CGS2) over the K columns. P is first scaled to unit Frobenius norm and
    tucker.ORTH_MIX x U_prev is added, so that a column that P leaves (numerically) empty still gets a
    direction; each column is divided by sqrt(||v||^2 + tucker.ORTH_EPS). Two projection passes keep
    Q^T Q = I to float32 round-off even when P is badly conditioned (P = A A^T U squares A's spectrum).

    The columns run in one ONNX `Loop` (16 nodes in its body) instead of being unrolled: unrolled, the
    ~12 nodes per column made 24,000 nodes for EfficientNet-Lite0's last 8 blocks at a 20x budget, and
    onnxruntime's session holds ~3-4 KiB per node (+100 MiB at load, as much as the activations the
    pass frees). The loop carries Q^T (K x D), zero rows for the columns not yet done, so the
    projections over all K rows equal those over the first j."""
    norm = nodes.op("Sqrt", [nodes.op("Add", [nodes.op("ReduceSumSquare", [power], f"{base}.fro2", keepdims=1),
                                              nodes.const(f"{base}.eps", np.array(tucker.ORTH_EPS, np.float32))], f"{base}.fro2eps")], f"{base}.fro")
    scaled = nodes.op("Div", [power, norm], f"{base}.scaled")
    mixed = nodes.op("Add", [scaled, nodes.op("Mul", [previous, nodes.const(f"{base}.mix", np.array(tucker.ORTH_MIX, np.float32))], f"{base}.prev")],
                     f"{base}.mixed")
    eps = nodes.const(f"{base}.col_eps", np.array(tucker.ORTH_EPS, np.float32))
    rows = nodes.op("Transpose", [mixed], f"{base}.mixed_t", perm=[1, 0])
    start = nodes.op("ConstantOfShape", [nodes.op("Shape", [rows], f"{base}.shape")], f"{base}.q0",
                     value=numpy_helper.from_array(np.zeros(1, np.float32)))
    done = nodes.op("Loop", [nodes.const(f"{base}.trips", np.array(rank, np.int64)), "", start], f"{base}.loop",
                    body=_gram_schmidt_body(mixed, eps, nodes.editor.fresh(f"{base}.body")))
    return nodes.op("Transpose", [done], f"{base}.Q", output=output, perm=[1, 0])


def _gram_schmidt_body(mixed: str, eps: str, base: str) -> onnx.GraphProto:
    """One CGS2 column of `orthonormalise`: iteration j, carried Q^T -> Q^T with row j = q_j."""
    h = onnx.helper

    def name(text: str) -> str:
        return f"{base}.{text}"

    def node(op_type: str, inputs: list[str], output: str, **attrs: Any) -> onnx.NodeProto:
        return h.make_node(op_type, inputs, [name(output)], name=name(output + "_node"), **attrs)

    column_shape = numpy_helper.from_array(np.array([1], np.int64), name("one"))
    index_shape = numpy_helper.from_array(np.array([1, 1], np.int64), name("one_one"))
    row_shape = numpy_helper.from_array(np.array([1, -1], np.int64), name("row"))
    body = [node("Reshape", [name("j"), name("one")], "jj"),
            node("Gather", [mixed, name("jj")], "v", axis=1)]
    v = name("v")
    for sweep in range(2):
        body += [node("MatMul", [name("qt"), v], f"h{sweep}"),
                 node("Gemm", [name("qt"), name(f"h{sweep}")], f"p{sweep}", transA=1),
                 node("Sub", [v, name(f"p{sweep}")], f"v{sweep}")]
        v = name(f"v{sweep}")
    body += [node("ReduceSumSquare", [v], "n", keepdims=1),
             node("Add", [name("n"), eps], "ne"),
             node("Sqrt", [name("ne")], "len"),
             node("Div", [v, name("len")], "q"),
             node("Reshape", [name("q"), name("row")], "q_row"),
             node("Reshape", [name("j"), name("one_one")], "at"),
             node("ScatterND", [name("qt"), name("at"), name("q_row")], "qt_next"),
             node("Identity", [name("cond")], "cond_next")]
    inputs = [h.make_tensor_value_info(name("j"), onnx.TensorProto.INT64, []),
              h.make_tensor_value_info(name("cond"), onnx.TensorProto.BOOL, []),
              h.make_tensor_value_info(name("qt"), onnx.TensorProto.FLOAT, None)]
    outputs = [h.make_tensor_value_info(name("cond_next"), onnx.TensorProto.BOOL, []),
               h.make_tensor_value_info(name("qt_next"), onnx.TensorProto.FLOAT, None)]
    return h.make_graph(body, name("graph"), inputs, outputs, [column_shape, index_shape, row_shape])


def orthonormalise_macs(size: int, rank: int) -> int:
    """Multiply-adds of `orthonormalise` on a size x rank P: the scaling and mixing (3 D K), the column
    norms (D K) and two projection sweeps per column against all K rows of the carried Q^T (2 x 2 D K;
    the rows not yet done are zero), i.e. about 4 D K^2 + 4 D K."""
    return 4 * size * rank + rank * 4 * size * rank


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


def _valid_taps(size: int, out: int, kernel: int, stride: int, dilation: int, pad: int) -> np.ndarray:
    """M[u, i] = 1 when kernel tap u of output position i reads the input (not the padding)."""
    rows = np.arange(out)[None, :] * stride + np.arange(kernel)[:, None] * dilation - pad
    return ((rows >= 0) & (rows < size)).astype(np.float32)


def conv_mean_weight_grad(nodes: Nodes, plan: Plan, mean: str, dy: str) -> tuple[str, int]:
    """dW of the mean part of X (mu[c] at every input position, zero in the padding):
    dW[g,o,c,u,v] = mu[g,c] sum_{i,j} (sum_b dY[b,g,o,i,j]) M2[u,i] M3[v,j]. Returns ([O, Cg, kH, kW], MACs)."""
    layer, base = plan.layer, f"{plan.layer.node}.asi.dWmean"
    g = layer.geometry
    assert g is not None
    batch, channels = layer.x_shape[:2]
    out, ho, wo = layer.y_shape[1], layer.y_shape[2], layer.y_shape[3]
    og, cg = out // g.group, channels // g.group
    summed = nodes.op("ReduceSum", [dy, nodes.ints(f"{base}.batch_axis", [0])], f"{base}.dYsum", keepdims=0)
    grouped = nodes.op("Reshape", [summed, nodes.ints(f"{base}.dY_shape", [g.group, og, ho, wo])], f"{base}.dY")
    masks = [nodes.const(f"{base}.M{axis}", _valid_taps(layer.x_shape[2 + axis], layer.y_shape[2 + axis], g.kernel[axis],
                                                        g.stride[axis], g.dilation[axis], g.pads[axis])) for axis in range(2)]
    mu = _after(nodes, nodes.op("Reshape", [mean, nodes.ints(f"{base}.mu_shape", [g.group, cg])], f"{base}.mu"),
                _dy_zero(nodes, dy, f"{base}.gate"), f"{base}.mu_gated")
    sizes = {"g": g.group, "o": og, "c": cg, "i": ho, "j": wo, "u": g.kernel[0], "v": g.kernel[1]}
    operands = [contract.Operand(grouped, "goij"), contract.Operand(masks[0], "ui"), contract.Operand(masks[1], "vj"),
                contract.Operand(mu, "gc")]
    grad, macs, _ = contract.contract(operands, sizes, "gocuv", max(math.prod(layer.x_shape), math.prod(layer.y_shape)),
                                      _einsum(nodes, base))
    shaped = nodes.op("Reshape", [grad, nodes.ints(f"{base}.dW_shape", [out, cg, *g.kernel])], f"{base}.dW")
    return shaped, macs + batch * out * ho * wo


def _conv_network(plan: Plan) -> tuple[list[tuple[str, str]], dict[str, int], str, list[int]]:
    """The weight-gradient network of a conv as (role, indices) pairs: dY, U0, U1, W2, W3, S; the index sizes;
    the output indices; the core's shape as the network reads it."""
    layer = plan.layer
    g = layer.geometry
    assert g is not None
    batch, channels = layer.x_shape[:2]
    out, ho, wo = layer.y_shape[1], layer.y_shape[2], layer.y_shape[3]
    og, cg = out // g.group, channels // g.group
    active = set(plan.active)
    sizes = {"b": batch, "g": g.group, "o": og, "c": cg, "i": ho, "j": wo, "u": g.kernel[0], "v": g.kernel[1]}
    roles = [("dY", "bgoij")]
    core_terms = ["b", "gc", "", ""]
    core_shape = [0, g.group, cg]
    if 0 in active:
        sizes["e"] = plan.ranks[0]
        roles.append(("U0", "be"))
        core_terms[0] = "e"
    if 1 in active:
        sizes["f"] = plan.ranks[1]
        roles.append(("U1", "gcf"))
        core_terms[1] = "f"
        core_shape = [0, plan.ranks[1]]
    taps = ""
    for mode, (tap, row, rank) in zip((2, 3), (("u", "i", "k"), ("v", "j", "l"))):
        size = plan.ranks[mode] if mode in active else layer.x_shape[mode]
        core_shape.append(size)
        if _spatial_is_identity(plan, mode):
            core_terms[mode] = row
            continue
        sizes[rank] = size
        roles.append((f"W{mode}", tap + row + rank))
        core_terms[mode] = rank
        taps += tap
    roles.append(("S", "".join(core_terms)))
    return roles, sizes, "goc" + taps, core_shape


def reconstruction_macs(plan: Plan) -> int:
    """Multiply-adds of rebuilding X from the core and factors (the mean added back), expanding the modes in
    reverse compression order."""
    layer = plan.layer
    size = math.prod(k if m in plan.active else d for m, (d, k) in enumerate(zip(layer.x_shape, plan.ranks)))
    macs = 0
    for mode in reversed(tucker.mode_order(len(layer.x_shape), layer.channel_axis)):
        if mode in plan.active:
            size = size // plan.ranks[mode] * layer.x_shape[mode]
            macs += size * plan.ranks[mode]
    return macs + (size if plan.center else 0)


def conv_dw_macs(layer: Layer) -> int:
    """Multiply-adds of a conv's weight gradient from its full input (what ConvGrad does)."""
    assert layer.geometry is not None
    return math.prod(layer.w_shape) * math.prod(layer.y_shape[2:]) * layer.x_shape[0]


def asi_conv_weight_grad(nodes: Nodes, plan: Plan, core: str, dy: str, output: str, mean: str | None,
                         grad_node: onnx.NodeProto) -> tuple[int, int]:
    """dW[g,o,c,u,v] = sum dY[b,g,o,i,j] U0[b,e] U1[g,c,f] S[e,f,k,l] W2[u,i,k] W3[v,j,l] (W2[u,i,k] =
    U2pad[i s + u d, k]; whole modes drop their factor), contracted in the cheapest order whose
    intermediates stay within the larger of X and dY (contract.py), plus the mean's part. X is never
    rebuilt in full, and every intermediate depends on dY, so nothing large is computed in forward and kept.

    A depthwise (or any) conv whose network costs more than rebuilding X~ from the core and factors and
    running onnxruntime's own ConvGrad on it gets that instead: X~ exists in backward only, one layer at
    a time. Returns (MACs, largest intermediate in elements)."""
    layer, base = plan.layer, f"{plan.layer.node}.asi.dW"
    g = layer.geometry
    assert g is not None
    channels, out = layer.x_shape[1], layer.y_shape[1]
    og, cg = out // g.group, channels // g.group
    roles, sizes, output_indices, core_shape = _conv_network(plan)
    limit = max(math.prod(layer.x_shape), math.prod(layer.y_shape))
    dry = [contract.Operand(role, indices) for role, indices in roles]
    _, network_macs, _ = contract.contract(dry, sizes, output_indices, limit, lambda a, b, eq, step: step)
    if mean is not None:
        network_macs += layer.y_shape[0] * out * math.prod(layer.y_shape[2:]) + math.prod(layer.w_shape) * math.prod(layer.y_shape[2:])
    rebuild_macs = reconstruction_macs(plan) + conv_dw_macs(layer)
    if rebuild_macs < network_macs:
        rebuilt = reconstruct(nodes, plan, _after(nodes, core, _dy_zero(nodes, dy, f"{base}.gate"), f"{base}.S_gated"), mean,
                              f"{plan.layer.node}.asi.X")
        attributes = {a.name: helper.get_attribute_value(a) for a in grad_node.attribute}
        attributes.update(pads=list(g.pads), auto_pad="NOTSET", kernel_shape=list(g.kernel), strides=list(g.stride),
                          dilations=list(g.dilation), group=g.group)
        nodes.editor.node("ConvGrad", [dy, rebuilt, layer.weight], f"{base}.ConvGrad", **attributes)
        built = nodes.editor.last_node()
        built.domain = grad_node.domain
        del built.output[:]
        built.output.extend(["", output])
        return rebuild_macs, math.prod(layer.x_shape)
    tensors = {"dY": nodes.op("Reshape", [dy, nodes.ints(f"{base}.dY_shape", [0, g.group, og, layer.y_shape[2], layer.y_shape[3]])], f"{base}.dY"),
               "S": core}
    if 0 in plan.active:
        tensors["U0"] = plan.factor(0)
    if 1 in plan.active:
        tensors["U1"] = nodes.op("Reshape", [plan.factor(1), nodes.ints(f"{base}.U1_shape", [g.group, cg, plan.ranks[1]])], f"{base}.U1")
    else:
        tensors["S"] = nodes.op("Reshape", [core, nodes.ints(f"{base}.S_shape", core_shape)], f"{base}.S")
    for mode in (2, 3):
        role = f"W{mode}"
        if any(r == role for r, _ in roles):
            size = plan.ranks[mode] if mode in plan.active else layer.x_shape[mode]
            tensors[role] = nodes.op("Reshape", [_shifted_factor(nodes, plan, mode, base),
                                                 nodes.ints(f"{base}.W{mode}_shape", [g.kernel[mode - 2], layer.y_shape[mode], size])], f"{base}.W{mode}")
    zero = _dy_zero(nodes, dy, f"{base}.gate")
    operands = [contract.Operand(tensors[role] if role == "dY" else _after(nodes, tensors[role], zero, f"{base}.{role}_gated"), indices)
                for role, indices in roles]
    grad, macs, largest = contract.contract(operands, sizes, output_indices, limit, _einsum(nodes, base))
    if mean is None:
        nodes.op("Reshape", [grad, nodes.ints(f"{base}.dW_shape", [out, cg, *g.kernel])], f"{base}.dW", output=output)
        return macs, largest
    centred = nodes.op("Reshape", [grad, nodes.ints(f"{base}.dW_shape", [out, cg, *g.kernel])], f"{base}.dWc")
    mean_grad, mean_macs = conv_mean_weight_grad(nodes, plan, mean, dy)
    nodes.op("Add", [centred, mean_grad], f"{base}.dW", output=output)
    return macs + mean_macs, largest


def _dy_zero(nodes: Nodes, dy: str, base: str) -> str:
    """A float zero computed from dY's values (x > x is false even for NaN): adding it to a tensor makes every
    node that reads the sum part of backward, so onnxruntime cannot run it during forward and keep its output
    (a contraction of the core with a factor would otherwise be computed in forward and held until backward)."""
    first = nodes.op("Slice", [nodes.op("Reshape", [dy, nodes.ints(f"{base}.flat", [-1])], f"{base}.dY"),
                               nodes.ints(f"{base}.start", [0]), nodes.ints(f"{base}.end", [1])], f"{base}.first")
    return nodes.op("Cast", [nodes.op("Greater", [first, first], f"{base}.false")], f"{base}.zero", to=TensorProto.FLOAT)


def _after(nodes: Nodes, tensor: str, zero: str, base: str) -> str:
    return nodes.op("Add", [tensor, zero], base)


def reconstruct(nodes: Nodes, plan: Plan, core: str, mean: str | None, base: str) -> str:
    """X~ = S x_m U'_m (+ the mean), expanding the modes in reverse compression order: for backward only."""
    layer = plan.layer
    dims = DIMS[: len(layer.x_shape)]
    term = "".join(RANKS[m] if m in plan.active else d for m, d in enumerate(dims))
    tensor = core
    for mode in reversed(tucker.mode_order(len(dims), layer.channel_axis)):
        if mode in plan.active:
            wider = _replace_letter(term, RANKS[mode], dims[mode])
            tensor = nodes.op("Einsum", [tensor, plan.factor(mode)], f"{base}.R{mode}", equation=f"{term},{dims[mode]}{RANKS[mode]}->{wider}")
            term = wider
    if mean is not None:
        tensor = nodes.op("Add", [tensor, mean], f"{base}.R")
    return tensor


def asi_linear_weight_grad(nodes: Nodes, plan: Plan, core: str, term: str, dy: str, output: str,
                           mean: str | None = None) -> tuple[int, int]:
    """dW[i,o] = sum over the leading modes of X~[..., i] dY[..., o], X~ = S x_m U_m: the network of dY, the
    core and the factors, contracted in the cheapest order (contract.py); transposed for Gemm `transB`,
    scaled by `alpha`. Returns (MACs, largest intermediate in elements)."""
    layer, base = plan.layer, f"{plan.layer.node}.asi.dW"
    rank = len(layer.x_shape)
    dims, last = DIMS[:rank], rank - 1
    sizes = {"o": layer.y_shape[-1], **{dims[m]: d for m, d in enumerate(layer.x_shape)}}
    zero = _dy_zero(nodes, dy, f"{base}.gate")
    operands = [contract.Operand(dy, dims[:last] + "o"), contract.Operand(_after(nodes, core, zero, f"{base}.S_gated"), term)]
    for mode in plan.active:
        sizes[RANKS[mode]] = plan.ranks[mode]
        operands.append(contract.Operand(_after(nodes, plan.factor(mode), zero, f"{base}.U{mode}_gated"), dims[mode] + RANKS[mode]))
    final = ("o" + dims[last]) if layer.op_type == "Gemm" and layer.trans_b else (dims[last] + "o")
    scale = layer.alpha if layer.op_type == "Gemm" else 1.0
    limit = max(math.prod(layer.x_shape), math.prod(layer.y_shape))
    grad, macs, largest = contract.contract(operands, sizes, final, limit, _einsum(nodes, base))
    if mean is not None:  # the mean part: mu[i] times dY summed over the leading axes
        rows = nodes.op("ReduceSum", [dy, nodes.ints(f"{base}.lead_axes", list(range(last)))], f"{base}.dYsum", keepdims=0)
        mu = nodes.op("Reshape", [mean, nodes.ints(f"{base}.mu_shape", [layer.x_shape[last]])], f"{base}.mu")
        pair = (rows, mu) if final[0] == "o" else (mu, rows)
        outer = nodes.op("Einsum", list(pair), f"{base}.dWmean", equation=f"{final[0]},{final[1]}->{final}")
        grad = nodes.op("Add", [grad, outer], f"{base}.sum")
        macs += math.prod(layer.y_shape) + layer.x_shape[last] * layer.y_shape[-1]
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
        core, term, powers, mean, forward_macs = asi_forward(nodes, plan)
        core_shape = tuple(k if m in plan.active else d for m, (d, k) in enumerate(zip(layer.x_shape, plan.ranks)))
        stored[core] = core_shape
        if mean is not None:
            stored[mean] = tuple(d if a == layer.channel_axis else 1 for a, d in enumerate(layer.x_shape))
        for mode in plan.active:
            dim: int | str = "batch" if mode == 0 else layer.x_shape[mode]
            inputs.append(helper.make_tensor_value_info(plan.factor_input(mode), TensorProto.FLOAT, [dim, plan.ranks[mode]]))
            outputs.append(helper.make_tensor_value_info(powers[mode], TensorProto.FLOAT, [dim, plan.ranks[mode]]))
            stored[plan.factor(mode)] = (layer.x_shape[mode], plan.ranks[mode])
        compressed = core
    else:
        powers, mean = {}, None
        compressed = filter_forward(nodes, plan)
        ho, wo = layer.y_shape[2:]
        stored[compressed] = (layer.x_shape[0], layer.x_shape[1], -(-ho // plan.patch), -(-wo // plan.patch))
        forward_macs += math.prod(layer.x_shape)
    anchored = (layer.output, _anchor(nodes, layer, [compressed, *([mean] if mean else []), *(powers.values() if plan.method == "asi" else [])]))
    forward = nodes.take()

    replacements: dict[str, list[onnx.NodeProto]] = {}
    if layer.is_conv:
        grad = _conv_grad_node(model, plan.real)
        dy = grad.input[0]
        dx, dw = grad.output[0], grad.output[1] if len(grad.output) > 1 else ""
        db = grad.output[2] if len(grad.output) > 2 else ""
        if not dw:
            raise ModelError(f"{grad.name} computes no weight gradient for {layer.weight}")
        if plan.method == "asi":
            macs, peak = asi_conv_weight_grad(nodes, plan, compressed, dy, dw, mean, grad)
        else:
            macs, peak = filter_conv_weight_grad(nodes, plan, compressed, dy, dw), 0
        if dx:
            conv_input_grad(nodes, plan.real, dy, dx)
            macs += vanilla_backward_macs(plan.real, False)
        if db:
            conv_bias_grad(nodes, layer, dy, db)
        replacements[grad.name] = nodes.take()
        vanilla = vanilla_backward_macs(plan.real, bool(dx))
    else:
        target = f"{layer.weight}_grad"
        producer = next((n for n in model.graph.node if target in n.output), None)
        dy = f"{layer.output}_grad"
        if producer is None or not any(dy in n.output for n in model.graph.node):
            raise ModelError(f"no weight gradient '{target}' or output gradient '{dy}' for {layer.node}")
        macs, peak = asi_linear_weight_grad(nodes, plan, compressed, term, dy, target, mean)
        replacements[producer.name] = nodes.take()
        needs_dx = any(f"{layer.input}_grad" in n.output for n in model.graph.node)
        vanilla = vanilla_backward_macs(layer, needs_dx)
        macs += vanilla - vanilla_backward_macs(layer, False)  # onnxruntime's own dX stays
    if plan.method == "asi":
        batch_sized = {plan.factor(0)} if 0 in plan.active else {compressed}
    else:
        batch_sized = {compressed}
    return Built(stored, macs, vanilla, forward_macs, anchored, peak, frozenset(batch_sized)), forward, replacements, inputs, outputs


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
