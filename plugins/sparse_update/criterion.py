"""TinyTrain's Fisher potentials, computed with onnxruntime-training (no torch).

onnxruntime returns gradients of parameters, summed over the batch, not
per-sample gradients of activations. The probe rewrite gets them anyway: after
each candidate layer's output a (and before a conv's input) it multiplies by a
probe of ones shaped [B, C, 1, ...], one scale per sample and channel. The probes
are the only trainable parameters, so onnxruntime-training builds the gradient
graph down to the earliest probe and nothing else, and

    dLoss/dprobe[n, c] = sum_d a[n, c, d] * g[n, c, d] / B

(g = dLoss_n/da, the loss being the mean over the batch; d runs over space, or
over a sequence's positions, where padded positions add nothing: a model that
masks them gives them no gradient). The Fisher potential of
channel c is 1/(2N) sum_n (B * dLoss/dprobe[n, c])^2. Only the part of the model
after the probes is differentiated; the frozen prefix runs as plain inference
(`probe_cut`), which changes no value and most of the time.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgeplug.plugin_api import (
    CHECKPOINT,
    LOSS_TYPES,
    TRAINING_MODEL,
    Dataset,
    GraphEditor,
    GraphIndex,
    ModelError,
    TensorSpec,
    captured_native_stderr,
    clamp_ir_version,
    inference_runtime,
    inference_session,
    load_dataset,
    training_api,
    training_artifacts,
    trim_heap,
)

from .candidates import Candidate, ModelFacts
from .probe_cut import Cut, cut_at, lift_weights, tail_model


@dataclasses.dataclass(frozen=True)
class Potentials:
    """Fisher potential per channel of each candidate's output (and of a conv's input)."""

    output: Mapping[int, np.ndarray]  # candidate position -> [channels]
    input: Mapping[int, np.ndarray]  # candidate position -> [input channels], group-1 convs and linear layers only
    samples: int
    build_seconds: float  # cut + prefix session + probe rewrite of the tail + generate_artifacts
    run_seconds: float  # prefix inference + tail forward/backward over the support set
    prefix_seconds: float  # of run_seconds: the prefix's inference
    tail_nodes: int  # nodes differentiated by the probe graph
    prefix_nodes: int  # nodes run as plain inference (or not at all: not on the output's path)


def probe_model(model: onnx.ModelProto, candidates: list[Candidate], output: str, batch: int,
                ranks: Mapping[str, int], input_probes: bool = True) -> tuple[onnx.ModelProto, dict[str, tuple[int, str]]]:
    """The forward model with probes of ones; returns it and probe name -> (candidate position, 'output'/'input').

    Edits `model` in place (the caller's own copy: the probe cut's tail), so its weights are not held twice."""
    probed = model
    needed = GraphIndex(probed).ancestors([output])
    kept = [node for node in probed.graph.node if node.name in needed]
    del probed.graph.node[:]
    probed.graph.node.extend(kept)
    kept_outputs = [v for v in probed.graph.output if v.name == output]
    del probed.graph.output[:]
    probed.graph.output.extend(kept_outputs)
    editor = GraphEditor(probed)
    by_node = {c.node: c for c in candidates}
    probes: dict[str, tuple[int, str]] = {}
    nodes: list[onnx.NodeProto] = []
    inputs = {value.name for value in probed.graph.input}
    present = {node.name for node in probed.graph.node}
    for layer in candidates:
        if layer.node in present or layer.output not in inputs:
            continue
        # the layer ran in the prefix: probe its output where the tail reads it
        probe = _probe(editor, probed, f"{layer.node}.probe_out", batch, layer.channels, ranks[layer.output], layer.features_last)
        probes[probe] = (layer.position, "output")
        scaled = editor.node("Mul", [layer.output, probe], f"{layer.output}.probed")
        for node in probed.graph.node:
            node.input[:] = [scaled if name == layer.output else name for name in node.input]
        nodes.extend(editor.take_nodes())
    for node in probed.graph.node:
        candidate = by_node.get(node.name)
        if candidate is None:
            nodes.append(node)
            continue
        if candidate.probes_input and input_probes:
            probe = _probe(editor, probed, f"{node.name}.probe_in", batch, candidate.slice_channels, ranks[candidate.input],
                           candidate.features_last)
            probes[probe] = (candidate.position, "input")
            node.input[0] = editor.node("Mul", [candidate.input, probe], f"{candidate.input}.probed")
            nodes.extend(editor.take_nodes())
        nodes.append(node)
        probe = _probe(editor, probed, f"{node.name}.probe_out", batch, candidate.channels, ranks[candidate.output],
                       candidate.features_last)
        probes[probe] = (candidate.position, "output")
        raw = editor.fresh(f"{candidate.output}.unprobed")
        node.output[0] = raw
        nodes.append(onnx.helper.make_node("Mul", [raw, probe], [candidate.output], name=editor.fresh(f"{node.name}.probe_mul")))
    del probed.graph.node[:]
    probed.graph.node.extend(nodes)
    # the probes fix the batch axis; shape annotations of the old tensors stay valid
    return probed, probes


def _probe(editor: GraphEditor, model: onnx.ModelProto, base: str, batch: int, channels: int, rank: int,
           last: bool = False) -> str:
    """One scale per sample and channel: [B, C, 1, ...], or [B, 1, ..., C] when the channels are the last axis."""
    name = editor.fresh(base)
    ones = (1,) * max(rank - 2, 0)
    shape = (batch, *ones, channels) if last else (batch, channels, *ones)
    model.graph.initializer.append(numpy_helper.from_array(np.ones(shape, dtype=np.float32), name))
    return name


def fisher_potentials(facts: ModelFacts, candidates: list[Candidate], loss: str,
                      calibration: Mapping[str, np.ndarray], chunk: int, input_probes: bool = True) -> Potentials:
    """Run every support sample through the probe graph once; return the Fisher potentials.

    The prefix before the earliest probed layer runs as plain inference (`probe_cut`);
    only the tail is differentiated, in chunks of `chunk` samples. Group-1 convs are
    probed at their input too when `input_probes` (for input-channel ranking).
    """
    model, output = facts.index.model, facts.output
    ranks = {name: len(shape) for name, shape in facts.shapes.items()}
    inputs = [v for v in model.graph.input if v.name not in facts.index.initializers]
    specs = [TensorSpec(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                        [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]) for v in inputs]
    data = load_dataset(calibration, specs, loss=loss)
    total = len(data)
    batch = math.ceil(total / math.ceil(total / chunk))  # equal chunks of at most `chunk`: the least padding
    started = time.perf_counter()
    cut = cut_at(facts.index, candidates, output, facts.constants, facts.dtypes, input_probes)
    feeds, prefix_first = _tail_feeds(cut, data, batch)
    cut = dataclasses.replace(cut, prefix=None)
    del data  # the support set's raw inputs: the tail reads the prefix's outputs
    trim_heap()  # the prefix session is gone
    probed, probes = probe_model(tail_model(model, cut, output, feeds[0]), candidates, output, batch, ranks, input_probes)
    weights = lift_weights(probed, probes)
    trim_heap()
    artifacts = training_artifacts()
    with tempfile.TemporaryDirectory(prefix="edgeplug-sparse-probe-") as folder:
        with captured_native_stderr() as native_log:
            try:
                artifacts.generate_artifacts(
                    clamp_ir_version(probed), requires_grad=sorted(probes),
                    frozen_params=[t.name for t in probed.graph.initializer if t.name not in probes],
                    loss=getattr(artifacts.LossType, LOSS_TYPES[loss]), optimizer=None,
                    artifact_directory=folder, loss_input_names=[output],
                )
                # the probe graph is in the folder now: its protobufs (and generate_artifacts' copies) go before
                # the session loads it, so they do not add to the session's peak
                del probed
                trim_heap()
                api = training_api()
                state = api.CheckpointState.load_checkpoint(str(Path(folder) / CHECKPOINT))
                module = api.Module(str(Path(folder) / TRAINING_MODEL), state,  # no eval model: never evaluated
                                    session_options=_no_arena())
            except Exception as error:  # noqa: BLE001 - onnxruntime raises RuntimeError/Fail/InvalidArgument
                tail = " ".join(native_log)[-400:]
                raise ModelError(f"sparse-update: could not build the probe graph for the Fisher criterion: {error} {tail}") from None
    build_seconds = time.perf_counter() - started - prefix_first
    started = time.perf_counter()
    names = module.input_names()
    sums = {name: np.zeros(state.parameters[name].data[0].size, dtype=np.float64) for name in probes}  # [B, C, 1..] or [B, 1.., C]
    module.train()
    for begin, feed in zip(range(0, total, batch), feeds, strict=True):
        real = min(batch, total - begin)
        module.lazy_reset_grad()
        module(*[feed[name] if name in feed else weights[name] if name in weights else feed["labels"] for name in names])
        trim_heap(collect=False)  # likewise between probe steps
        for name in probes:
            grad = state.parameters[name].grad.reshape(batch, -1)[:real].astype(np.float64) * batch
            sums[name] += np.square(grad).sum(axis=0)
    run_seconds = time.perf_counter() - started + prefix_first
    fisher_out: dict[int, np.ndarray] = {}
    fisher_in: dict[int, np.ndarray] = {}
    for name, (position, where) in probes.items():
        (fisher_out if where == "output" else fisher_in)[position] = sums[name] / (2.0 * total)
    return Potentials(fisher_out, fisher_in, total, build_seconds, run_seconds, prefix_first,
                      len(cut.tail_nodes), len(model.graph.node) - len(cut.tail_nodes))


def _tail_feeds(cut: Cut, data: Dataset, batch: int) -> tuple[list[dict[str, np.ndarray]], float]:
    """What the tail reads for each chunk of `batch` samples (the boundary tensors and the labels), and the
    seconds the prefix's inference took. Every chunk's prefix outputs are computed before the tail's training
    session exists and the prefix session is gone when this returns: the probe's peak is the larger of the two
    sessions, not their sum."""
    total = len(data)
    prefix = _prefix_session(cut)
    reads = (*cut.boundary, "labels")
    timer = _Timer()
    feeds = []
    for begin in range(0, total, batch):
        rows = np.arange(begin, begin + batch) % total  # the last chunk repeats samples; their rows are ignored
        feed = data.batch(rows)
        if prefix is not None:
            with timer:
                computed = prefix.run(None, {name: feed[name] for name in cut.prefix_inputs})
            # copies: onnxruntime's arrays can be views that keep the run's whole memory-pattern block alive
            feed.update((o.name, np.array(value, copy=True)) for o, value in zip(prefix.get_outputs(), computed, strict=True))
        feeds.append({name: feed[name] for name in reads})  # not the raw inputs the prefix already read
        # each run's buffers go back before the next: freed blocks reused in pieces left the heap growing run by
        # run (147-168 MiB for the same episode after 6 chunks; about 20 ms per chunk)
        trim_heap(collect=False)
    return feeds, timer.seconds


def _prefix_session(cut: Cut) -> Any:
    """An inference session over the frozen prefix (None when the tail reads graph inputs only)."""
    if cut.prefix is None:
        return None
    return inference_session(cut.prefix, arena=False)


def _no_arena() -> Any:
    """Session options without onnxruntime's memory arena: what a probe session allocates goes back when it
    is done, instead of staying reserved in the process the fine-tuning may run in next."""
    options = inference_runtime().SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False
    return options


class _Timer:
    """Adds up the time spent inside `with timer:` blocks."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._began = 0.0

    def __enter__(self) -> None:
        self._began = time.perf_counter()

    def __exit__(self, *_: object) -> None:
        self.seconds += time.perf_counter() - self._began
