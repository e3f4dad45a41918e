"""Which layers of a generated training graph can train from a compressed input, and their facts.

A layer qualifies when it is a forward Conv (2-D) / Gemm / MatMul whose weight gets a
gradient (onnxruntime-training gave it an accumulation buffer) and whose input and
output shapes are static apart from the batch axis, which is fixed to the training
batch size here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
from onnx import numpy_helper

from edgeplug.plugin_api import GraphIndex

ACCUMULATOR_SUFFIX = "_grad.accumulation.buffer"
METADATA_OPS = frozenset({"Shape", "Size"})


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """What a Conv does to its input: explicit pads (top, left, bottom, right), strides, dilations, groups."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]
    group: int


@dataclasses.dataclass(frozen=True)
class Layer:
    """A trained Conv/Gemm/MatMul of the training graph and the shapes its gradient needs."""

    node: str
    op_type: str
    input: str
    output: str
    weight: str
    x_shape: tuple[int, ...]
    y_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    geometry: ConvGeometry | None = None  # Conv only
    trans_b: bool = False  # Gemm only
    alpha: float = 1.0  # Gemm only
    unpadded: tuple[str, tuple[int, ...], tuple[int, int, int, int]] | None = None
    """Conv only: (tensor, shape, pads) when X is a zero Pad of `tensor` on the spatial axes (exporters write
    TF-style 'same' padding so): compressing that tensor, with the Pad folded into the conv's pads, gives the
    same weight gradient from (H W)/(H' W') fewer values."""

    @property
    def compressed(self) -> Layer:
        """The layer as ASI compresses it: through a zero Pad in front of it when there is one."""
        if self.unpadded is None:
            return self
        tensor, shape, extra = self.unpadded
        assert self.geometry is not None
        pads = tuple(p + q for p, q in zip(self.geometry.pads, extra))
        geometry = dataclasses.replace(self.geometry, pads=(pads[0], pads[1], pads[2], pads[3]))
        return dataclasses.replace(self, input=tensor, x_shape=shape, geometry=geometry, unpadded=None)

    @property
    def is_conv(self) -> bool:
        return self.op_type == "Conv"

    @property
    def channel_axis(self) -> int:
        """The input axis the weight contracts: channels (Conv) or features (the last axis of Gemm/MatMul)."""
        return 1 if self.is_conv else len(self.x_shape) - 1

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "op_type": self.op_type, "input": self.input, "weight": self.weight,
                "input_shape": list(self.x_shape), "output_shape": list(self.y_shape)}


def backward_nodes(model: onnx.ModelProto) -> set[str]:
    """Nodes of backward: fed by the loss's gradient seed, gradient helpers (`<node>_Grad/...`), accumulators."""
    index = GraphIndex(model)
    names = index.descendants([f"{model.graph.output[0].name}_grad"], float_only=False)
    names |= {n.name for n in model.graph.node if "_Grad/" in n.name or n.op_type == "InPlaceAccumulatorV2"}
    return names


def trained_weights(model: onnx.ModelProto) -> set[str]:
    return {value.name[: -len(ACCUMULATOR_SUFFIX)] for value in model.graph.input if value.name.endswith(ACCUMULATOR_SUFFIX)}


def backward_readers(model: onnx.ModelProto, tensor: str, backward: set[str] | None = None) -> list[str]:
    """Backward nodes that read the values of `tensor` (Shape/Size read metadata only)."""
    backward = backward_nodes(model) if backward is None else backward
    return [n.name for n in model.graph.node if n.name in backward and n.op_type not in METADATA_OPS and tensor in n.input]


def conv_geometry(node: onnx.NodeProto, x_shape: Sequence[int], w_shape: Sequence[int]) -> ConvGeometry:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    kernel = tuple(int(k) for k in attrs.get("kernel_shape", w_shape[2:]))
    stride = tuple(int(s) for s in attrs.get("strides", (1, 1)))
    dilation = tuple(int(d) for d in attrs.get("dilations", (1, 1)))
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("NOTSET", ""):
        raw = [int(p) for p in attrs.get("pads", (0, 0, 0, 0))]
        pads = (raw[0], raw[1], raw[2], raw[3])
    elif auto_pad == "VALID":
        pads = (0, 0, 0, 0)
    else:
        begin, end = [], []
        for axis in range(2):
            size = int(x_shape[2 + axis])
            out = -(-size // stride[axis])
            total = max(0, (out - 1) * stride[axis] + (kernel[axis] - 1) * dilation[axis] + 1 - size)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        pads = (begin[0], begin[1], end[0], end[1])
    return ConvGeometry((kernel[0], kernel[1]), (stride[0], stride[1]), (dilation[0], dilation[1]), pads, int(attrs.get("group", 1)))


def find_layers(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], op_types: Sequence[str]) -> tuple[list[Layer], list[dict[str, str]]]:
    """Trained weight layers in forward order, and the ones that cannot be compressed, with why."""
    backward = backward_nodes(model)
    trained = trained_weights(model)
    uses: dict[str, int] = {}
    for node in model.graph.node:
        if node.name not in backward:
            for name in node.input:
                uses[name] = uses.get(name, 0) + 1
    producers = {out: node for node in model.graph.node if node.name not in backward for out in node.output}
    layers, skipped = [], []
    for node in model.graph.node:
        if node.name in backward or node.op_type not in op_types or len(node.input) < 2 or node.input[1] not in trained:
            continue
        x, w, y = node.input[0], node.input[1], node.output[0]
        reason = _unsupported(node, shapes, uses)
        if reason:
            skipped.append({"node": node.name, "reason": reason})
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        layer = Layer(node.name, node.op_type, x, y, w, shapes[x], shapes[y], shapes[w],
                      geometry=conv_geometry(node, shapes[x], shapes[w]) if node.op_type == "Conv" else None,
                      trans_b=bool(attrs.get("transB", 0)), alpha=float(attrs.get("alpha", 1.0)),
                      unpadded=_zero_pad_source(model, producers.get(x), shapes) if node.op_type == "Conv" else None)
        layers.append(layer)
    return layers, skipped


def _zero_pad_source(model: onnx.ModelProto, pad: onnx.NodeProto | None, shapes: Mapping[str, tuple[int, ...]]
                     ) -> tuple[str, tuple[int, ...], tuple[int, int, int, int]] | None:
    """(source, its shape, (top, left, bottom, right)) when `pad` zero-pads a 4-D tensor on its spatial axes only."""
    if pad is None or pad.op_type != "Pad" or pad.domain not in ("", "ai.onnx") or pad.input[0] not in shapes:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in pad.attribute}
    mode = attrs.get("mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else str(mode)) != "constant":
        return None
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in pad.input[1:]}
    for node in model.graph.node:  # Constant nodes the training graph kept
        if node.op_type == "Constant" and node.output[0] in pad.input[1:] and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    if "pads" in attrs:
        pads = [int(v) for v in attrs["pads"]]
        value = float(attrs.get("value", 0.0))
    else:
        if len(pad.input) < 2 or pad.input[1] not in constants or (len(pad.input) > 3 and pad.input[3]):
            return None  # pads computed at run time, or an axes input
        pads = [int(v) for v in constants[pad.input[1]].ravel()]
        value = float(constants[pad.input[2]].ravel()[0]) if len(pad.input) > 2 and pad.input[2] in constants else 0.0
        if len(pad.input) > 2 and pad.input[2] and pad.input[2] not in constants:
            return None
    source = pad.input[0]
    if value != 0.0 or len(pads) != 8 or len(shapes[source]) != 4 or any(pads[a] or pads[a + 4] for a in (0, 1)) or min(pads) < 0:
        return None
    return source, shapes[source], (pads[2], pads[3], pads[6], pads[7])


def _unsupported(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]], uses: Mapping[str, int]) -> str | None:
    x, w, y = node.input[0], node.input[1], node.output[0]
    if any(name not in shapes for name in (x, w, y)):
        return "input/output shapes are not static apart from the batch axis"
    if uses.get(w, 0) > 1:
        return "the weight is shared by several nodes"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv" and len(shapes[x]) != 4:
        return f"only 2-D convolutions are supported (input rank {len(shapes[x])})"
    if node.op_type == "Gemm" and attrs.get("transA", 0):
        return "Gemm with transA=1 is not supported"
    if node.op_type == "MatMul" and (len(shapes[w]) != 2 or not 2 <= len(shapes[x]) <= 4):
        return "MatMul needs a 2-D weight as second input and an input of rank 2 to 4"
    return None


def select(layers: list[Layer], options: Mapping[str, Any]) -> list[Layer]:
    """Apply the recipe's `include` / `exclude` patterns (node or weight names) and `last`."""
    chosen = layers
    include = options.get("include")
    if include:
        chosen = [la for la in chosen if any(fnmatch.fnmatchcase(la.node, p) or fnmatch.fnmatchcase(la.weight, p) for p in include)]
    exclude = options.get("exclude") or []
    chosen = [la for la in chosen if not any(fnmatch.fnmatchcase(la.node, p) or fnmatch.fnmatchcase(la.weight, p) for p in exclude)]
    last = options.get("last")
    if last is not None:
        chosen = chosen[-int(last):]
    return chosen
