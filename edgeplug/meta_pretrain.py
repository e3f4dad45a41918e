"""Cloud-side episodic meta-training of a backbone (ProtoNet-style), with onnxruntime-training only.

TinyTrain (and PMF before it) meta-trains the pretrained backbone on few-shot episodes from
source domains before any device sees it: the features then suit the prototype head that
each device task starts from. This module does that to any ONNX classifier without torch:

- the model is cut at its classifier's input (the penultimate features) and given, inside the
  graph, the `new-head` pass's prototype head computed from the episode's support set
  (cosine to the normalised mean of the centred, normalised support features, times
  `scale` / the support set's mean centred norm); the logits of the episode's query set go
  to a cross-entropy loss. The gradient flows through the query features and through the
  prototypes (exact ProtoNet loss, not a first-order approximation);
- every float parameter of the backbone trains (AdamW or SGD); one episode per optimizer
  step (or `steps_per_episode`), the weights carried from episode to episode;
- the export is the original model (its own classifier untouched) with the meta-trained
  backbone weights, so every pass and recipe works on it as on the original.

Episodes come from labelled source data (.npz: images under the model input's name or `x`,
integer labels `y`, optionally integer `domain`): pick a domain, then `ways` of its classes,
then `shots` support and `queries` query examples of each.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeplug import _ort
from edgeplug.errors import DataError, EdgeplugError, ModelError
from edgeplug.graph import GraphIndex, ensure_node_names

log = logging.getLogger(__name__)

HEAD_OPS = ("Gemm", "MatMul")
TAIL_OPS = frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Softmax", "LogSoftmax"})
SUPPORT_MEAN, CLASS_AVERAGE, QUERY_SELECT, LOGITS, LABELS = "support_mean", "class_average", "query_select", "episode_logits", "labels"
_EPSILON = 1e-12


@dataclasses.dataclass(frozen=True)
class MetaSettings:
    """How episodes are drawn and trained (the CLI's options)."""

    episodes: int = 200
    ways: int = 5
    shots: int = 5
    queries: int = 5
    steps_per_episode: int = 1
    learning_rate: float = 1e-4
    optimizer: str = "adamw"
    scale: float = 10.0
    seed: int = 0
    threads: int | None = None

    def check(self) -> None:
        for name in ("episodes", "shots", "queries", "steps_per_episode"):
            if getattr(self, name) < 1:
                raise EdgeplugError(f"{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.ways < 2:
            raise EdgeplugError(f"ways must be at least 2 (an episode tells classes apart), not {self.ways}")
        if not self.learning_rate > 0:
            raise EdgeplugError(f"learning-rate must be positive, not {self.learning_rate}")
        if not self.scale > 0:
            raise EdgeplugError(f"scale must be positive, not {self.scale}")
        if self.optimizer not in ("adamw", "sgd"):
            raise EdgeplugError(f"optimizer must be 'adamw' or 'sgd', not {self.optimizer!r}")


@dataclasses.dataclass(frozen=True)
class SourceData:
    """Labelled source examples; `domain` groups the classes an episode may mix."""

    x: np.ndarray
    y: np.ndarray
    domain: np.ndarray

    def episode_classes(self, needed: int) -> dict[int, list[int]]:
        """domain -> its classes with at least `needed` examples, for domains with two such classes or more."""
        usable: dict[int, list[int]] = {}
        for d in np.unique(self.domain).tolist():
            labels, counts = np.unique(self.y[self.domain == d], return_counts=True)
            classes = [int(c) for c, n in zip(labels, counts, strict=True) if n >= needed]
            if len(classes) >= 2:
                usable[int(d)] = classes
        return usable


@dataclasses.dataclass
class MetaResult:
    output: str
    episodes: int
    steps: int
    trainable_parameters: int
    trainable_values: int
    seconds: float
    losses: list[float]
    query_accuracy: list[float]
    """Each episode's query accuracy under its prototype head, before that episode's update."""
    domains: list[int]
    """Each episode's domain (the data's `domain` value; 0 when it has none)."""

    def summary(self) -> dict[str, Any]:
        tenth = max(1, len(self.losses) // 10)
        return {"output": self.output, "episodes": self.episodes, "steps": self.steps,
                "trainable_parameters": self.trainable_parameters, "trainable_values": self.trainable_values,
                "seconds": round(self.seconds, 1),
                "first_tenth": {"loss": _mean(self.losses[:tenth]), "query_accuracy": _mean(self.query_accuracy[:tenth])},
                "last_tenth": {"loss": _mean(self.losses[-tenth:]), "query_accuracy": _mean(self.query_accuracy[-tenth:])},
                "losses": [round(v, 5) for v in self.losses], "query_accuracy": [round(v, 4) for v in self.query_accuracy],
                "domains": self.domains}


def _mean(values: list[float]) -> float:
    return round(float(np.mean(values)), 4) if values else float("nan")


# -- the episodic training graph ----------------------------------------------------------------------


def penultimate(model: onnx.ModelProto) -> str:
    """The classifier's input tensor: the output's producer, through reshapes and softmax, is a Gemm or
    MatMul (with its bias Add) whose weight is an initializer."""
    if len(model.graph.output) != 1:
        raise ModelError(f"meta-pretrain needs a model with one output (its logits), not {len(model.graph.output)}")
    index = GraphIndex(model)
    tensor = model.graph.output[0].name
    while True:
        node = index.producer.get(tensor)
        if node is None:
            raise ModelError(f"the output {model.graph.output[0].name!r} is not computed by a Gemm/MatMul classifier")
        if node.op_type == "Add" and len(node.input) == 2 and sum(n in index.initializers for n in node.input) == 1:
            source = index.producer.get(next(n for n in node.input if n not in index.initializers))
            if source is not None and source.op_type == "MatMul":
                node = source
        if node.op_type in HEAD_OPS:
            if len(node.input) < 2 or node.input[1] not in index.initializers:
                raise ModelError(f"the classifier {node.op_type} '{node.name}' takes its weight from another node; "
                                 "meta-pretrain needs a classifier with an initializer weight")
            if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
                raise ModelError(f"the classifier Gemm '{node.name}' transposes its input (transA); not supported")
            return node.input[0]
        if node.op_type not in TAIL_OPS:
            raise ModelError(f"the output comes from {node.op_type} '{node.name}', not from a Gemm/MatMul classifier "
                             "(only reshapes, dropout and softmax may follow it)")
        tensor = node.input[0]


def episodic_model(model: onnx.ModelProto, scale: float) -> tuple[onnx.ModelProto, list[str]]:
    """The backbone up to the penultimate features with the prototype head and its episode inputs;
    the names of its trainable parameters."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    ensure_node_names(model)
    if len(model.graph.input) - len({t.name for t in model.graph.initializer} & {i.name for i in model.graph.input}) != 1:
        raise ModelError("meta-pretrain needs a model with one data input")
    features = penultimate(model)
    index = GraphIndex(model)
    kept = index.ancestors([features])
    graph = model.graph
    nodes = [n for n in graph.node if n.name in kept]
    used = {name for n in nodes for name in n.input}
    initializers = [t for t in graph.initializer if t.name in used]
    width = _feature_width(model, features)
    dynamic = [helper.make_tensor_value_info(SUPPORT_MEAN, TensorProto.FLOAT, [1, "examples"]),
               helper.make_tensor_value_info(CLASS_AVERAGE, TensorProto.FLOAT, ["ways", "examples"]),
               helper.make_tensor_value_info(QUERY_SELECT, TensorProto.FLOAT, ["queries", "examples"])]
    data_input = next(i for i in graph.input if i.name not in {t.name for t in graph.initializer})

    def name(suffix: str) -> str:
        return f"meta_pretrain/{suffix}"

    constants = [numpy_helper.from_array(np.ones((width, 1), np.float32), name("ones")),
                 numpy_helper.from_array(np.asarray(_EPSILON, np.float32), name("epsilon")),
                 numpy_helper.from_array(np.asarray(scale, np.float32), name("scale")),
                 numpy_helper.from_array(np.asarray([0, -1], np.int64), name("flat_shape"))]
    head = [
        helper.make_node("Reshape", [features, name("flat_shape")], [name("f")], name=name("flatten")),
        helper.make_node("MatMul", [SUPPORT_MEAN, name("f")], [name("mean")], name=name("support_mean")),
        helper.make_node("Sub", [name("f"), name("mean")], [name("centred")], name=name("centre")),
        helper.make_node("Mul", [name("centred"), name("centred")], [name("centred_sq")], name=name("square")),
        helper.make_node("MatMul", [name("centred_sq"), name("ones")], [name("centred_sq_sum")], name=name("sum_sq")),
        helper.make_node("Add", [name("centred_sq_sum"), name("epsilon")], [name("centred_sq_eps")], name=name("eps")),
        helper.make_node("Sqrt", [name("centred_sq_eps")], [name("norm")], name=name("norm")),
        helper.make_node("MatMul", [SUPPORT_MEAN, name("norm")], [name("radius")], name=name("radius")),
        helper.make_node("Div", [name("centred"), name("norm")], [name("unit")], name=name("unit")),
        helper.make_node("MatMul", [CLASS_AVERAGE, name("unit")], [name("prototype")], name=name("prototype")),
        helper.make_node("Mul", [name("prototype"), name("prototype")], [name("prototype_sq")], name=name("prototype_square")),
        helper.make_node("MatMul", [name("prototype_sq"), name("ones")], [name("prototype_sq_sum")], name=name("prototype_sum_sq")),
        helper.make_node("Add", [name("prototype_sq_sum"), name("epsilon")], [name("prototype_sq_eps")], name=name("prototype_eps")),
        helper.make_node("Sqrt", [name("prototype_sq_eps")], [name("prototype_norm")], name=name("prototype_norm")),
        helper.make_node("Div", [name("prototype"), name("prototype_norm")], [name("direction")], name=name("direction")),
        helper.make_node("MatMul", [QUERY_SELECT, name("centred")], [name("query")], name=name("query")),
        helper.make_node("Transpose", [name("direction")], [name("direction_t")], name=name("transpose"), perm=[1, 0]),
        helper.make_node("MatMul", [name("query"), name("direction_t")], [name("cosine")], name=name("cosine")),
        helper.make_node("Div", [name("scale"), name("radius")], [name("temperature")], name=name("temperature")),
        helper.make_node("Mul", [name("cosine"), name("temperature")], [LOGITS], name=name("logits")),
    ]
    del graph.node[:]
    graph.node.extend(nodes + head)
    del graph.initializer[:]
    graph.initializer.extend(initializers + constants)
    del graph.input[:]
    graph.input.extend([data_input, *dynamic])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["queries", "ways"]))
    kept_values = {o for n in graph.node for o in n.output}
    values = [v for v in graph.value_info if v.name in kept_values]
    del graph.value_info[:]
    graph.value_info.extend(values)
    constant_names = {t.name for t in constants}
    trainable = [p for p in GraphIndex(model).parameters() if p not in constant_names]
    if not trainable:
        raise ModelError("the model has no float parameter before its classifier: there is no backbone to meta-train")
    return model, trainable


def _feature_width(model: onnx.ModelProto, features: str) -> int:
    """Values per example of the penultimate features (shape inference, else the classifier's weight)."""
    index = GraphIndex(model)
    for node, slot in index.consumers.get(features, []):
        if slot == 0 and node.op_type in HEAD_OPS and node.input[1] in index.initializers:
            dims = list(index.initializers[node.input[1]].dims)
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            if len(dims) == 2:
                return int(dims[1] if (node.op_type == "Gemm" and trans_b) else dims[0])
    raise ModelError(f"cannot tell the width of the penultimate features {features!r}")


# -- data and episodes ---------------------------------------------------------------------------------


def load_source(path: Path, model: onnx.ModelProto) -> SourceData:
    """The source .npz, checked against the model's data input."""
    from edgeplug.data import check_finite, load_npz

    arrays = load_npz(path)
    initializers = {t.name for t in model.graph.initializer}
    data_input = next(i for i in model.graph.input if i.name not in initializers)
    key = data_input.name if data_input.name in arrays else "x" if "x" in arrays else None
    if key is None:
        raise DataError(f"{path}: no array for the model input {data_input.name!r} (arrays: {', '.join(sorted(arrays)) or 'none'}); "
                        "name the images 'x' or after the input")
    if "y" not in arrays:
        raise DataError(f"{path}: no labels array 'y' (arrays: {', '.join(sorted(arrays))}); add one with numpy.savez(..., y=labels)")
    x, y = arrays[key], arrays["y"]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in data_input.type.tensor_type.shape.dim]
    if x.ndim != len(dims) or any(want is not None and want != got for want, got in zip(dims[1:], x.shape[1:], strict=False)):
        shown = ["N" if d is None else d for d in dims]
        raise DataError(f"{path}: array {key!r} has shape {list(x.shape)}; the model input {data_input.name!r} takes {shown}")
    if data_input.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise DataError(f"meta-pretrain feeds float32 images; the model input {data_input.name!r} is not float")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: 'y' must hold one integer label per example ({len(x)}), not {y.dtype} {list(y.shape)}")
    domain = arrays.get("domain", np.zeros(len(y), np.int64))
    if domain.ndim != 1 or len(domain) != len(x) or not np.issubdtype(domain.dtype, np.integer):
        raise DataError(f"{path}: 'domain' must hold one integer per example ({len(x)}), not {domain.dtype} {list(domain.shape)}")
    x = np.asarray(x, dtype=np.float32)
    check_finite(x, f"{path}: {key!r}")
    return SourceData(x, y.astype(np.int64), domain.astype(np.int64))


@dataclasses.dataclass(frozen=True)
class EpisodeBatch:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray
    domain: int


def sample_episode(data: SourceData, usable: Mapping[int, list[int]], settings: MetaSettings, rng: np.random.Generator) -> EpisodeBatch:
    """One episode: a domain, up to `ways` of its classes, `shots` + `queries` examples of each."""
    domains = sorted(usable)
    domain = domains[int(rng.integers(len(domains)))]
    classes = rng.permutation(usable[domain])[:settings.ways]
    support: list[int] = []
    query: list[int] = []
    for c in classes:
        members = np.flatnonzero((data.y == c) & (data.domain == domain))
        chosen = rng.choice(members, settings.shots + settings.queries, replace=False)
        support += chosen[:settings.shots].tolist()
        query += chosen[settings.shots:].tolist()
    ways, n_support, n_query = len(classes), len(support), len(query)
    total = n_support + n_query
    support_mean = np.zeros((1, total), np.float32)
    support_mean[0, :n_support] = 1.0 / n_support
    class_average = np.zeros((ways, total), np.float32)
    query_select = np.zeros((n_query, total), np.float32)
    for k in range(ways):
        class_average[k, k * settings.shots:(k + 1) * settings.shots] = 1.0 / settings.shots
    query_select[np.arange(n_query), n_support + np.arange(n_query)] = 1.0
    labels = np.repeat(np.arange(ways, dtype=np.int64), settings.queries)
    x = data.x[np.asarray(support + query)]
    return EpisodeBatch({"x": x, SUPPORT_MEAN: support_mean, CLASS_AVERAGE: class_average, QUERY_SELECT: query_select}, labels, domain)


# -- running -------------------------------------------------------------------------------------------


PROGRESS = "progress.json"


def _fingerprint(settings: MetaSettings, model_path: Path, data_path: Path) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint (episodes may grow; threads may change)."""
    import hashlib

    chosen = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("episodes", "threads")}
    digests = {}
    for label, path in (("model", model_path), ("data", data_path)):
        digest = hashlib.sha256()
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
        digests[label] = digest.hexdigest()
    return {"settings": chosen, **digests}


def _read_progress(folder: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    import json

    path = folder / PROGRESS
    if not path.is_file():
        return None
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EdgeplugError(f"{path} is unreadable ({error}); remove {folder} to start again") from None
    if progress.get("fingerprint") != fingerprint:
        raise EdgeplugError(f"{folder} holds a checkpoint of another run (different model, data or options); "
                            "remove it, or name another --checkpoint-dir")
    if not (folder / progress["state"]).is_file():
        raise EdgeplugError(f"{folder / progress['state']} is missing; remove {folder} to start again")
    return progress


def _write_progress(folder: Path, state: Any, fingerprint: dict[str, Any], episode: int, rng: np.random.Generator,
                    losses: list[float], accuracies: list[float], domains: list[int]) -> None:
    """The weights and optimizer state after `episode` episodes, then the file that points at them (atomic)."""
    import json

    from edgeplug.atomic import write_text

    api = _ort.training_api()
    folder.mkdir(parents=True, exist_ok=True)
    name = f"state-{episode}"
    partial = folder / f".{name}.partial"
    api.CheckpointState.save_checkpoint(state, str(partial), include_optimizer_state=True)
    partial.replace(folder / name)
    write_text(folder / PROGRESS, json.dumps({"fingerprint": fingerprint, "episode": episode, "state": name,
                                              "rng": rng.bit_generator.state, "losses": losses,
                                              "query_accuracy": accuracies, "domains": domains}) + "\n")
    for old in folder.glob("state-*"):
        if old.name != name:
            old.unlink()


def meta_pretrain(model_path: Path, data_path: Path, output: Path, settings: MetaSettings,
                  *, on_episode: Callable[[int, float, float], None] | None = None,
                  checkpoint_dir: Path | None = None, checkpoint_every: int = 50) -> MetaResult:
    """Meta-train `model_path`'s backbone on episodes of `data_path`; write the model with those weights to `output`.

    With `checkpoint_dir`, the weights, optimizer state and episode draws are saved there every
    `checkpoint_every` episodes, and a run started again with the same model, data and options
    resumes from the last save (the same weights as an uninterrupted run); the folder is removed
    once the output is written."""
    from edgeplug.atomic import atomic_file
    from edgeplug.generation import runtime_message
    from edgeplug.modelio import clamp_ir_version, load_model

    settings.check()
    original = load_model(model_path)
    episodic, trainable = episodic_model(original, settings.scale)
    data = load_source(data_path, original)
    usable = data.episode_classes(settings.shots + settings.queries)
    if not usable:
        raise DataError(f"{data_path}: no domain has two classes with {settings.shots} + {settings.queries} examples each "
                        "(shots + queries); lower --shots/--queries or add examples")
    originals = {t.name: t for t in original.graph.initializer}
    started = time.perf_counter()
    losses: list[float] = []
    accuracies: list[float] = []
    domains: list[int] = []
    with tempfile.TemporaryDirectory(prefix="edgeplug-meta-") as folder:
        stage = Path(folder)
        _generate(episodic, trainable, settings, stage)
        api = _ort.training_api()
        options = _ort.inference_runtime().SessionOptions()
        options.log_severity_level = 3
        if settings.threads:
            options.intra_op_num_threads = settings.threads
            options.inter_op_num_threads = 1
        fingerprint = _fingerprint(settings, Path(model_path), Path(data_path)) if checkpoint_dir else {}
        progress = _read_progress(checkpoint_dir, fingerprint) if checkpoint_dir else None
        first = 0
        if progress is not None and checkpoint_dir is not None:
            if progress["episode"] > settings.episodes:
                raise EdgeplugError(f"{checkpoint_dir} has {progress['episode']} episodes done, more than --episodes {settings.episodes}")
            state = api.CheckpointState.load_checkpoint(str(checkpoint_dir / progress["state"]))
            first = int(progress["episode"])
            losses, accuracies, domains = list(progress["losses"]), list(progress["query_accuracy"]), list(progress["domains"])
            log.info("resuming from %s: %d of %d episodes done", checkpoint_dir, first, settings.episodes)
        else:
            state = api.CheckpointState.load_checkpoint(str(stage / "checkpoint"))
        module = api.Module(str(stage / "training_model.onnx"), state, str(stage / "eval_model.onnx"), session_options=options)
        optimizer = api.Optimizer(str(stage / "optimizer_model.onnx"), module)
        optimizer.set_learning_rate(settings.learning_rate)
        input_names = module.input_names()
        rng = np.random.default_rng(settings.seed)
        if progress is not None:
            rng.bit_generator.state = progress["rng"]
        _ort.seed_random_ops(settings.seed)
        module.train()
        from edgeplug.progress import Progress

        with Progress("meta-pretrain", settings.episodes, unit="episode") as bar:
            bar.advance(first)
            for episode in range(first, settings.episodes):
                batch = sample_episode(data, usable, settings, rng)
                domains.append(batch.domain)
                feeds = {**batch.inputs, LABELS: batch.labels}
                feeds[input_names[0]] = feeds.pop("x")
                for step in range(settings.steps_per_episode):
                    try:
                        loss, logits = module(*[feeds[n] for n in input_names])
                        optimizer.step()
                    except Exception as error:
                        raise ModelError(f"meta-training step failed in onnxruntime: {runtime_message(error)}") from None
                    module.lazy_reset_grad()
                    if step == 0:
                        losses.append(float(loss))
                        accuracies.append(float((np.argmax(logits, axis=1) == batch.labels).mean()))
                if not np.isfinite(losses[-1]):
                    raise ModelError(f"the episode loss became {losses[-1]} at episode {episode + 1}; "
                                     f"lower --learning-rate (now {settings.learning_rate})")
                if on_episode is not None:
                    on_episode(episode, losses[-1], accuracies[-1])
                if checkpoint_dir is not None and (episode + 1) % checkpoint_every == 0 and episode + 1 < settings.episodes:
                    _write_progress(checkpoint_dir, state, fingerprint, episode + 1, rng, losses, accuracies, domains)
                bar.advance(1, f"loss {np.mean(losses[-20:]):.3f}, query acc {np.mean(accuracies[-20:]):.3f}")
        trained = {name: np.asarray(state.parameters[name].data) for name in trainable}
    result = onnx.ModelProto.FromString(original.SerializeToString())
    values = 0
    for tensor in result.graph.initializer:
        if tensor.name in trained:
            before = originals[tensor.name]
            array = trained[tensor.name].astype(numpy_helper.to_array(before).dtype).reshape(tuple(before.dims))
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
            values += array.size
    _check_export(result, data)
    with atomic_file(Path(output)) as staging:
        onnx.save_model(clamp_ir_version(result), str(staging))
    if checkpoint_dir is not None and (checkpoint_dir / PROGRESS).exists():
        import shutil

        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return MetaResult(str(output), settings.episodes, settings.episodes * settings.steps_per_episode, len(trainable), values,
                      time.perf_counter() - started, losses, accuracies, domains)


def _generate(episodic: onnx.ModelProto, trainable: list[str], settings: MetaSettings, stage: Path) -> None:
    from edgeplug.generation import runtime_message
    from edgeplug.modelio import clamp_ir_version

    artifacts = _ort.training_artifacts()
    trainable_set = set(trainable)
    frozen = [t.name for t in episodic.graph.initializer if t.name not in trainable_set]
    optimizer = artifacts.OptimType.AdamW if settings.optimizer == "adamw" else artifacts.OptimType.SGD
    with _ort.captured_native_stderr():
        try:
            artifacts.generate_artifacts(clamp_ir_version(episodic), requires_grad=trainable, frozen_params=frozen,
                                         loss=artifacts.LossType.CrossEntropyLoss, optimizer=optimizer,
                                         artifact_directory=str(stage), additional_output_names=[LOGITS],
                                         loss_input_names=[LOGITS])
        except Exception as error:
            raise ModelError(f"onnxruntime-training could not build the episodic training graph: {runtime_message(error)}") from None


def _check_export(model: onnx.ModelProto, data: SourceData) -> None:
    """The exported model loads and gives finite outputs on two source examples."""
    session = _ort.inference_session(model)
    name = session.get_inputs()[0].name
    (out,) = session.run(None, {name: data.x[:2]})[:1]
    if not np.all(np.isfinite(out)):
        raise ModelError("the meta-trained model gives non-finite outputs; lower --learning-rate")


__all__ = ["MetaResult", "MetaSettings", "SourceData", "episodic_model", "load_source", "meta_pretrain", "penultimate",
           "sample_episode"]
