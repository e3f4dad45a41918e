"""Frozen-prefix caching: compute the frozen front of the model once per example, train only the rest.

When nothing before some point of the model trains, every epoch recomputes the
same prefix activations for the same examples. With a fixed training set (a
few-shot support set, no augmentation) they can be computed once: the training
model is cut where the trainable part begins, the outputs of its *prefix* (every
node that reads the data and depends on no trainable parameter) that the rest
reads (the *boundary* tensors) are cached per example, and each step feeds them
to the cut training model, which holds only the trainable suffix and the
backward pass. Evaluation keeps the folder's own eval model on the raw data.

Bit-identical training. The cut model opens with the folder's checkpoint and
optimizer and saves the same checkpoints. The cached values are computed by the
folder's own training model (with the boundary tensors as extra outputs) in a
training session like the trainer's: an inference session over the same nodes
picks other fused kernels (onnxruntime's training sessions skip some of the
full-level transforms), so its values can differ in the last bit. The cut
model's inputs carry their shapes (onnxruntime fuses an Add into the conv before
it only when it knows both operands' shapes, as it does inside the whole model).
A prefix whose output for one example depends on the others in its batch is
refused, and the first cached step is checked against the uncut model's, bit for
bit, before training starts; a model that onnxruntime rounds differently once
cut is refused with that reason.

The cache holds up to `memory_bytes` in memory; the examples beyond it go to a
file on disk (numpy memmap) that is removed with the cache.

Reduced precision (`dtype="float16"`, recipe `training.prefix_cache_dtype`). The
cache then stores its float32 tensors as float16 (half the bytes) and casts each
batch back to float32 before the cut model reads it: the models, checkpoints and
artifacts stay as they are, but the trained part sees its inputs rounded, so
training is close to the uncached run, not bit-identical. The first-step check
still compares the cut and the whole model bit for bit, on the exact (float32)
values of its examples, so it keeps proving the cut; a boundary value beyond
float16's range is refused (NotCacheable) rather than stored as infinity.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeplug import _ort
from edgeplug.data import Dataset
from edgeplug.layout import EVAL_MODEL, FORWARD_MODEL, OPTIMIZER_MODEL, TRAINING_MODEL
from edgeplug.memory_settings import DEFAULT_MEMORY, DEFAULT_PREFIX_CACHE_DTYPE, PREFIX_CACHE_DTYPES, switches

FLOAT_TYPES = frozenset({1, 10, 11, 16})  # FLOAT, FLOAT16, DOUBLE, BFLOAT16 (onnx.TensorProto)
BATCH_MIXING_OPS = frozenset({"BatchNormalization", "BatchNormInternal", "Dropout"})
"""Ops that mix the examples of a batch in training (or draw per-step random numbers). LayerNormalization normalises
each position on its own: a frozen one is cached (the per-example check and the bit-for-bit first step guard it)."""
PASS_THROUGH_SHAPE_OPS = frozenset({"Gather", "Slice", "Unsqueeze", "Squeeze", "Concat", "ConcatTraining", "Cast", "Reshape", "Identity", "Mul",
                                    "Add", "Sub", "Div"})
VIEW_OPS = frozenset({"Reshape", "Flatten", "Transpose", "Identity", "Squeeze", "Unsqueeze"})
DEFAULT_MEMORY_BYTES = 256 * 2**20
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "Gemm", "MatMul", "MatMulInteger", "QLinearMatMul",
                         "FusedMatMul", "Einsum", "LSTM", "GRU", "RNN", "Attention", "MultiHeadAttention"})
"""Ops that do multiply-accumulate work: a frozen prefix with none of them (only a Pad, a Cast, a normalisation of the
input) is not worth caching: each example's copy costs memory (a padded input is larger than the input) and the
fill runs a whole reference step, to save next to nothing per step."""


class NotCacheable(Exception):
    """Why a folder or a dataset cannot use the cache (a sentence for the user)."""


@dataclasses.dataclass(frozen=True)
class Cut:
    """The folder's training model with the frozen prefix taken out, and with the boundary as extra outputs."""

    training: Any  # onnx.ModelProto: boundary tensors (+ labels) -> loss, gradients
    augmented: Any  # onnx.ModelProto: the folder's training model that also outputs the boundary tensors
    boundary: tuple[str, ...]  # float per-example tensors the cut model reads instead of the data
    data_inputs: tuple[str, ...]
    prefix_nodes: int
    carried_specs: tuple[Mapping[str, Any], ...] = ()  # report.json's carried_state: inputs the cut model still takes

    def write(self, folder: Path) -> tuple[Path, Path]:
        """Save the cut and the augmented training models in `folder`; return their paths."""
        from edgeplug.modelio import save_model

        cut, augmented = folder / TRAINING_MODEL, folder / f"augmented_{TRAINING_MODEL}"
        save_model(self.training, cut)
        save_model(self.augmented, augmented)
        return cut, augmented


def cut_models(artifact_dir: Path, report: Mapping[str, Any], *, require_compute: bool = True) -> Cut:
    """Cut the folder's training model at the frozen prefix, or raise NotCacheable.

    `require_compute`: refuse a prefix without multiply-accumulate ops (`COMPUTE_OPS`): nothing to save.
    """
    import onnx
    from onnx import helper

    training_info = report["training"]
    if report.get("stages"):
        raise NotCacheable("staged folders train their stages one after another")
    if any(entry.get("runtime_hooks") for entry in report.get("passes", [])):
        raise NotCacheable("a pass feeds the training step from Python hooks (they read the batch)")
    carried_specs = tuple(training_info.get("carried_state") or ())
    carried_inputs = {spec["input"] for spec in carried_specs}
    if any(spec["name"] not in carried_inputs for spec in training_info.get("extra_inputs") or ()):
        raise NotCacheable("the training step takes inputs that pass hooks feed from the batch")
    # carried state changes every step: what reads it is not frozen, like what reads a trainable parameter
    trainable = set(report["parameters"]["trainable"]) | carried_inputs
    data_inputs = tuple(spec["name"] for spec in training_info["inputs"])
    training = onnx.load(str(artifact_dir / TRAINING_MODEL))
    prefix, constant = _prefix_nodes(training, trainable, data_inputs)
    if not prefix:
        raise NotCacheable("the first layer trains: there is no frozen prefix")
    if require_compute and not any(node.op_type in COMPUTE_OPS for node in training.graph.node if node.name in prefix):
        ops = sorted({node.op_type for node in training.graph.node if node.name in prefix})
        raise NotCacheable(f"the frozen prefix does no multiply-accumulate work (only {', '.join(ops[:4])}): caching it would "
                           "cost memory and save nothing")
    mixing = sorted({n.op_type for n in training.graph.node if n.name in prefix and n.op_type in BATCH_MIXING_OPS})
    if mixing:
        raise NotCacheable(f"the frozen prefix has {', '.join(mixing)}, which mixes the examples of a batch in training "
                           "(run the freeze-bn pass first)")
    types = _value_types(training)
    # constants (Gather indices, shapes) are checkpoint values, not initializers, in a training model
    forward = onnx.load(str(artifact_dir / FORWARD_MODEL), load_external_data=False)
    constants = {**_constant_values(forward), **_constant_values(training)}
    cut, boundary = _cut(training, prefix, data_inputs, types, constants, constant)
    augmented = onnx.ModelProto()
    augmented.CopyFrom(training)
    present = {value.name for value in augmented.graph.output}
    augmented.graph.output.extend(helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None)
                                  for name in boundary if name not in present)
    return Cut(cut, augmented, tuple(boundary), data_inputs, len(prefix), carried_specs)


def _prefix_nodes(model: Any, trainable: set[str], data_inputs: Sequence[str]) -> tuple[set[str], set[str]]:
    """Nodes that read the data (directly or not) and depend on no trainable parameter, and the tensors computed
    from frozen values alone.

    Prefix nodes may read such tensors (a Constant, the DequantizeLinear of an int8 weight from quantize-frozen, a
    transposed frozen weight): the nodes computing them stay in the cut model only where the trainable part reads
    them too (`_without_dead_nodes`)."""
    from edgeplug.graph import GraphIndex

    index = GraphIndex(model)
    data_dependent = index.descendants(data_inputs, float_only=False)
    trained = index.descendants(trainable, float_only=False)
    # outputs of nodes that read neither the data nor a trainable parameter (directly or not): the same every step
    moving = data_dependent | trained
    constant = {out for node in model.graph.node if node.name not in moving for out in node.output if out}
    return _recomputed_by_the_cut(model, _closed(model, data_dependent - trained, constant)), constant


def _recomputed_by_the_cut(model: Any, prefix: set[str], types: Mapping[str, int] | None = None) -> set[str]:
    """`prefix` less the nodes the trainable part reads whose data inputs it reads too, and less the view ops
    (`VIEW_OPS`) it reads: the cut model recomputes them from the tensors it receives anyway.

    The cache then holds each value once: not a second copy of a boundary tensor reshaped (a LoRA adapter's input
    as [batch * sequence, features], whose first axis is no longer the batch), nor a frozen product of one (a LoRA
    layer's base MatMul, as large as its input: recomputing it per step costs one MatMul and saves its bytes per
    example)."""
    types = types if types is not None else _value_types(model)
    while True:
        read_outside = {name for node in model.graph.node if node.name not in prefix for name in node.input}
        produced = {out for node in model.graph.node if node.name in prefix for out in node.output if out}
        moved = _value_chains_read_outside(model, prefix, read_outside, produced, types)
        for node in model.graph.node:
            if node.name not in prefix or not any(out in read_outside for out in node.output):
                continue
            data = [name for name in node.input if name in produced]
            if node.op_type in VIEW_OPS or (data and all(name in read_outside for name in data)):
                moved.add(node.name)
        if not moved:
            return prefix
        prefix -= moved


def _value_chains_read_outside(model: Any, prefix: set[str], read_outside: set[str], produced: set[str],
                               types: Mapping[str, int]) -> set[str]:
    """Prefix nodes computing a non-float tensor that the trainable part reads from values the cut model receives
    anyway (a short chain, no multiply-accumulate op): the cut model recomputes them. activation-shortcut's
    anchors are such chains (a bool from a compressed activation's first element, added to a shape so that
    onnxruntime schedules the compression early). Chains that reach a Shape stay with `_batch_shape_chains`."""
    producer = {out: node for node in model.graph.node if node.name in prefix for out in node.output if out}
    moved: set[str] = set()
    for name in sorted(read_outside & produced):
        if types.get(name, 1) in FLOAT_TYPES:
            continue
        chain: dict[str, Any] = {}
        frontier, ok = [name], True
        while frontier and ok:
            tensor = frontier.pop()
            node = producer.get(tensor)
            if node is None or node.name in chain:
                continue
            if node.op_type == "Shape" or node.op_type in COMPUTE_OPS or len(chain) >= 16:
                ok = False
                break
            chain[node.name] = node
            frontier.extend(i for i in node.input if i and i in producer and i not in read_outside)
        if ok and chain:
            moved.update(chain)
    return moved


def _closed(model: Any, prefix: set[str], constant: Iterable[str] = ()) -> set[str]:
    """`prefix` less every node that reads a tensor computed outside it (kept nodes feed nothing cut); tensors in
    `constant` (computed from frozen values alone) may be read from outside."""
    produced_outside = {out for node in model.graph.node if node.name not in prefix for out in node.output if out} - set(constant)
    changed = True
    while changed:
        changed = False
        for node in model.graph.node:
            if node.name in prefix and any(name in produced_outside for name in node.input):
                prefix.discard(node.name)
                produced_outside.update(out for out in node.output if out)
                changed = True
    return prefix


def _cut(model: Any, prefix: set[str], data_inputs: Sequence[str], types: Mapping[str, int],
         constants: Mapping[str, np.ndarray], frozen: set[str] = frozenset()) -> tuple[Any, list[str]]:  # type: ignore[assignment]
    """`model` without the prefix nodes; the float tensors it read from them become graph inputs.

    Integer tensors the rest reads from the prefix must be shape computations that
    use only the batch size of the data (e.g. Reshape(x, [Shape(input)[0], -1])):
    they are recomputed in the cut model from the batch size of a boundary tensor.
    """
    import onnx
    from onnx import helper

    kept = _without_dead_nodes([node for node in model.graph.node if node.name not in prefix],
                               {value.name for value in model.graph.output}, frozen)
    removed = {node.name: node for node in model.graph.node if node.name in prefix}
    produced_by_prefix = {out: node for node in removed.values() for out in node.output if out}
    boundary: list[str] = []
    integer: list[str] = []
    for node in kept:
        for name in node.input:
            if not name or name in boundary or name in integer:
                continue
            if name in produced_by_prefix or name in data_inputs:
                (boundary if types.get(name, 1) in FLOAT_TYPES else integer).append(name)
    if not boundary:
        raise NotCacheable("the trainable part reads no float tensor from the frozen prefix")
    outputs_from_prefix = [v.name for v in model.graph.output if v.name in produced_by_prefix]
    if outputs_from_prefix:
        raise NotCacheable(f"the model outputs '{outputs_from_prefix[0]}', computed by the frozen prefix")
    recomputed = _batch_shape_chains(integer, produced_by_prefix, data_inputs, boundary[0], constants)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.node[:]
    result.graph.node.extend([*recomputed, *kept])
    inputs = [value for value in model.graph.input if value.name not in data_inputs]
    # with their shapes: onnxruntime fuses an Add into a conv only when it knows both operands have the same shape
    shapes = _value_shapes(model)
    boundary_values = [helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), shapes.get(name))
                       for name in boundary]
    del result.graph.input[:]
    result.graph.input.extend([*boundary_values, *inputs])
    still_read = {name for node in result.graph.node for name in node.input}
    kept_values = [v for v in result.graph.value_info if v.name not in produced_by_prefix or v.name in still_read]
    del result.graph.value_info[:]
    result.graph.value_info.extend(kept_values)
    return result, boundary


def _without_dead_nodes(nodes: list[Any], graph_outputs: set[str], constant: set[str]) -> list[Any]:
    """`nodes` less those computing only `constant` tensors that no other node and no graph output reads (the
    dequantization of a frozen weight that only the cut prefix used)."""
    nodes = list(nodes)
    while True:
        read = graph_outputs | {name for node in nodes for name in node.input}
        dead = {id(node) for node in nodes if all(out in constant and out not in read for out in node.output if out)
                and any(node.output)}
        if not dead:
            return nodes
        nodes = [node for node in nodes if id(node) not in dead]


def _batch_shape_chains(integer: list[str], produced_by_prefix: Mapping[str, Any], data_inputs: Sequence[str],
                        anchor: str, constants: Mapping[str, np.ndarray]) -> list[Any]:
    """Copies of the prefix nodes computing `integer` tensors, each Shape now reading `anchor`; only when
    every such Shape is used for its first (batch) dimension alone."""
    nodes: dict[str, Any] = {}
    frontier = list(integer)
    while frontier:
        name = frontier.pop()
        node = produced_by_prefix.get(name)
        if node is None:
            if name in data_inputs:
                raise NotCacheable(f"the trainable part reads the integer data input '{name}'")
            continue
        if node.name in nodes:
            continue
        if node.op_type == "Shape":
            nodes[node.name] = node
            continue
        if node.op_type not in PASS_THROUGH_SHAPE_OPS:
            raise NotCacheable(f"the trainable part reads '{name}', computed by {node.op_type} from the data")
        nodes[node.name] = node
        frontier.extend(i for i in node.input if i)
    consumers: dict[str, list[Any]] = {}
    for node in nodes.values():
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    copies = []
    for node in nodes.values():
        if node.op_type == "Shape":
            if not _only_batch_dimension(node, consumers.get(node.output[0], []), constants):
                raise NotCacheable(f"the trainable part uses more than the batch size of a frozen tensor's shape ('{node.name}')")
            copy_node = copy.deepcopy(node)
            copy_node.input[0] = anchor
            copies.append(copy_node)
        else:
            copies.append(copy.deepcopy(node))
    order = {node.name: position for position, node in enumerate(produced_by_prefix.values())}
    return sorted(copies, key=lambda node: order.get(node.name, 0))


def _only_batch_dimension(shape: Any, consumers: Iterable[Any], constants: Mapping[str, np.ndarray]) -> bool:
    """Whether the chain reads only element 0 (the batch size) of this Shape's output."""
    from onnx import helper

    attributes = {a.name: helper.get_attribute_value(a) for a in shape.attribute}
    if attributes.get("start", 0) == 0 and attributes.get("end") == 1:
        return True
    consumers = list(consumers)
    for node in consumers:
        node_attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        index = constants.get(node.input[1]) if len(node.input) > 1 else None
        if (node.op_type == "Gather" and node_attributes.get("axis", 0) == 0 and node.input[0] == shape.output[0]
                and index is not None and index.size == 1 and int(index.reshape(())) == 0):
            continue
        return False
    return bool(consumers)


def _inferred(model: Any) -> Any:
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - contrib ops it does not know; what it found before stays in value_info
        return model


def _value_shapes(model: Any) -> dict[str, list[Any]]:
    """Shapes (dim values or names, None unknown) that shape inference finds for the model's tensors."""
    inferred = _inferred(model)
    shapes = {}
    for value in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
        if value.type.tensor_type.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                  for d in value.type.tensor_type.shape.dim]
    return shapes


def _value_types(model: Any) -> dict[str, int]:
    """Element types of the model's tensors, shape inference filling in what value_info lacks."""
    import onnx

    inferred = _inferred(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info] if v.type.tensor_type.elem_type}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    for node in model.graph.node:
        if node.op_type in ("Shape", "Size", "NonZero") and node.output:
            types.setdefault(node.output[0], onnx.TensorProto.INT64)
    return types


def _constant_values(model: Any) -> dict[str, np.ndarray]:
    from onnx import helper, numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
              if t.data_type not in FLOAT_TYPES and not t.external_data and len(t.dims) <= 1}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
                elif attribute.name in ("value_int", "value_ints"):
                    values[node.output[0]] = np.array(helper.get_attribute_value(attribute))
    return values


# -- the cache ----------------------------------------------------------------------------------------

class _Spilled:
    """One boundary tensor for every example: the first rows in memory, the rest in a file on disk.

    Stored as `stored` (float16 for a float32 tensor in a reduced-precision cache), read back as `dtype`."""

    def __init__(self, rows: int, row_shape: tuple[int, ...], dtype: np.dtype, in_memory: int, folder: Path, name: str,
                 stored: np.dtype | None = None) -> None:
        self.dtype = np.dtype(dtype)
        stored = self.dtype if stored is None else np.dtype(stored)
        self.in_memory = min(rows, in_memory)
        self.memory = np.empty((self.in_memory, *row_shape), stored)
        self.disk: np.memmap | None = None
        if rows > self.in_memory:
            path = folder / f"{len(list(folder.iterdir()))}.bin"
            self.disk = np.lib.format.open_memmap(path, mode="w+", dtype=stored, shape=(rows - self.in_memory, *row_shape))
        self.shape = (rows, *row_shape)
        self.name = name

    def put(self, start: int, values: np.ndarray) -> None:
        end = start + len(values)
        split = max(min(end, self.in_memory) - start, 0)
        if split:
            self.memory[start:start + split] = values[:split]
        if split < len(values):
            assert self.disk is not None
            self.disk[start + split - self.in_memory:end - self.in_memory] = values[split:]

    def __getitem__(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices)
        if self.disk is None:
            return self.memory[indices].astype(self.dtype, copy=False)
        result = np.empty((len(indices), *self.shape[1:]), self.dtype)
        low = indices < self.in_memory
        result[low] = self.memory[indices[low]]
        result[~low] = self.disk[indices[~low] - self.in_memory]
        return result

    @property
    def memory_bytes(self) -> int:
        return int(self.memory.nbytes)

    @property
    def disk_bytes(self) -> int:
        return 0 if self.disk is None else int(self.disk.nbytes)


@dataclasses.dataclass
class CacheStats:
    examples: int
    bytes_per_example: int
    memory_bytes: int
    disk_bytes: int
    seconds: float
    boundary: tuple[str, ...]
    prefix_nodes: int
    dtype: str = DEFAULT_PREFIX_CACHE_DTYPE
    """How float32 boundary tensors are stored: "float32" (exact) or "float16" (rounded, cast back before each step)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PrefixCache:
    """Computes the boundary tensors of datasets with the folder's training model and opens the cut model."""

    def __init__(self, cut: Cut, artifact_dir: Path, state: Path, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 folder: Path | None = None, threads: int | None = None, memory: str = DEFAULT_MEMORY,
                 dtype: str = DEFAULT_PREFIX_CACHE_DTYPE) -> None:
        if dtype not in PREFIX_CACHE_DTYPES:
            raise ValueError(f"the prefix cache's dtype must be one of {', '.join(PREFIX_CACHE_DTYPES)}, not {dtype!r}")
        self.dtype = dtype
        self.cut = cut
        self.artifact_dir = Path(artifact_dir)
        self.memory_left = memory_bytes
        self._state = state
        self._threads = threads
        self._memory = memory  # the trainer's memory setting (edgeplug.memory_settings)
        self._folder = Path(tempfile.mkdtemp(prefix="edgeplug-prefix-cache-", dir=folder))
        self._paths = cut.write(self.model_folder())
        self._augmented: Any = None
        self.stats: list[CacheStats] = []
        self._carried: dict[str, np.ndarray] = {}
        if cut.carried_specs:  # the folder's initial values: the fill and the checks feed them (the prefix reads none)
            from edgeplug.carried import load_carried_state

            self._carried = load_carried_state(None, 0, self.artifact_dir, cut.carried_specs)

    def _with_carried(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`batch` and the carried-state inputs for its size, as the trainer feeds them (`edgeplug.carried`)."""
        if not self._carried:
            return dict(batch)
        from edgeplug.carried import carried_feeds

        return {**batch, **carried_feeds(self._carried, self.cut.carried_specs, len(batch["labels"]))[0]}

    @property
    def folder(self) -> Path:
        return self._folder

    def model_folder(self) -> Path:
        folder = self._folder / "models"
        folder.mkdir(exist_ok=True)
        return folder

    def _options(self, arena: bool) -> Any:
        options = _ort.inference_runtime().SessionOptions()
        if self._threads is not None:
            options.intra_op_num_threads = self._threads
            options.inter_op_num_threads = 1
        wanted = switches(self._memory)
        options.enable_cpu_mem_arena = arena and wanted.cpu_mem_arena
        options.enable_mem_reuse = wanted.mem_reuse
        return options

    def _module(self) -> Any:
        if self._augmented is None:
            api = _ort.training_api()
            state = api.CheckpointState.load_checkpoint(str(self._state))
            # no arena: the whole model's buffers go back before the cut model trains
            module = api.Module(str(self._paths[1]), state, session_options=self._options(arena=False))
            module.train()
            self._augmented = (state, module, list(module.input_names()), list(module.output_names()))
        return self._augmented

    def run(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The boundary tensors of one batch of data (labels included), computed by the uncut training model."""
        _, module, inputs, outputs = self._module()
        batch = self._with_carried(batch)
        values = module(*[batch[name] for name in inputs])
        module.lazy_reset_grad()
        named = dict(zip(outputs, values if isinstance(values, (list, tuple)) else [values], strict=True))
        return {name: np.array(named[name], copy=True) for name in self.cut.boundary}

    def _reference_step(self, batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Loss and gradients of one step of the uncut model on `batch` (no update)."""
        state, module, inputs, _ = self._module()
        batch = self._with_carried(batch)
        values = module(*[batch[name] for name in inputs])
        grads = {name: np.array(p.grad, copy=True) for name, p in state.parameters if p.requires_grad}
        module.lazy_reset_grad()
        return np.array(values[0] if isinstance(values, (list, tuple)) else values), grads

    def _check_per_example(self, data: Dataset) -> None:
        """Refuse a prefix whose output for one example depends on the other examples of its batch."""
        if len(data) < 2:
            return
        pair = self.run(data.batch(np.arange(2)))
        singles = [self.run(data.batch(np.array([i]))) for i in range(2)]
        for name, value in pair.items():
            if value.ndim == 0 or value.shape[0] != 2:
                raise NotCacheable(f"the boundary tensor '{name}' has no batch axis first (shape {list(value.shape)})")
            if not np.array_equal(value, np.concatenate([s[name] for s in singles])):
                raise NotCacheable(f"the frozen prefix's output '{name}' for one example depends on the others in its batch")

    def _stored(self, dtype: np.dtype) -> np.dtype:
        """The storage type of a boundary tensor of `dtype`: float16 for float32 in a reduced-precision cache."""
        return np.dtype(np.float16) if self.dtype == "float16" and dtype == np.float32 else np.dtype(dtype)

    def _checked_for_storage(self, values: Mapping[str, np.ndarray]) -> None:
        """Refuse values that the storage type cannot hold (float16 overflows beyond 65504)."""
        for name, value in values.items():
            stored = self._stored(value.dtype)
            if stored == value.dtype:
                continue
            finite = np.isfinite(value)
            largest = float(np.abs(value[finite]).max()) if finite.any() else 0.0
            if largest > float(np.finfo(stored).max):
                raise NotCacheable(f"the frozen prefix's output '{name}' reaches {largest:.4g}, beyond {stored.name}'s range "
                                   f"({float(np.finfo(stored).max):.6g}): use prefix_cache_dtype float32")

    def dataset(self, data: Dataset) -> Dataset:
        """`data` with its inputs replaced by the cached boundary tensors (labels unchanged).

        One example per run of the uncut model (the fill then needs the activations of one
        example, not of a batch: boundary values do not depend on the batch, checked first);
        then one step of the cut model on the first examples is checked against the uncut
        model's, bit for bit (on their exact values when the cache stores float16), and the
        uncut session is released.
        """
        started = time.perf_counter()
        self._check_per_example(data)
        check_rows = np.arange(min(2, len(data)))
        reference = self._reference_step(data.batch(check_rows))
        exact = self.run(data.batch(check_rows)) if self.dtype != DEFAULT_PREFIX_CACHE_DTYPE else None
        total = len(data)
        arrays: dict[str, _Spilled] = {}
        spill = self._folder / f"data{len(self.stats)}"
        spill.mkdir()
        for begin in range(total):
            values = self.run(data.batch(np.array([begin])))
            self._checked_for_storage(values)
            if not arrays:
                per_example = sum(int(v[0].size) * self._stored(v.dtype).itemsize for v in values.values())
                fits = max(self.memory_left // max(per_example, 1), 0)
                arrays = {name: _Spilled(total, tuple(v.shape[1:]), v.dtype, int(fits), spill, name, self._stored(v.dtype))
                          for name, v in values.items()}
            for name, value in values.items():
                arrays[name].put(begin, value)
        self.release()
        cached = Dataset(arrays, data.labels, data.source)  # type: ignore[arg-type]  # _Spilled indexes like an array
        if exact is None:
            self._verify(cached, check_rows, *reference)
        else:  # the cut itself is checked on exact values; the rounding is what the option asks for
            self._verify(Dataset(exact, data.labels[check_rows], data.source), np.arange(len(check_rows)), *reference)
        memory = sum(a.memory_bytes for a in arrays.values())
        self.memory_left -= memory
        self.stats.append(CacheStats(total, sum(math.prod(a.shape[1:]) * a.memory.dtype.itemsize for a in arrays.values()),
                                     memory, sum(a.disk_bytes for a in arrays.values()), time.perf_counter() - started,
                                     self.cut.boundary, self.cut.prefix_nodes, self.dtype))
        return cached

    def _verify(self, cached: Dataset, rows: np.ndarray, loss: np.ndarray, grads: Mapping[str, np.ndarray]) -> None:
        """One step of the cut model on cached data must give the uncut model's loss and gradients, bit for bit."""
        api = _ort.training_api()
        state = api.CheckpointState.load_checkpoint(str(self._state))
        module = api.Module(str(self._paths[0]), state, session_options=self._options(arena=False))
        module.train()
        feed = self._with_carried(cached.batch(rows))
        values = module(*[feed[name] for name in module.input_names()])
        cut_loss = np.array(values[0] if isinstance(values, (list, tuple)) else values)
        differing = [name for name, p in state.parameters if p.requires_grad and not np.array_equal(np.asarray(p.grad), grads[name])]
        del module, state
        gc.collect()
        if not np.array_equal(cut_loss, loss) or differing:
            raise NotCacheable("onnxruntime rounds the cut model differently from the whole one "
                               f"(first step: loss {float(cut_loss):.9g} vs {float(loss):.9g}, gradients of {differing[:3]} differ)")

    def release(self) -> None:
        """Free the uncut training session (the cache is filled)."""
        self._augmented = None
        gc.collect()

    def open(self, folder: Path, state: Path) -> tuple[Any, Any, Any]:
        """The checkpoint state of `folder` (from `state`), a module on the cut training model with the folder's
        own eval model, and the folder's optimizer."""
        api = _ort.training_api()
        checkpoint = api.CheckpointState.load_checkpoint(str(state))
        module = api.Module(str(self._paths[0]), checkpoint, str(folder / EVAL_MODEL), session_options=self._options(arena=True))
        return checkpoint, module, api.Optimizer(str(folder / OPTIMIZER_MODEL), module)

    def close(self) -> None:
        self._augmented = None
        shutil.rmtree(self._folder, ignore_errors=True)
