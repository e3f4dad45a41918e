"""Find the classifier head of a model, and put a new one of another width in its place.

The head is the Gemm, MatMul (with the Add of its bias) or 1x1 Conv that computes the
trained output, reached from the output through ops that neither mix classes nor
depend on their number (reshapes, averaging over positions, dropout). Only such a
head can be replaced by one of another width without touching anything after it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import numpy_helper

from edgeplug.plugin_api import FLOAT_TYPES, GraphEditor, GraphIndex, ModelError, RecipeError

HEAD_OPS = ("Gemm", "MatMul", "Conv")
# Ops allowed between the head and the output: they keep each class's logit apart and
# (apart from a constant Reshape target, which is resized) do not depend on the class count.
TAIL_OPS = frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "GlobalAveragePool", "ReduceMean", "Dropout"})


@dataclasses.dataclass(frozen=True)
class Head:
    """The classifier node and what replacing it touches."""

    node: onnx.NodeProto
    weight: str
    bias: str | None  # Gemm/Conv input 2, or the initializer a MatMul's bias Add adds
    bias_add: onnx.NodeProto | None  # MatMul only: the Add of the bias
    features: str  # the head's input: the penultimate features
    feature_axis: int  # axis of `features` that holds the features (1 for Conv, last for Gemm/MatMul)
    in_features: int
    classes: int
    tail: tuple[onnx.NodeProto, ...]  # from the head (or its bias Add) to the output

    @property
    def output(self) -> str:
        """The tensor the head (with its bias Add) produces."""
        return (self.bias_add or self.node).output[0]


def find_head(model: onnx.ModelProto, output: str, node_name: str | None = None) -> Head:
    """The head that computes `output`, or the node named `node_name`; ModelError/RecipeError if none fits."""
    index = GraphIndex(model)
    if node_name is not None:
        node = next((n for n in model.graph.node if n.name == node_name), None)
        if node is None:
            raise RecipeError(f"option node: the model has no node named {node_name!r}")
        if node.name not in index.ancestors([output]):
            raise RecipeError(f"option node: node {node_name!r} does not feed the output {output!r}")
        return _head(index, node, bias_add=_bias_add_after(index, node), tail=())
    tail: list[onnx.NodeProto] = []
    tensor = output
    while True:
        node = index.producer.get(tensor)
        if node is None:
            raise ModelError(f"the output {output!r} is not computed by a Gemm/MatMul/1x1 Conv head (it is a graph input or an initializer)")
        if node.op_type in HEAD_OPS:
            return _head(index, node, bias_add=None, tail=tuple(reversed(tail)))
        if node.op_type == "Add":
            source = _bias_add_source(index, node)
            if source is not None and source.op_type == "MatMul":
                return _head(index, source, bias_add=node, tail=tuple(reversed(tail)))
        if node.op_type not in TAIL_OPS:
            chain = " -> ".join(f"{n.op_type} '{n.name}'" for n in [node, *reversed(tail)])
            source = index.producer.get(node.input[0]) if node.input else None
            fed = f" (fed by {source.op_type} '{source.name}')" if source is not None else ""
            raise ModelError(
                f"the output {output!r} is not computed by a Gemm/MatMul/1x1 Conv head: it comes from {chain}{fed}; only "
                f"reshapes, averaging and dropout may follow the head. Name the head with the option 'node', or "
                f"choose the logits output with the recipe's 'output'")
        tail.append(node)
        tensor = node.input[0]


def _bias_add_source(index: GraphIndex, add: onnx.NodeProto) -> onnx.NodeProto | None:
    """The node whose output an Add adds a constant bias to, if it is one."""
    if len(add.input) != 2:
        return None
    constant = [name in index.initializers for name in add.input]
    if constant.count(True) != 1:
        return None
    return index.producer.get(add.input[constant.index(False)])


def _bias_add_after(index: GraphIndex, node: onnx.NodeProto) -> onnx.NodeProto | None:
    if node.op_type != "MatMul":
        return None
    consumers = index.consumers.get(node.output[0], [])
    if len(consumers) == 1 and consumers[0][0].op_type == "Add" and _bias_add_source(index, consumers[0][0]) is node:
        return consumers[0][0]
    return None


def _head(index: GraphIndex, node: onnx.NodeProto, *, bias_add: onnx.NodeProto | None, tail: tuple[onnx.NodeProto, ...]) -> Head:
    where = f"{node.op_type} '{node.name}'"
    if node.op_type not in HEAD_OPS:
        raise RecipeError(f"option node: {where} is not a Gemm, MatMul or Conv")
    if len(node.input) < 2 or node.input[1] not in index.initializers:
        raise ModelError(f"the head {where} takes its weight from another node, not from an initializer; "
                         "new-head replaces float weight initializers only")
    weight = index.initializers[node.input[1]]
    if weight.data_type not in FLOAT_TYPES:
        raise ModelError(f"the head {where} has a {onnx.TensorProto.DataType.Name(weight.data_type)} weight; "
                         "new-head replaces float weights only (quantize after new-head)")
    dims = [int(d) for d in weight.dims]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    bias: str | None = None
    if node.op_type == "Gemm":
        if len(dims) != 2:
            raise ModelError(f"the head {where} has a weight of shape {dims}, expected 2 dimensions")
        classes, in_features = (dims[0], dims[1]) if attributes.get("transB", 0) else (dims[1], dims[0])
        feature_axis = 0 if attributes.get("transA", 0) else 1
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    elif node.op_type == "MatMul":
        if len(dims) != 2:
            raise ModelError(f"the head {where} multiplies by a weight of shape {dims}; new-head needs a 2-D weight [features, classes]")
        in_features, classes = dims
        feature_axis = -1
        if bias_add is not None:
            bias = next(name for name in bias_add.input if name in index.initializers)
    else:
        if len(dims) < 3 or any(d != 1 for d in dims[2:]) or attributes.get("group", 1) != 1:
            raise ModelError(f"the head {where} is not a 1x1 convolution without groups (weight {dims}); "
                             "new-head replaces only 1x1 Conv heads")
        classes, in_features = dims[0], dims[1]
        feature_axis = 1
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None:
        if bias not in index.initializers:
            raise ModelError(f"the head {where} takes its bias from another node, not from an initializer")
        if int(np.prod(index.initializers[bias].dims)) not in (1, classes):
            raise ModelError(f"the head {where} has a bias of shape {list(index.initializers[bias].dims)}; expected {classes} values")
    return Head(node, node.input[1], bias, bias_add, node.input[0], feature_axis, in_features, classes, tail)


@dataclasses.dataclass(frozen=True)
class Replaced:
    """Names of the new head's parameters and what else changed."""

    weight: str
    bias: str
    bias_added: bool
    reshapes_resized: int


def replace_head(model: onnx.ModelProto, head: Head, weight: np.ndarray, bias: np.ndarray) -> tuple[onnx.ModelProto, Replaced]:
    """A copy of `model` whose head computes `features @ weight.T + bias` (weight [classes, in_features]).

    The new parameters keep the old names when nothing else uses them (so recipes' name
    patterns still match), the weight keeps the old layout (transB, [in, out] for MatMul,
    [out, in, 1, 1] for Conv), and the shapes after the head are inferred anew.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    index = GraphIndex(result)
    editor = GraphEditor(result)
    node = next(n for n in graph.node if n.name == head.node.name)
    old = index.initializers[head.weight]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(old.data_type)
    classes = weight.shape[0]
    if node.op_type == "Gemm":
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        layout = weight if attributes.get("transB", 0) else weight.T
        _set_attributes(node, alpha=1.0, beta=1.0)
    elif node.op_type == "MatMul":
        layout = weight.T
    else:
        layout = weight.reshape(classes, head.in_features, *[1] * (len(old.dims) - 2))

    def own_name(name: str) -> str:
        """The old name when the head is its only user, else a fresh one."""
        users = {user.name for user, _ in index.consumers.get(name, [])}
        return name if users <= {node.name, *( [head.bias_add.name] if head.bias_add is not None else [])} else editor.fresh(f"{name}.new_head")

    weight_name = own_name(head.weight)
    node.input[1] = weight_name
    bias_added = head.bias is None
    if node.op_type == "MatMul":
        if head.bias_add is not None and head.bias is not None:
            bias_name = own_name(head.bias)
            add = next(n for n in graph.node if n.name == head.bias_add.name)
            add.input[list(add.input).index(head.bias)] = bias_name
        else:
            bias_name = editor.fresh(f"{head.weight}.bias" if not head.weight.endswith(".weight") else head.weight[: -len("weight")] + "bias")
            raw = editor.fresh(f"{node.output[0]}.no_bias")
            add = onnx.helper.make_node("Add", [raw, bias_name], [node.output[0]], name=editor.fresh(f"{node.name}.bias_add"))
            node.output[0] = raw
            position = list(graph.node).index(node)
            graph.node.insert(position + 1, add)
    else:
        if head.bias is not None:
            bias_name = own_name(head.bias)
        else:
            bias_name = editor.fresh(head.weight[: -len("weight")] + "bias" if head.weight.endswith(".weight") else f"{head.weight}.bias")
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = bias_name
    _drop_initializers(result, [name for name in (head.weight, head.bias) if name], {weight_name, bias_name})
    graph.initializer.extend([
        numpy_helper.from_array(np.ascontiguousarray(layout, dtype=dtype), weight_name),
        numpy_helper.from_array(np.ascontiguousarray(bias.reshape(classes), dtype=dtype), bias_name),
    ])
    resized = _resize_reshapes(result, head, classes)
    _refresh_shapes(result, node.name, head.classes, classes)
    return result, Replaced(weight_name, bias_name, bias_added, resized)


def _set_attributes(node: onnx.NodeProto, **values: float) -> None:
    kept = [a for a in node.attribute if a.name not in values]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.extend(onnx.helper.make_attribute(name, value) for name, value in values.items())


def _drop_initializers(model: onnx.ModelProto, names: list[str], reused: set[str]) -> None:
    """Remove the old head's initializers: those whose name the new head reuses, and those no node uses any more
    (with their graph inputs, for old IR versions)."""
    used = {name for n in model.graph.node for name in n.input}
    gone = {name for name in names if name in reused or name not in used}
    kept = [t for t in model.graph.initializer if t.name not in gone]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    inputs = [v for v in model.graph.input if v.name not in gone]
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def _resize_reshapes(model: onnx.ModelProto, head: Head, classes: int) -> int:
    """Reshapes after the head whose constant target names the old class count get the new one."""
    if classes == head.classes:
        return 0
    tail_names = {n.name for n in head.tail}
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    resized = 0
    for node in model.graph.node:
        if node.name not in tail_names or node.op_type != "Reshape" or len(node.input) < 2:
            continue
        name = node.input[1]
        if name in initializers:
            shape = numpy_helper.to_array(initializers[name])
        elif name in producers and producers[name].op_type == "Constant":
            shape = numpy_helper.to_array(producers[name].attribute[0].t)
        else:
            continue  # computed at run time (Shape chains): follows the new width by itself
        if head.classes not in shape.tolist():
            continue
        if shape.tolist().count(head.classes) > 1:
            raise ModelError(f"Reshape '{node.name}' after the head has the target {shape.tolist()}, which names the "
                             f"class count {head.classes} more than once; new-head cannot tell which axis holds the classes")
        new_name = GraphEditor(model).fresh(f"{name}.new_head")
        new_shape = np.where(shape == head.classes, classes, shape).astype(shape.dtype)
        model.graph.initializer.append(numpy_helper.from_array(new_shape, new_name))
        node.input[1] = new_name
        resized += 1
    return resized


def _refresh_shapes(model: onnx.ModelProto, head_name: str, old_classes: int, classes: int) -> None:
    """Forget the recorded shapes from the head on and infer them again (graph outputs included)."""
    index = GraphIndex(model)
    head = next(n for n in model.graph.node if n.name == head_name)
    starts = [o for o in head.output if o]
    reached = index.descendants(starts, float_only=False)
    after = set(starts) | {o for n in model.graph.node if n.name in reached for o in n.output if o}
    kept = [v for v in model.graph.value_info if v.name not in after]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    outputs = {v.name: v for v in model.graph.output if v.name in after}
    recorded = {name: onnx.TensorShapeProto() for name in outputs}
    for name, value in outputs.items():
        recorded[name].CopyFrom(value.type.tensor_type.shape)
        value.type.tensor_type.ClearField("shape")
    try:
        inferred: onnx.ModelProto | None = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        inferred = None
    found = {v.name: v for v in inferred.graph.output} if inferred is not None else {}
    if inferred is not None:
        model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name in after)
    for name, value in outputs.items():
        guess = found.get(name)
        if guess is not None and guess.type.tensor_type.HasField("shape") and len(guess.type.tensor_type.shape.dim):
            value.type.tensor_type.shape.CopyFrom(guess.type.tensor_type.shape)
            # keep the exporter's symbolic names (batch) where inference found none
            for dim, old in zip(value.type.tensor_type.shape.dim, recorded[name].dim, strict=False):
                if not dim.HasField("dim_value") and not dim.dim_param and old.dim_param:
                    dim.dim_param = old.dim_param
            continue
        value.type.tensor_type.shape.CopyFrom(recorded[name])
        dims = value.type.tensor_type.shape.dim
        if len(dims) and dims[len(dims) - 1].HasField("dim_value") and dims[len(dims) - 1].dim_value == old_classes:
            dims[len(dims) - 1].dim_value = classes
