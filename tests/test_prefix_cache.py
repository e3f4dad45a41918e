"""Frozen-prefix caching: training on cached prefix outputs gives the same weights, bit for bit."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from builders import classification_data, cnn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

from test_sparse_update import IMAGE, mbconv

import edgeplug
from edgeplug.checkpoints import STATE, latest_checkpoint
from edgeplug.prefix_cache import NotCacheable, cut_models
from edgeplug.recipe import recipe_from_dict
from edgeplug.trainer import Trainer


def _weights(folder: Path) -> dict[str, np.ndarray]:
    from edgeplug import _ort

    checkpoint = latest_checkpoint(folder)
    assert checkpoint is not None
    state = _ort.training_api().CheckpointState.load_checkpoint(str(checkpoint / STATE))
    return {name: np.array(p.data, copy=True) for name, p in state.parameters if p.requires_grad}


def _train_both(folder: Path, tmp: Path, data: dict, eval_data: dict | None, epochs: int, batch: int, **cache: object):
    results = {}
    for enabled in (False, True):
        copy = tmp / f"cache-{enabled}"
        shutil.copytree(folder, copy)
        trainer = Trainer(copy, progress=False, cache_prefix=enabled, **cache)  # type: ignore[arg-type]
        fit = trainer.fit(data, eval_data, epochs=epochs, batch_size=batch)
        results[enabled] = (fit, _weights(copy), trainer)
    return results


def _sparse(model, data, out: Path, **options: object) -> Path:
    recipe = recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.02},
                               "passes": [{"name": "sparse-update", "options": {"batch_size": 4, **options}}]})
    edgeplug.rewrite(model, recipe, out, calibration=data)
    return out


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blocks=st.integers(1, 3), strategy=st.sampled_from(["tinytrain", "static", "last-k"]), batch=st.integers(3, 7),
       seed=st.integers(0, 5))
def test_cached_training_is_bit_identical(tmp_path_factory: pytest.TempPathFactory, blocks: int, strategy: str, batch: int,
                                          seed: int) -> None:
    model = mbconv(blocks=blocks, width=4, seed=seed)
    data = classification_data((3, IMAGE, IMAGE), 5, n=13, seed=seed)  # a last batch shorter than the others
    held_out = classification_data((3, IMAGE, IMAGE), 5, n=9, seed=seed + 10)
    tmp = tmp_path_factory.mktemp("cache")
    options = {"strategy": strategy, "layers": 2} if strategy == "last-k" else {"strategy": strategy, "memory_budget_bytes": 40_000}
    if strategy == "tinytrain":
        options["criterion"] = "paper"  # leaves a frozen prefix at this budget (criterion budget may train the stem too)
    folder = _sparse(model, data, tmp / "a", **options)
    results = _train_both(folder, tmp, data, held_out, epochs=3, batch=batch)
    (plain, plain_weights, _), (cached, cached_weights, trainer) = results[False], results[True]
    assert plain.prefix_cache is None and cached.prefix_cache is not None and "reason" not in cached.prefix_cache
    assert plain_weights.keys() == cached_weights.keys()
    for name, value in plain_weights.items():
        assert np.array_equal(value, cached_weights[name]), name
    assert [e.train for e in plain.epochs] == [e.train for e in cached.epochs]
    assert [e.eval for e in plain.epochs] == [e.eval for e in cached.epochs]
    assert trainer.evaluate(held_out) == plain.epochs[-1].eval  # evaluation after fit runs the prefix too


def test_the_cache_spills_to_disk_beyond_its_memory_cap(tmp_path: Path) -> None:
    model = mbconv(blocks=2, width=4, seed=3)
    data = classification_data((3, IMAGE, IMAGE), 5, n=20, seed=3)
    folder = _sparse(model, data, tmp_path / "a", strategy="last-k", layers=2)
    results = _train_both(folder, tmp_path, data, None, epochs=2, batch=4, cache_memory=1000)
    stats = results[True][0].prefix_cache
    assert stats["disk_bytes"] > 0 and stats["memory_bytes"] <= 1000
    assert stats["memory_bytes"] + stats["disk_bytes"] == stats["examples"] * stats["bytes_per_example"]
    for name, value in results[False][1].items():
        assert np.array_equal(value, results[True][1][name]), name
    cache_folder = results[True][2]._prefix.folder
    assert any(cache_folder.rglob("*.bin"))
    results[True][2]._prefix.close()
    assert not cache_folder.exists()


def test_resume_with_the_cache_reaches_the_uninterrupted_weights(tmp_path: Path) -> None:
    model = mbconv(blocks=2, width=4, seed=5)
    data = classification_data((3, IMAGE, IMAGE), 5, n=16, seed=5)
    folder = _sparse(model, data, tmp_path / "a", strategy="last-k", layers=3)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    shutil.copytree(folder, straight)
    shutil.copytree(folder, resumed)
    Trainer(straight, progress=False, cache_prefix=False).fit(data, epochs=4, batch_size=4)
    Trainer(resumed, progress=False, cache_prefix=True).fit(data, epochs=2, batch_size=4)
    again = Trainer(resumed, progress=False, cache_prefix=True).fit(data, epochs=4, batch_size=4)
    assert again.resumed_from_step == 8 and again.prefix_cache is not None and "reason" not in again.prefix_cache
    expected = _weights(straight)
    for name, value in _weights(resumed).items():
        assert np.array_equal(value, expected[name]), name


def test_folders_without_a_cacheable_prefix_say_why(tmp_path: Path) -> None:
    data = classification_data((1, IMAGE, IMAGE), 10, n=12)
    everything = tmp_path / "all"
    edgeplug.rewrite(cnn(image=IMAGE, batch_norm=False), recipe_from_dict({}), everything)
    with pytest.raises(NotCacheable, match="first layer trains"):
        cut_models(everything, edgeplug.Trainer(everything).report)
    with pytest.raises(edgeplug.EdgeplugError, match="cannot cache the frozen prefix"):
        Trainer(everything, progress=False, cache_prefix=True).fit(data, epochs=2, batch_size=4)
    auto = Trainer(everything, progress=False).fit(data, epochs=2, batch_size=4)
    assert "first layer trains" in auto.prefix_cache["reason"]
    batch_norm = tmp_path / "bn"
    edgeplug.rewrite(cnn(image=IMAGE, batch_norm=True), recipe_from_dict({"passes": [
        {"name": "trainable", "options": {"layers": "classifier"}}]}), batch_norm)
    with pytest.raises(NotCacheable, match="freeze-bn"):
        cut_models(batch_norm, edgeplug.Trainer(batch_norm).report)
    one_epoch = Trainer(batch_norm, progress=False).fit(data, epochs=1, batch_size=4)
    assert "fewer than two epochs" in one_epoch.prefix_cache["reason"]


def test_a_batch_only_shape_chain_is_recomputed_from_the_boundary(tmp_path: Path) -> None:
    """Reshape(x, [Shape(input)[0], -1]) after the frozen prefix (EfficientNet's export before its classifier)."""
    from onnx import TensorProto, helper, numpy_helper

    model = cnn(channels=(4, 4), image=IMAGE, batch_norm=False, seed=2)
    graph = model.graph
    flatten = next(n for n in graph.node if n.op_type == "Flatten")
    graph.node.remove(flatten)
    at = next(i for i, n in enumerate(graph.node) if n.op_type == "Gemm")
    graph.initializer.extend([numpy_helper.from_array(np.array(0, np.int64), "zero"),
                              numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
                              numpy_helper.from_array(np.array([0], np.int64), "axes0")])
    for offset, node in enumerate([
        helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
        helper.make_node("Gather", ["x_shape", "zero"], ["n"], name="batch", axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="n1"),
        helper.make_node("Concat", ["n1", "minus_one"], ["target"], name="target_shape", axis=0),
        helper.make_node("Reshape", ["pooled", "target"], ["flat"], name="flatten"),
    ]):
        graph.node.insert(at + offset, node)
    del graph.value_info[:]
    assert TensorProto.INT64
    data = classification_data((1, IMAGE, IMAGE), 10, n=10)
    folder = tmp_path / "a"
    edgeplug.rewrite(model, recipe_from_dict({"passes": [{"name": "trainable", "options": {"layers": 2}}]}), folder)
    results = _train_both(folder, tmp_path, data, data, epochs=2, batch=3)
    assert "reason" not in results[True][0].prefix_cache
    for name, value in results[False][1].items():
        assert np.array_equal(value, results[True][1][name]), name


def test_cli_flags(tmp_path: Path) -> None:
    from edgeplug.cli import main

    model = mbconv(blocks=1, width=4, seed=2)
    data = classification_data((3, IMAGE, IMAGE), 5, n=8, seed=2)
    folder = _sparse(model, data, tmp_path / "a", strategy="last-k", layers=2)
    np.savez(tmp_path / "train.npz", x=data["x"], y=data["y"])
    metrics = tmp_path / "m.json"
    assert main(["train", str(folder), "--data", str(tmp_path / "train.npz"), "--epochs", "2", "--batch-size", "4",
                 "--no-progress", "--cache-prefix", "--cache-memory", "1K", "--metrics", str(metrics)]) == 0
    import json

    stats = json.loads(metrics.read_text())["prefix_cache"]
    assert stats["disk_bytes"] > 0 and "reason" not in stats
    assert main(["train", str(folder), "--data", str(tmp_path / "train.npz"), "--epochs", "4", "--batch-size", "4",
                 "--no-progress", "--no-cache-prefix", "--metrics", str(metrics)]) == 0
    assert json.loads(metrics.read_text())["prefix_cache"] is None


def test_a_prefix_without_compute_is_not_cached_unless_asked(tmp_path: Path) -> None:
    """A full fine-tune of a model that pads its input first (TF-style exports): the 'prefix' is the Pad alone.

    Caching it would store a padded copy of every example and run a reference step, to save nothing.
    """
    from onnx import helper as onnx_helper
    from onnx import numpy_helper

    model = cnn(channels=(4,), image=IMAGE, batch_norm=False, seed=4)
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"))
    graph.node.insert(0, onnx_helper.make_node("Pad", ["x", "pads"], ["x_padded"], name="pad"))
    first_conv = next(n for n in graph.node if n.op_type == "Conv")
    first_conv.input[0] = "x_padded"
    del first_conv.attribute[:]  # the Pad does the padding now
    data = classification_data((1, IMAGE, IMAGE), 10, n=12, seed=4)
    folder = tmp_path / "full"
    edgeplug.rewrite(model, recipe_from_dict({}), folder)
    report = edgeplug.Trainer(folder).report
    with pytest.raises(NotCacheable, match="no multiply-accumulate work \\(only Pad\\)"):
        cut_models(folder, report)
    assert cut_models(folder, report, require_compute=False).prefix_nodes == 1
    results = _train_both(folder, tmp_path, data, None, epochs=2, batch=4)
    assert "reason" not in results[True][0].prefix_cache  # asked for: still cached, still bit-identical
    for name, value in results[False][1].items():
        assert np.array_equal(value, results[True][1][name]), name
    auto_folder = tmp_path / "auto"
    shutil.copytree(folder, auto_folder)
    auto = Trainer(auto_folder, progress=False).fit(data, epochs=2, batch_size=4)
    assert "no multiply-accumulate" in auto.prefix_cache["reason"]
    for name, value in _weights(auto_folder).items():
        assert np.array_equal(value, results[False][1][name]), name


@pytest.mark.parametrize("passes", [
    [{"name": "lora", "options": {"rank": 4, "alpha": 8, "last": 6}}, {"name": "quantize-frozen"}],
    [{"name": "trainable", "options": {"layers": 3}}, {"name": "quantize-frozen"}],
], ids=["lora-last-block-int8", "last-layers-int8"])
def test_an_encoder_with_int8_frozen_weights_caches_its_frozen_blocks(tmp_path: Path, passes: list) -> None:
    """The frozen embeddings and first block of a BERT-style encoder (LayerNorms, int8 weights dequantized by
    frozen nodes outside the data path) are cached; training stays bit-identical."""
    from test_encoder_passes import rewrite, text_data

    data = text_data(n=22, length=16, seed=1)
    rewrite(passes, tmp_path / "folder")
    results = _train_both(tmp_path / "folder", tmp_path, data, data, epochs=3, batch=5, trim_padding=False)
    stats = results[True][0].prefix_cache
    assert "reason" not in stats and any("LayerNorm" in name for name in stats["boundary"])
    # views, and the frozen base product of a LoRA layer, are recomputed by the cut model from the tensor it receives
    assert not any("reshape" in name.lower() or "lora_base" in name for name in stats["boundary"])
    for name, value in results[False][1].items():
        assert np.array_equal(value, results[True][1][name]), name
    assert [e.eval for e in results[False][0].epochs] == [e.eval for e in results[True][0].epochs]


def test_by_default_heavily_padded_text_is_trimmed_rather_than_cached(tmp_path: Path) -> None:
    """The cache holds padded-length tensors: when trimming keeps at most half the positions, trimming wins."""
    from test_encoder_passes import rewrite, text_data

    rewrite([{"name": "lora", "options": {"rank": 4, "alpha": 8, "last": 6}}, {"name": "quantize-frozen"}], tmp_path / "folder")
    padded = text_data(n=16, length=16, seed=2)
    padded["attention_mask"][:, 6:] = 0  # every text at most 6 of 16 tokens
    padded["input_ids"] *= padded["attention_mask"]
    fit = Trainer(tmp_path / "folder", progress=False).fit(padded, epochs=2, batch_size=4)
    assert "trimming the padding keeps" in fit.prefix_cache["reason"] and fit.trimming.get("fed_share", 1) <= 0.5
    full = text_data(n=16, length=16, seed=2)
    full["attention_mask"][:] = 1
    fit = Trainer(tmp_path / "folder", progress=False).fit(full, epochs=2, batch_size=4, resume=False)
    assert "reason" not in fit.prefix_cache


def test_a_folder_with_carried_state_caches_its_prefix(tmp_path: Path) -> None:
    """activation-shortcut ASI carries its factors from step to step: the cut model takes them as the whole model does,
    the fill and the checks feed the folder's initial values, its anchors are recomputed, and training stays
    bit-identical."""
    model = mbconv(blocks=2, width=4, seed=5)
    data = classification_data((3, IMAGE, IMAGE), 5, n=12, seed=5)
    recipe = recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.02}, "passes": [
        {"name": "trainable", "options": {"layers": 3}},
        {"name": "activation-shortcut", "options": {"method": "asi", "op_types": ["Conv"], "compression": 4, "batch_size": 4}}]})
    edgeplug.rewrite(model, recipe, tmp_path / "asi", calibration=data)
    assert edgeplug.Trainer(tmp_path / "asi").report["training"]["carried_state"]
    results = _train_both(tmp_path / "asi", tmp_path, data, data, epochs=3, batch=4)
    assert "reason" not in results[True][0].prefix_cache
    for name, value in results[False][1].items():
        assert np.array_equal(value, results[True][1][name]), name
    assert [e.eval for e in results[False][0].epochs] == [e.eval for e in results[True][0].epochs]


def _encoder_losses(folder: Path, tmp: Path, data: dict, tag: str, **options: object):
    copy = tmp / tag
    shutil.copytree(folder, copy)
    # a random-weight encoder on 22 texts learns little in 3 epochs: its collapse warning is beside the point here
    trainer = Trainer(copy, progress=False, trim_padding=False, warn=lambda _: None, **options)  # type: ignore[arg-type]
    return trainer.fit(data, data, epochs=3, batch_size=5), _weights(copy)


def test_a_float16_cache_halves_its_bytes_and_trains_close_to_float32(tmp_path: Path) -> None:
    """float16 storage: half the bytes per example, step losses within 1e-3 (relative) of the uncached run on the
    MiniLM-architecture test encoder (LoRA on the last block + int8 frozen weights; measured ~7e-6), weights close;
    the default (float32) stays bit-identical."""
    from test_encoder_passes import rewrite, text_data

    data = text_data(n=22, length=16, seed=3)
    data["attention_mask"][:] = 1
    rewrite([{"name": "lora", "options": {"rank": 4, "alpha": 8, "last": 6}}, {"name": "quantize-frozen"}], tmp_path / "folder")
    plain, plain_weights = _encoder_losses(tmp_path / "folder", tmp_path, data, "plain", cache_prefix=False)
    exact, exact_weights = _encoder_losses(tmp_path / "folder", tmp_path, data, "float32", cache_prefix=True)
    half, half_weights = _encoder_losses(tmp_path / "folder", tmp_path, data, "float16", cache_prefix=True, cache_dtype="float16")
    assert exact.prefix_cache["dtype"] == "float32" and half.prefix_cache["dtype"] == "float16"
    assert half.prefix_cache["bytes_per_example"] * 2 == exact.prefix_cache["bytes_per_example"]
    assert half.prefix_cache["memory_bytes"] * 2 == exact.prefix_cache["memory_bytes"] > 0
    assert exact.step_losses == plain.step_losses
    for name, value in plain_weights.items():
        assert np.array_equal(value, exact_weights[name]), name
    losses, rounded = np.array(plain.step_losses), np.array(half.step_losses)
    assert not np.array_equal(losses, rounded)  # the option takes effect: the trained part reads rounded inputs
    np.testing.assert_allclose(rounded, losses, rtol=1e-3)
    for name, value in plain_weights.items():
        assert np.abs(half_weights[name] - value).max() <= 1e-3 * max(float(np.abs(value).max()), 1.0), name
    np.testing.assert_allclose(half.epochs[-1].eval.loss, plain.epochs[-1].eval.loss, rtol=1e-3)


def test_a_float16_cache_from_the_recipe_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    """recipe training.prefix_cache_dtype reaches the trainer; the refilled cache rounds the same way, so a resumed
    run (examples split between memory and disk) ends with the uninterrupted run's weights, bit for bit."""
    model = mbconv(blocks=2, width=4, seed=5)
    data = classification_data((3, IMAGE, IMAGE), 5, n=16, seed=5)
    recipe = recipe_from_dict({"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.02},
                               "training": {"prefix_cache_dtype": "float16"},
                               "passes": [{"name": "sparse-update", "options": {"batch_size": 4, "strategy": "last-k", "layers": 3}}]})
    assert recipe.prefix_cache_dtype == "float16" and recipe.to_dict()["training"] == {"prefix_cache_dtype": "float16"}
    folder = tmp_path / "a"
    edgeplug.rewrite(model, recipe, folder, calibration=data)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    shutil.copytree(folder, straight)
    shutil.copytree(folder, resumed)
    whole = Trainer(straight, progress=False, cache_prefix=True, cache_memory=2000).fit(data, epochs=4, batch_size=4)
    stats = whole.prefix_cache
    assert stats["dtype"] == "float16" and stats["disk_bytes"] > 0 and stats["memory_bytes"] <= 2000
    assert stats["memory_bytes"] + stats["disk_bytes"] == stats["examples"] * stats["bytes_per_example"]
    Trainer(resumed, progress=False, cache_prefix=True, cache_memory=2000).fit(data, epochs=2, batch_size=4)
    again = Trainer(resumed, progress=False, cache_prefix=True, cache_memory=2000).fit(data, epochs=4, batch_size=4)
    assert again.resumed_from_step == 8 and again.prefix_cache["dtype"] == "float16"
    expected = _weights(straight)
    for name, value in _weights(resumed).items():
        assert np.array_equal(value, expected[name]), name
    # float32 given explicitly overrides the recipe
    exact = Trainer(straight, progress=False, cache_prefix=True, cache_dtype="float32").fit(data, epochs=2, batch_size=4, resume=False)
    assert exact.prefix_cache["dtype"] == "float32"


def test_bad_cache_dtypes_and_float16_overflow_give_clear_errors(tmp_path: Path) -> None:
    import json

    from edgeplug.cli import main
    from edgeplug.errors import RecipeError

    with pytest.raises(RecipeError, match="prefix_cache_dtype"):
        recipe_from_dict({"training": {"prefix_cache_dtype": "bfloat16"}})
    model = mbconv(blocks=2, width=4, seed=4)
    data = classification_data((3, IMAGE, IMAGE), 5, n=8, seed=4)
    folder = _sparse(model, data, tmp_path / "a", strategy="last-k", layers=2)
    with pytest.raises(edgeplug.EdgeplugError, match="cache_dtype \\(--cache-dtype\\) must be one of float32, float16, not 'int8'"):
        Trainer(folder, progress=False, cache_dtype="int8")
    np.savez(tmp_path / "train.npz", x=data["x"], y=data["y"])
    assert main(["train", str(folder), "--data", str(tmp_path / "train.npz"), "--cache-dtype", "half"]) == 2
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    recipe_file = broken / "recipe.json"
    document = json.loads(recipe_file.read_text())
    document["training"] = {"prefix_cache_dtype": "float8"}
    recipe_file.write_text(json.dumps(document))
    with pytest.raises(edgeplug.EdgeplugError, match="training.prefix_cache_dtype must be one of float32, float16, not 'float8'"):
        Trainer(broken, progress=False)
    # frozen-prefix values beyond float16's largest (65504) are refused, not stored as infinity (a ReLU CNN: unbounded)
    folder = tmp_path / "relu"
    edgeplug.rewrite(cnn(channels=(4, 4), image=IMAGE, batch_norm=False, seed=2),
                     recipe_from_dict({"passes": [{"name": "trainable", "options": {"layers": 2}}]}), folder)
    data = classification_data((1, IMAGE, IMAGE), 10, n=8)
    loud = {"x": (np.abs(data["x"]) * 1e6).astype(np.float32), "y": data["y"]}
    with pytest.raises(edgeplug.EdgeplugError, match="beyond float16's range .*use prefix_cache_dtype float32"):
        Trainer(folder, progress=False, cache_prefix=True, cache_dtype="float16").fit(loud, epochs=2, batch_size=4)
    auto = Trainer(folder, progress=False, cache_dtype="float16").fit(loud, epochs=2, batch_size=4, resume=False)
    assert "beyond float16's range" in auto.prefix_cache["reason"]
    exact = Trainer(folder, progress=False, cache_prefix=True).fit(loud, epochs=2, batch_size=4, resume=False)
    assert exact.prefix_cache["dtype"] == "float32"
