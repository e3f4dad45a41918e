"""The HAPT 1D-CNN: built as ONNX here, pretrained with edgeplug itself on some users (no downloads).

Raw windows in ([N, 6, 128]: acc in g, gyro in rad/s; the first BatchNormalization absorbs
the scale), 12 activity logits out:

    3 x [Conv1d k5 -> BatchNormalization -> Relu -> MaxPool 2]  (width w, 2w, 2w channels)
    -> GlobalAveragePool -> Flatten -> Gemm (classifier)

`pretrained()` trains it on the source users with `edgeplug.rewrite` (no passes: every
parameter trains) and `edgeplug.Trainer`, exports it, then sets every BatchNormalization's
running statistics to the source windows' (onnxruntime-training normalises with batch
statistics while training and never updates the running ones, so they are re-estimated
layer by layer after training: "precise BN"). The result is cached in the user's cache folder
(see `hapt.cache_dir`) by its settings, so every bench and the fleet get the same model.

    python bench/hapt_model.py             # pretrain (or reuse) and print accuracy per user
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hapt  # noqa: E402

# UCI's own split of HAPT: 21 users to train on, 9 held out. The held-out users are the "new
# domains" of the sensor benches (never seen in pretraining).
NEW_USERS = (2, 4, 9, 10, 12, 13, 18, 20, 24)
SOURCE_USERS = tuple(u for u in hapt.USERS if u not in NEW_USERS)
INPUT, OUTPUT = "x", "logits"
MODEL_VERSION = 1
HOLDOUT_EVERY = 5  # every 5th labelled stretch of a source user is held out of pretraining


def source_split(data: hapt.Windows, users: Sequence[int] = SOURCE_USERS) -> tuple[hapt.Windows, hapt.Windows]:
    """(train, held-out) windows of the source users; whole stretches go to one side (no overlap across)."""
    source = data.select(users=users)
    held = source.segments % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    return source.take(~held), source.take(held)


@dataclasses.dataclass(frozen=True)
class Settings:
    width: int = 32
    kernel: int = 5
    seed: int = 0
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.003
    users: tuple[int, ...] = SOURCE_USERS
    placements: int = 0  # > 0: train on the windows as recorded plus this many copies, each under a random placement

    def key(self) -> str:
        fields = dataclasses.asdict(self)
        if not self.placements:
            del fields["placements"]  # the models cached before the field existed keep their key
        text = json.dumps({**fields, "version": MODEL_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_cnn(width: int = 32, kernel: int = 5, seed: int = 0, classes: int = len(hapt.ACTIVITIES),
              channels: int = len(hapt.CHANNELS), length: int = hapt.WINDOW) -> onnx.ModelProto:
    """The untrained 1D-CNN (He-initialised convs, BN at identity), opset 17, IR 8."""
    rng = np.random.default_rng(seed)
    widths = [channels, width, 2 * width, 2 * width]
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def init(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    x = INPUT
    for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
        w = init(f"conv{i}.weight", rng.standard_normal((c_out, c_in, kernel)) * np.sqrt(2.0 / (c_in * kernel)))
        b = init(f"conv{i}.bias", np.zeros(c_out))
        nodes.append(helper.make_node("Conv", [x, w, b], [f"conv{i}"], name=f"conv{i}", kernel_shape=[kernel],
                                      pads=[kernel // 2, kernel // 2]))
        bn = [init(f"bn{i}.{p}", v) for p, v in (("scale", np.ones(c_out)), ("bias", np.zeros(c_out)),
                                                 ("mean", np.zeros(c_out)), ("var", np.ones(c_out)))]
        nodes.append(helper.make_node("BatchNormalization", [f"conv{i}", *bn], [f"bn{i}"], name=f"bn{i}", epsilon=1e-5))
        nodes.append(helper.make_node("Relu", [f"bn{i}"], [f"relu{i}"], name=f"relu{i}"))
        nodes.append(helper.make_node("MaxPool", [f"relu{i}"], [f"pool{i}"], name=f"pool{i}", kernel_shape=[2], strides=[2]))
        x = f"pool{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["features"], name="flatten"))
    fc_w = init("fc.weight", rng.standard_normal((widths[-1], classes)) / np.sqrt(widths[-1]))
    fc_b = init("fc.bias", np.zeros(classes))
    nodes.append(helper.make_node("Gemm", ["features", fc_w, fc_b], [OUTPUT], name="fc"))
    graph = helper.make_graph(nodes, "hapt_cnn1d",
                              [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", channels, length])],
                              [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeplug-bench-hapt")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _session(model: onnx.ModelProto) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("EDGEPLUG_BENCH_THREADS", "1"))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def batched(model: onnx.ModelProto, x: np.ndarray, outputs: Sequence[str], batch: int = 1024) -> list[np.ndarray]:
    """Run `model` on `x` in batches; the named outputs may be any tensors of the graph."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in outputs if name not in known)
    session = _session(model)
    parts: list[list[np.ndarray]] = [[] for _ in outputs]
    for start in range(0, len(x), batch):
        for part, value in zip(parts, session.run(list(outputs), {INPUT: x[start:start + batch]})):
            part.append(value)
    return [np.concatenate(p) for p in parts]


def precise_bn(model: onnx.ModelProto, x: np.ndarray) -> onnx.ModelProto:
    """Every BatchNormalization's running mean/variance set to its input's on `x`, in graph order."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: t for t in model.graph.initializer}
    for node in [n for n in model.graph.node if n.op_type == "BatchNormalization"]:
        (activation,) = batched(model, x, [node.input[0]])
        axes = (0, *range(2, activation.ndim))
        for name, value in ((node.input[3], activation.mean(axis=axes, dtype=np.float64)),
                            (node.input[4], activation.var(axis=axes, dtype=np.float64))):
            inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return model


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    (logits,) = batched(model, x, [OUTPUT])
    return float((logits.argmax(axis=1) == y).mean())


def train(settings: Settings, data: hapt.Windows, work: Path, *, echo: Any = print) -> onnx.ModelProto:
    """Train from scratch with edgeplug on `data` (every parameter), export, precise BN."""
    import edgeplug
    from edgeplug.recipe import recipe_from_dict

    work.mkdir(parents=True, exist_ok=True)
    base = work / "untrained.onnx"
    onnx.save(build_cnn(settings.width, settings.kernel, settings.seed), str(base))
    recipe = recipe_from_dict({"loss": "cross-entropy",
                               "optimizer": {"name": "adamw", "lr": settings.lr, "schedule": {"name": "cosine"}},
                               "passes": []})
    artifacts = work / "artifacts"
    edgeplug.rewrite(base, recipe, artifacts, force=True)
    trainer = edgeplug.Trainer(artifacts, progress=False, seed=settings.seed)
    tick = time.perf_counter()
    trainer.fit({INPUT: data.x, "y": data.y}, epochs=settings.epochs, batch_size=settings.batch_size)
    echo(f"trained {settings.epochs} epochs on {len(data)} windows of users {list(settings.users)} "
         f"in {time.perf_counter() - tick:.0f} s")
    edgeplug.export(artifacts, work / "trained.onnx")
    return precise_bn(onnx.load(str(work / "trained.onnx")), data.x)


def placement_augmented(data: hapt.Windows, copies: int, seed: int) -> hapt.Windows:
    """The windows as recorded plus `copies` copies, each window under its own random placement
    (`hapt.random_placement`): the obvious way to a model that does not care how the phone sits."""
    rng = np.random.default_rng([seed, 7])
    xs = [data.x]
    for _ in range(copies):
        xs.append(np.concatenate([hapt.random_placement(rng).apply(data.x[i:i + 1]) for i in range(len(data))]))
    repeat = copies + 1
    return dataclasses.replace(data, x=np.concatenate(xs), y=np.tile(data.y, repeat), users=np.tile(data.users, repeat),
                               experiments=np.tile(data.experiments, repeat), segments=np.tile(data.segments, repeat),
                               starts=np.tile(data.starts, repeat))


def pretrained(settings: Settings = Settings(), *, cache: Path | None = None, echo: Any = print) -> Path:
    """Path of the pretrained model for `settings`, training it once (cached by settings)."""
    folder = (cache if cache is not None else hapt.cache_dir()) / f"hapt-cnn-{settings.key()}"
    target = folder / "model.onnx"
    if target.is_file():
        return target
    data, _ = source_split(hapt.load(), settings.users)
    if settings.placements:
        data = placement_augmented(data, settings.placements, settings.seed)
    with tempfile.TemporaryDirectory(prefix="hapt-cnn-") as scratch:
        model = train(settings, data, Path(scratch), echo=echo)
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / ".model.onnx.partial"
        onnx.save(model, str(staging))
        (folder / "settings.json").write_text(json.dumps(dataclasses.asdict(settings), indent=1) + "\n")
        os.replace(staging, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(Settings):
        if field.name != "users":
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    parser.add_argument("--retrain", action="store_true", help="train again even if the cache has the model")
    args = parser.parse_args(argv)
    settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if f.name != "users"})
    if args.retrain:
        shutil.rmtree(hapt.cache_dir() / f"hapt-cnn-{settings.key()}", ignore_errors=True)
    path = pretrained(settings)
    model = onnx.load(str(path))
    data = hapt.load()
    print(f"model {path} ({path.stat().st_size} bytes)")
    _, held = source_split(data)
    for group, windows, users in (("source users, held-out stretches", held, SOURCE_USERS), ("new users", data, NEW_USERS)):
        accs = [accuracy(model, d.x, d.y) for d in (windows.select(users=[u]) for u in users)]
        print(f"{group}: mean accuracy {np.mean(accs):.3f} (min {min(accs):.3f}, max {max(accs):.3f}); "
              + " ".join(f"{u}:{a:.2f}" for u, a in zip(users, accs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
