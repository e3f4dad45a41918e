"""Undo exporter habits that onnxruntime-training 1.19.2 cannot train through."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeplug.errors import ModelError
from edgeplug.graph import GraphIndex, tensor_ranks
from edgeplug.modelio import MAX_OPSET, default_opset
from edgeplug.onnx_edit import GraphEditor
from edgeplug.surgery import remove_unused


def materialize_initializer_identities(model: onnx.ModelProto) -> dict[str, str]:
    """Replace every Identity(initializer) by a copy of the initializer; return {copy: source}.

    torch.onnx.export (TorchScript, eval mode) merges initializers of equal value
    and keeps the dropped names as Identity(kept): a fresh BatchNormalization's
    running statistics become Identity(weight), every LayerNorm weight of a fresh
    transformer becomes Identity of the first one, a zero bias Identity of another
    zero bias. Training through them would tie parameters that PyTorch keeps apart.
    Parameters that PyTorch really shares are exported as one name used twice, never
    as an Identity, so every such Identity is a merge and is undone here.
    """
    index = GraphIndex(model)
    graph_outputs = {value.name for value in model.graph.output}
    copies: dict[str, str] = {}
    removed: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "Identity" or node.input[0] not in index.initializers or node.output[0] in graph_outputs:
            continue
        copy = numpy_helper.to_array(index.initializers[node.input[0]]).copy()
        model.graph.initializer.append(numpy_helper.from_array(copy, node.output[0]))
        copies[node.output[0]] = node.input[0]
        removed.add(node.name)
    if removed:
        kept = [node for node in model.graph.node if node.name not in removed]
        del model.graph.node[:]
        model.graph.node.extend(kept)
        remove_unused(model)
    return copies


def drop_unused_batchnorm_outputs(model: onnx.ModelProto) -> int:
    """Give training-mode BatchNormalization exports one output and inference mode.

    onnxruntime-training switches its eval model's BN to inference mode but keeps
    the extra running-statistics outputs, which then fail to load.
    """
    index = GraphIndex(model)
    graph_outputs = {value.name for value in model.graph.output}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or len(node.output) < 2:
            continue
        extra = [name for name in node.output[1:] if name]
        if any(index.consumers.get(name) or name in graph_outputs for name in extra):
            raise ModelError(
                f"BatchNormalization '{node.name}' exports running statistics that other nodes use; "
                "re-export the model in eval mode (model.eval() before torch.onnx.export)"
            )
        del node.output[1:]
        kept = [a for a in node.attribute if a.name != "training_mode"]
        del node.attribute[:]
        node.attribute.extend(kept)
        changed += 1
    return changed


def explicit_transpose_perms(model: onnx.ModelProto) -> int:
    """Write Transpose's default perm (reversed axes): the gradient builder needs it."""
    ranks = tensor_ranks(model)
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Transpose" or any(a.name == "perm" for a in node.attribute):
            continue
        rank = ranks.get(node.input[0])
        if rank is None:
            raise ModelError(f"Transpose '{node.name}' has no perm and its input rank is unknown; re-export with an explicit perm")
        node.attribute.append(helper.make_attribute("perm", list(reversed(range(rank)))))
        changed += 1
    return changed


def layernorm_statistics_outputs(model: onnx.ModelProto) -> int:
    """Give LayerNormalization its Mean and InvStdDev outputs: the gradient builder reads them.

    Exporters write only Y (the outputs are optional); onnxruntime-training 1.19.2
    then fails with "i < node_->OutputDefs().size() was false" while building the
    training graph.
    """
    editor = GraphEditor(model)
    changed = 0
    for node in model.graph.node:
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        outputs = list(node.output) + [""] * (3 - len(node.output))
        if all(outputs):
            continue
        for slot, suffix in ((1, "mean"), (2, "inv_std_dev")):
            outputs[slot] = outputs[slot] or editor.fresh(f"{node.output[0]}_{suffix}")
        del node.output[:]
        node.output.extend(outputs)
        changed += 1
    return changed


def cast_like_to_cast(model: onnx.ModelProto) -> int:
    """Rewrite CastLike(x, like), which has no gradient, as Cast(x, to=dtype of like).

    The dynamo exporter's unoptimised graphs (optimize=False) hold one CastLike per
    scalar it broadcasts. Needs the element type of `like` (initializer or inferred).
    """
    types = {t.name: t.data_type for t in model.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model)
    for value in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types.setdefault(value.name, value.type.tensor_type.elem_type)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            types.setdefault(node.output[0], node.attribute[0].t.data_type)
    changed = 0
    for node in model.graph.node:
        if node.op_type != "CastLike" or node.domain not in ("", "ai.onnx"):
            continue
        target = types.get(node.input[1])
        if target is None:
            raise ModelError(f"CastLike '{node.name}': the element type of '{node.input[1]}' is unknown; "
                             "re-export with the exporter's optimisation on (torch.onnx.export(..., optimize=True))")
        node.op_type = "Cast"
        del node.input[1:]
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("to", target))
        changed += 1
    return changed


def relabel_unknown_opset(model: onnx.ModelProto) -> tuple[int, int] | None:
    """Lower an opset newer than the installed onnx knows to the newest it knows; None if not needed.

    onnx's version converter stops at the opsets its release defines (22 for the
    pinned onnx 1.17). Opsets 23-25 only added ops (Attention, RMSNormalization,
    RotaryEmbedding, Swish, TensorScatter) and 4-bit, 2-bit and float8e8m0 tensor
    types to existing ops, so a model that uses neither means the same at 22. Unknown
    tensor types are refused on load; new ops are refused here, by name.
    """
    known = onnx.defs.onnx_opset_version()
    current = default_opset(model)
    if current <= known:
        return None
    unknown = sorted({node.op_type for node in model.graph.node if node.domain in ("", "ai.onnx") and not _has_schema(node.op_type, known)})
    if unknown:
        raise ModelError(
            f"opset {current} ops {', '.join(unknown)} do not exist in opset {known}, the newest the installed onnx "
            f"converts from; re-export the model with opset {MAX_OPSET} or lower"
        )
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = known
    return current, known


def _has_schema(op_type: str, version: int) -> bool:
    try:
        onnx.defs.get_schema(op_type, version, "")
    except onnx.defs.SchemaError:
        return False
    return True


def fold_initializer_shapes(model: onnx.ModelProto) -> int:
    """Replace Shape(initializer) by a Constant holding that shape.

    The dynamo exporter's unoptimised graphs (optimize=False) read every conv
    weight's shape to broadcast a zero bias; the weight then has a second consumer,
    and passes that need a weight used by its layer alone (sparse-update's channel
    split, for one) skip the layer.
    """
    initializers = {t.name: list(t.dims) for t in model.graph.initializer}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Shape" or node.domain not in ("", "ai.onnx") or node.input[0] not in initializers:
            continue
        dims = initializers[node.input[0]]
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        start, end = attributes.get("start", 0), attributes.get("end", len(dims))
        value = numpy_helper.from_array(np.array(dims[start:end], dtype=np.int64), node.output[0])
        del node.input[:]
        del node.attribute[:]
        node.op_type = "Constant"
        node.attribute.append(helper.make_attribute("value", value))
        changed += 1
    return changed



def restore_exporter_dims(model: onnx.ModelProto, hints: list[onnx.ValueInfoProto]) -> int:
    """Fill dimensions that ONNX shape inference left unknown from the exporter's own value_info.

    The dynamo exporter's unoptimised graphs build the classifier's input shape from
    the batch size at run time (Shape -> Squeeze -> Reshape -> Concat); ONNX
    inference, even with data propagation, loses it, while the exporter wrote it
    down ([batch, 64]). Passes that size layers from shapes (sparse-update's costs,
    personalize's feature slots) need it. Only unknown dimensions of tensors with
    the same element type and rank are filled. Returns the number of tensors filled.
    """
    by_name = {hint.name: hint for hint in hints if hint.type.HasField("tensor_type")}
    filled = 0
    for value in model.graph.value_info:
        hint = by_name.get(value.name)
        if hint is None or not value.type.HasField("tensor_type"):
            continue
        dims, old = value.type.tensor_type.shape.dim, hint.type.tensor_type.shape.dim
        if value.type.tensor_type.elem_type != hint.type.tensor_type.elem_type or len(dims) != len(old):
            continue
        changed = False
        for dim, known in zip(dims, old):
            unknown = not dim.dim_value and (not dim.dim_param or dim.dim_param.startswith("unk__"))
            if unknown and (known.dim_value or (known.dim_param and not known.dim_param.startswith("unk__"))):
                dim.CopyFrom(known)
                changed = True
        filled += changed
    return filled


_AUTO_PAD_OPS = ("Conv", "MaxPool", "AveragePool")


def explicit_auto_pads(model: onnx.ModelProto) -> int:
    """Turn auto_pad (SAME_UPPER, SAME_LOWER, VALID) into explicit pads on Conv and pooling.

    onnxruntime-training 1.19.2's ConvGrad ignores auto_pad: with SAME_UPPER and
    stride 2 (jax2onnx writes it) it reads pads it never set and the weight gradient
    comes out NaN in about 4 steps out of 10. Explicit pads are exact. SAME needs the
    input's spatial size; a model whose size is unknown keeps auto_pad.
    """
    shapes = _static_shapes(model)
    changed = 0
    for node in model.graph.node:
        if node.op_type not in _AUTO_PAD_OPS or node.domain not in ("", "ai.onnx"):
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        mode = attributes.get("auto_pad", b"NOTSET")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode == "NOTSET":
            continue
        kernel = attributes.get("kernel_shape") or (shapes.get(node.input[1], [])[2:] if node.op_type == "Conv" and len(node.input) > 1 else [])
        input_shape = shapes.get(node.input[0])
        if not kernel:
            continue
        spatial = len(kernel)
        if mode == "VALID":
            pads = [0] * (2 * spatial)
        else:
            if input_shape is None or len(input_shape) != spatial + 2 or any(d <= 0 for d in input_shape[2:]):
                continue
            strides = attributes.get("strides") or [1] * spatial
            dilations = attributes.get("dilations") or [1] * spatial
            heads, tails = [], []
            for size, k, stride, dilation in zip(input_shape[2:], kernel, strides, dilations):
                out = -(-size // stride)
                total = max(0, (out - 1) * stride + (k - 1) * dilation + 1 - size)
                head = total // 2 if mode == "SAME_UPPER" else total - total // 2
                heads.append(head)
                tails.append(total - head)
            pads = heads + tails
        kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.append(helper.make_attribute("pads", pads))
        changed += 1
    return changed


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Known dims of every typed value (unknown dims are -1), from shape inference on a copy."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        inferred = model
    shapes: dict[str, list[int]] = {t.name: list(t.dims) for t in model.graph.initializer}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            shapes.setdefault(value.name, [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim])
    return shapes
