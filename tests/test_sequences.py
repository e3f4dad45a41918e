"""Dynamic sequence axes: batches trimmed to their longest attention mask (checked first), and profiles at a given length."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import edgeplug
from edgeplug.data import TensorSpec
from edgeplug.errors import EdgeplugError
from edgeplug.profiling import static_profile
from edgeplug.profiling.worker import random_batch
from edgeplug.recipe import recipe_from_dict
from edgeplug.sequences import axis_lengths, find_sequence_axes

REPO = Path(__file__).resolve().parent.parent
TINY_BERT = REPO / "tests" / "fixtures" / "text" / "tiny_bert.onnx"
SPECS = [TensorSpec("input_ids", "int64", ["batch", "sequence"]), TensorSpec("attention_mask", "int64", ["batch", "sequence"]),
         TensorSpec("features", "float32", ["batch", 4])]


def text_data(n: int = 40, length: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 10, n)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, 128, (n, length)) * mask
    return {"input_ids": ids, "attention_mask": mask, "y": (ids[:, 1] % 3).astype(np.int64)}


def test_the_mask_and_its_axes_are_found_by_name_dtype_and_dynamic_axis() -> None:
    axes = find_sequence_axes(SPECS)
    assert axes is not None and axes.mask == "attention_mask" and axes.dimension == "sequence"
    assert dict(axes.axes) == {"input_ids": 1, "attention_mask": 1}
    assert find_sequence_axes([TensorSpec("attention_mask", "int64", ["batch", 16])]) is None  # fixed length
    assert find_sequence_axes([TensorSpec("attention_mask", "float32", ["batch", "s"])]) is None
    assert find_sequence_axes([TensorSpec("input_ids", "int64", ["batch", "s"])]) is None
    assert axis_lengths(SPECS, {"input_ids": np.zeros((2, 7)), "attention_mask": np.zeros((2, 7))}) == {"sequence": 7}


@given(st.lists(st.integers(0, 12), min_size=1, max_size=6), st.sampled_from(["right", "left"]))
def test_trimming_drops_only_columns_no_row_uses(lengths: list[int], side: str) -> None:
    width = 12
    mask = np.array([[int(i < n) for i in range(width)] for n in lengths], dtype=np.int64)
    if side == "left":
        mask = mask[:, ::-1].copy()
    ids = np.arange(mask.size).reshape(mask.shape) * mask
    axes = find_sequence_axes(SPECS)
    assert axes is not None
    trimmed = axes.trim({"input_ids": ids, "attention_mask": mask, "features": np.ones((len(lengths), 4)), "labels": np.zeros(len(lengths))})
    kept = trimmed["attention_mask"].shape[1]
    assert kept == (max(1, max(lengths)) if side == "right" else width if max(lengths) else 1)
    assert trimmed["attention_mask"].sum() == mask.sum() and trimmed["input_ids"].sum() == ids.sum()
    assert trimmed["features"].shape == (len(lengths), 4)


def rewrite(model: Path | onnx.ModelProto, out: Path, data: dict[str, np.ndarray]) -> Path:
    recipe = {"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.003}, "passes": [{"name": "new-head", "options": {"classes": 3}}]}
    edgeplug.rewrite(model, recipe_from_dict(recipe), out, calibration=data)
    return out


def test_trimmed_training_matches_padded_training(tmp_path: Path) -> None:
    data = text_data()
    folder = rewrite(TINY_BERT, tmp_path / "out", data)
    runs = {}
    for trim in (False, None):
        trainer = edgeplug.Trainer(folder, progress=False, checkpoints=False, trim_padding=trim)
        fit = trainer.fit(data, epochs=2, batch_size=8, resume=False)
        runs[trim] = (fit, trainer.evaluate(data))
    padded, trimmed = runs[False][0], runs[None][0]
    assert padded.trimming is None
    assert trimmed.trimming is not None and trimmed.trimming["mask"] == "attention_mask"
    assert trimmed.trimming["fed_share"] < 0.5  # masks of 2-9 tokens padded to 32
    # step 1 (same weights) agrees to float rounding; each AdamW step turns rounding noise in near-zero gradients
    # (e.g. attention key biases, whose true gradient is 0) into moves of about lr, so step 2 agrees to ~1e-5
    # (1.2e-5 under `compact` sessions, 2e-7 under `arena`) and later steps only statistically
    np.testing.assert_allclose(trimmed.step_losses[:1], padded.step_losses[:1], rtol=1e-6)
    np.testing.assert_allclose(trimmed.step_losses[1:2], padded.step_losses[1:2], rtol=1e-4)
    assert runs[None][1].loss == pytest.approx(runs[False][1].loss, rel=0.1)


def mask_ignoring_model() -> onnx.ModelProto:
    """Mean over every position, padding included: the mask is read but does not mask anything."""
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((128, 8)).astype(np.float32), "table")
    weight = numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "head.weight")
    bias = numpy_helper.from_array(np.zeros(3, np.float32), "head.bias")
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["embedded"], name="embed"),
        helper.make_node("ReduceMean", ["embedded"], ["pooled"], name="pool", axes=[1], keepdims=0),
        helper.make_node("Gemm", ["pooled", "head.weight", "head.bias"], ["raw"], name="head"),
        helper.make_node("Cast", ["attention_mask"], ["mask_float"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["mask_float"], ["count"], name="count", keepdims=0),
        helper.make_node("Mul", ["count", "zero"], ["nothing"], name="times_zero"),
        helper.make_node("Add", ["raw", "nothing"], ["logits"], name="add"),
    ]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"]) for name in ("input_ids", "attention_mask")]
    graph = helper.make_graph(nodes, "ignores-mask", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
                              [table, weight, bias, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_model_that_reads_padding_is_never_trimmed(tmp_path: Path) -> None:
    data = text_data()
    recipe = {"loss": "cross-entropy", "optimizer": {"name": "adamw", "lr": 0.01}}
    edgeplug.rewrite(mask_ignoring_model(), recipe_from_dict(recipe), tmp_path / "out")
    fit = edgeplug.Trainer(tmp_path / "out", progress=False, checkpoints=False).fit(data, epochs=1, batch_size=8)
    assert fit.trimming is not None and "output changes when padding is cut" in fit.trimming["reason"]
    with pytest.raises(EdgeplugError, match="cannot trim padding: the model's output changes"):
        edgeplug.Trainer(tmp_path / "out", progress=False, checkpoints=False, trim_padding=True).fit(data, epochs=1, batch_size=8)


def test_profile_counts_at_the_given_sequence_length(tmp_path: Path) -> None:
    data = text_data()
    folder = rewrite(TINY_BERT, tmp_path / "out", data)
    with pytest.raises(EdgeplugError, match="dynamic axes besides the batch: 'sequence' .of input_ids, attention_mask.*--dim sequence=128"):
        static_profile(folder, 8)
    short, long = static_profile(folder, 8, {"sequence": 16}), static_profile(folder, 8, {"sequence": 32})
    assert short.dims == {"sequence": 16}
    # attention probabilities grow with the square of the length, the rest linearly
    assert 2.0 < long.retained_activation_bytes / short.retained_activation_bytes < 4.0
    assert long.forward_macs > 2 * short.forward_macs * 0.99
    assert short.parameter_bytes == long.parameter_bytes
    import json

    report = json.loads((folder / "report.json").read_text())
    batch = random_batch(report, 4, 3, [4, 3], {"sequence": 16})
    assert batch["input_ids"].shape == (4, 16) and batch["attention_mask"].min() == 1 and batch["labels"].shape == (4,)
