"""Models from the exporters people use, through the CLI: rewrite -> train (loss falls) -> export.

The fixtures in tests/fixtures/exporters/ were written by the make_*.py scripts there,
each in its exporter's own venv (TorchScript and dynamo torch.onnx, jax2onnx,
skl2onnx); these tests need none of the exporters. Every fixture trains with every
parameter trainable; each core pass runs on the fixtures that exercise it. The full
fixture x pass table is docs/compatibility.md (tests/fixtures/exporters/compat_matrix.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "exporters"))
import pipeline_check  # noqa: E402

FIXTURES = pipeline_check.fixtures()
EXPORTERS = ("ts_", "dy_", "jax_", "skl_")  # TorchScript, dynamo, jax2onnx, skl2onnx
# Each pass on the fixtures whose quirks it meets (a row per pass keeps the file under ~30 s).
PASS_ROWS = [
    ("trainable", "ts_encoder_eval"),
    ("trainable", "skl_mlp_digits"),
    ("freeze-bn", "ts_mobilenetv2_train"),
    ("freeze-bn", "jax_cnn_eval"),
    ("sparse-update", "dy_mobilenetv2_eval"),
    ("trainable", "dy_encoder_eval_noopt"),
]
# What normalize must absorb per fixture, as its report line says (docs/compatibility.md, "Exporter quirks").
QUIRKS = {
    "ts_encoder_eval": ("identities materialized: 15", "layernorm outputs added: 4"),
    "dy_encoder_eval": ("layernorm outputs added: 4",),
    "ts_mobilenetv2_train": ("batchnorm outputs dropped: 21",),
    "dy_mobilenetv2_train_noopt": ("cast like rewritten: 49", "initializer shapes folded: 21", "exporter shapes kept: 1"),
    "dy_encoder_eval_noopt": ("layernorm outputs added: 4", "cast like rewritten: 8"),
    "jax_cnn_eval": ("opset 23->21",),
}


def test_every_exporter_has_fixtures() -> None:
    for prefix in EXPORTERS:
        assert any(name.startswith(prefix) for name in FIXTURES), prefix
    modes = {(name[:3], pipeline_check.meta(name)["mode"]) for name in FIXTURES}
    assert {("ts_", "train"), ("ts_", "eval"), ("dy_", "train"), ("dy_", "eval")} <= modes
    for name in FIXTURES:
        assert (pipeline_check.HERE / f"{name}.onnx").stat().st_size < 1_000_000, name


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_still_computes_what_the_framework_computed(name: str) -> None:
    error = pipeline_check.raw_fixture_error(name)
    if error is None:
        pytest.skip("opset above what onnxruntime 1.19 loads: checked after normalize instead")
    assert error < 1e-4


def _check(outcome: pipeline_check.Outcome) -> None:
    assert outcome.ok, f"{outcome.step}: {outcome.error}"
    # the normalised forward model computes what the framework computed (batch norm on running statistics)
    assert outcome.forward_vs_framework < 1e-4
    assert outcome.loss_after < outcome.loss_before, (outcome.loss_before, outcome.loss_after)
    assert outcome.export_vs_eval < 1e-4


@pytest.mark.parametrize("name", FIXTURES)
def test_rewrite_train_export_full(name: str, tmp_path: Path) -> None:
    outcome = pipeline_check.run(name, "full", tmp_path)
    _check(outcome)
    for part in QUIRKS.get(name, ()):
        assert part in outcome.rewrite_summary, outcome.rewrite_summary


@pytest.mark.parametrize(("recipe", "name"), PASS_ROWS)
def test_rewrite_train_export_with_pass(recipe: str, name: str, tmp_path: Path) -> None:
    outcome = pipeline_check.run(name, recipe, tmp_path)
    _check(outcome)
    assert recipe in outcome.rewrite_summary


def test_dynamo_merged_layernorm_weights_train_the_last_layers(tmp_path: Path) -> None:
    """docs/compatibility.md, (former) failure A: the dynamo optimiser merges the four equal LayerNorm
    weights of a fresh encoder into one tensor; onnxruntime-training then defined that frozen tensor's
    gradient once per LayerNorm ("Duplicate definition of name (encoder.layers.0.norm1.weight_grad)").
    The pipeline now gives each reader of a tied frozen norm parameter its own copy
    (trainability.untie_frozen_norm_parameters): the last layers train."""
    outcome = pipeline_check.run("dy_encoder_eval", "trainable", tmp_path)
    _check(outcome)
