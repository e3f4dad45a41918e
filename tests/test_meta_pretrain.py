"""`edgeplug meta-pretrain`: episodic meta-training of a backbone with onnxruntime-training (no torch)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import builders
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from edgeplug import _ort
from edgeplug.cli import main
from edgeplug.errors import EdgeplugError
from edgeplug.meta_pretrain import (
    CLASS_AVERAGE,
    QUERY_SELECT,
    SUPPORT_MEAN,
    MetaSettings,
    SourceData,
    episodic_model,
    meta_pretrain,
    sample_episode,
)
from edgeplug_plugins.new_head import inits

IMAGE = 6


def _source(folder: Path, *, domains: int = 2, classes: int = 3, per_class: int = 8, seed: int = 0) -> Path:
    """Separable images: each (domain, class) shifts the input by its own random pattern; labels distinct across domains."""
    rng = np.random.default_rng(seed)
    xs, ys, ds = [], [], []
    for d in range(domains):
        for c in range(classes):
            pattern = rng.standard_normal((1, IMAGE, IMAGE))
            xs.append(pattern + 0.7 * rng.standard_normal((per_class, 1, IMAGE, IMAGE)))
            ys += [d * classes + c] * per_class
            ds += [d] * per_class
    path = folder / "source.npz"
    np.savez(path, x=np.concatenate(xs).astype(np.float32), y=np.asarray(ys, np.int64), domain=np.asarray(ds, np.int64))
    return path


def _model(folder: Path) -> Path:
    path = folder / "cnn.onnx"
    onnx.save_model(builders.cnn((4, 6), classes=7, image=IMAGE, batch_norm=False), str(path))
    return path


def _values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_meta_pretrain_changes_the_backbone_keeps_the_head_and_loads(tmp_path: Path) -> None:
    model, data = _model(tmp_path), _source(tmp_path)
    out = tmp_path / "meta.onnx"
    result = meta_pretrain(model, data, out, MetaSettings(episodes=6, ways=3, shots=2, queries=3, learning_rate=1e-2, threads=1))
    before, after = _values(onnx.load(str(model))), _values(onnx.load(str(out)))
    assert before.keys() == after.keys()
    assert all(before[name].shape == after[name].shape for name in before)
    for name in ("conv0.weight", "conv1.weight", "conv1.bias"):
        assert not np.allclose(before[name], after[name]), name
    for name in ("fc.weight", "fc.bias"):  # the model's own classifier is not part of the episodic graph
        np.testing.assert_array_equal(before[name], after[name])
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    session = _ort.inference_session(out)
    logits = session.run(None, {"x": np.zeros((2, 1, IMAGE, IMAGE), np.float32)})[0]
    assert logits.shape == (2, 7) and np.isfinite(logits).all()
    assert len(result.losses) == len(result.query_accuracy) == len(result.domains) == 6 and set(result.domains) <= {0, 1}
    assert result.trainable_values == sum(before[n].size for n in ("conv0.weight", "conv0.bias", "conv1.weight", "conv1.bias"))


def test_the_episodic_logits_are_the_new_head_prototype_head(tmp_path: Path) -> None:
    """The in-graph head is exactly `new-head`'s prototypes init fitted on the support set."""
    model = builders.cnn((4, 6), classes=7, image=IMAGE, batch_norm=False)
    episodic, _ = episodic_model(model, scale=7.0)
    rng = np.random.default_rng(3)
    data = SourceData(rng.standard_normal((30, 1, IMAGE, IMAGE)).astype(np.float32), np.repeat(np.arange(3), 10), np.zeros(30, np.int64))
    settings = MetaSettings(ways=3, shots=4, queries=2)
    batch = sample_episode(data, {0: [0, 1, 2]}, settings, rng)
    logits = _ort.inference_session(episodic).run(None, batch.inputs)[0]
    features_model = onnx.ModelProto.FromString(model.SerializeToString())
    features_model.graph.output[0].CopyFrom(helper.make_tensor_value_info("flat", onnx.TensorProto.FLOAT, None))
    features = _ort.inference_session(features_model).run(None, {"x": batch.inputs["x"]})[0].astype(np.float64)
    support = batch.inputs[SUPPORT_MEAN][0] > 0
    support_labels = batch.inputs[CLASS_AVERAGE][:, support].argmax(axis=0)
    head = inits.prototypes(features[support], support_labels, 3, 7.0)
    query = features[batch.inputs[QUERY_SELECT].argmax(axis=1)]
    np.testing.assert_allclose(logits, query @ head.weight.T + head.bias, rtol=1e-3, atol=1e-3)
    assert batch.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_cli_writes_the_model_and_a_json_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, data = _model(tmp_path), _source(tmp_path)
    out = tmp_path / "meta.onnx"
    code = main(["meta-pretrain", str(model), "--data", str(data), "-o", str(out), "--episodes", "3", "--ways", "2",
                 "--shots", "2", "--queries", "2", "--threads", "1", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    document = json.loads(captured.out)
    assert document["output"] == str(out) and document["episodes"] == 3 and len(document["losses"]) == 3
    assert out.is_file()


@pytest.mark.parametrize("case, message", [
    ("no-labels", "no labels array 'y'"),
    ("too-few", "no domain has two classes with 5 + 5 examples"),
    ("shape", "has shape [48, 1, 5, 5]; the model input 'x' takes"),
    ("no-head", "not from a Gemm/MatMul classifier"),
    ("ways", "ways must be at least 2"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, message: str) -> None:
    model, data = _model(tmp_path), _source(tmp_path)
    arrays = dict(np.load(data))
    extra: list[str] = []
    if case == "no-labels":
        del arrays["y"]
    elif case == "too-few":
        extra = ["--shots", "5", "--queries", "5"]
    elif case == "shape":
        arrays["x"] = arrays["x"][:, :, :5, :5]
    elif case == "no-head":
        proto = onnx.load(str(model))
        proto.graph.node.append(helper.make_node("Relu", ["logits"], ["relu_out"], name="after_head"))
        proto.graph.output[0].name = "relu_out"
        onnx.save_model(proto, str(model))
    elif case == "ways":
        extra = ["--ways", "1"]
    np.savez(data, **arrays)
    out = tmp_path / "meta.onnx"
    code = main(["meta-pretrain", str(model), "--data", str(data), "-o", str(out), "--episodes", "2", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".meta.onnx*"))


def test_the_meta_pretrained_model_takes_new_head_and_trains(tmp_path: Path) -> None:
    """The output is an ordinary model: new-head + sparse-update rewrite it and the folder trains."""
    import edgeplug
    from edgeplug.recipe import recipe_from_dict
    from edgeplug.trainer import Trainer

    model, data = _model(tmp_path), _source(tmp_path)
    out = tmp_path / "meta.onnx"
    meta_pretrain(model, data, out, MetaSettings(episodes=2, ways=2, shots=2, queries=2, threads=1))
    arrays = dict(np.load(data))
    support = {"x": arrays["x"][:24], "y": arrays["y"][:24]}  # domain 0: classes 0, 1, 2
    recipe = recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.01},
                               "passes": [{"name": "new-head", "options": {"classes": 3}},
                                          {"name": "sparse-update", "options": {"memory_budget_bytes": 65536}}]})
    edgeplug.rewrite(onnx.load(str(out)), recipe, tmp_path / "folder", calibration=support)
    np.savez(tmp_path / "support.npz", **support)
    result = Trainer(tmp_path / "folder", checkpoints=False).fit(tmp_path / "support.npz", epochs=2, batch_size=8)
    assert result.steps_run == 6 and all(np.isfinite(result.step_losses))


def test_a_killed_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    model, data = _model(tmp_path), _source(tmp_path)
    settings = MetaSettings(episodes=5, ways=2, shots=2, queries=2, learning_rate=1e-2, threads=1)
    whole = meta_pretrain(model, data, tmp_path / "whole.onnx", settings)

    class Killed(Exception):
        pass

    def killed(episode: int, loss: float, accuracy: float) -> None:
        if episode == 3:
            raise Killed

    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(Killed):
        meta_pretrain(model, data, tmp_path / "resumed.onnx", settings, on_episode=killed, checkpoint_dir=checkpoints, checkpoint_every=2)
    assert not (tmp_path / "resumed.onnx").exists() and (checkpoints / "progress.json").is_file()
    resumed = meta_pretrain(model, data, tmp_path / "resumed.onnx", settings, checkpoint_dir=checkpoints, checkpoint_every=2)
    assert resumed.losses == whole.losses and resumed.domains == whole.domains
    a, b = _values(onnx.load(str(tmp_path / "whole.onnx"))), _values(onnx.load(str(tmp_path / "resumed.onnx")))
    assert all(np.array_equal(a[name], b[name]) for name in a)
    assert not checkpoints.exists()
    with pytest.raises(Killed):
        meta_pretrain(model, data, tmp_path / "x.onnx", settings, on_episode=killed, checkpoint_dir=checkpoints, checkpoint_every=2)
    other = dataclasses.replace(settings, learning_rate=1e-3)
    with pytest.raises(EdgeplugError, match="checkpoint of another run"):
        meta_pretrain(model, data, tmp_path / "x.onnx", other, checkpoint_dir=checkpoints, checkpoint_every=2)
