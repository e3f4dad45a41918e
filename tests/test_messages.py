"""What users read: exit statuses under --debug, error prefixes, data names, the API's own words, consistent totals."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import classification_data, cnn

import edgeplug
from edgeplug.cli import main
from edgeplug.recipe import recipe_from_dict


def test_debug_shows_the_traceback_but_keeps_the_user_error_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["rewrite", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "out")]
    assert main(args) == 2
    assert main(["--debug", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("edgeplug: error: ")


def test_a_pass_that_names_itself_is_named_once(tmp_path: Path) -> None:
    recipe = recipe_from_dict({"passes": [{"name": "sparse-update", "options": {"strategy": "tinytrain"}}]})
    with pytest.raises(edgeplug.RecipeError) as error:
        edgeplug.rewrite(cnn((4, 8), 3, image=8), recipe, tmp_path / "out")
    assert str(error.value).startswith("pass 'sparse-update': ") and "sparse-update: " not in str(error.value)[len("pass 'sparse-update': "):]


def test_errors_about_calibration_data_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx.save(cnn((4, 8), 3, image=8), str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "support.npz", **classification_data((1, 8, 8), 4, n=12))
    (tmp_path / "recipe.yaml").write_text("passes:\n  - {name: new-head, options: {classes: 2}}\n")
    assert main(["rewrite", str(tmp_path / "model.onnx"), "--recipe", str(tmp_path / "recipe.yaml"),
                 "--calibration-data", str(tmp_path / "support.npz"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'support.npz'}: labels 'y' holds labels 2, 3 but the model has 2 outputs" in err and "<arrays>" not in err


def test_the_python_api_says_force_true(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(edgeplug.OutputError, match=r"force=True"):
        edgeplug.rewrite(cnn((4,), 3, image=8), None, tmp_path / "out")


@pytest.mark.parametrize("second", ["quantize-frozen", "freeze-bn"])
def test_the_totals_agree_and_count_quantized_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str], second: str) -> None:
    model = cnn((8, 16, 32), 10, image=8)
    onnx.save(model, str(tmp_path / "model.onnx"))
    (tmp_path / "recipe.yaml").write_text(f"passes:\n  - {{name: trainable, options: {{layers: classifier}}}}\n  - {{name: {second}}}\n")
    assert main(["rewrite", str(tmp_path / "model.onnx"), "--recipe", str(tmp_path / "recipe.yaml"), "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    selected = re.search(r"trainable +\d+ of \d+ parameters train \(([\d,]+) of ([\d,]+) values", out)
    final = re.search(r"wrote .*\(([\d,]+) of ([\d,]+) weight values after the passes\)", out)
    assert selected and final, out
    assert "," in selected.group(2) and selected.group(1) == final.group(1)  # thousands separators in both lines
    report = edgeplug.Trainer(tmp_path / "out", progress=False).report
    total = int(final.group(2).replace(",", ""))
    assert report["parameters"]["total_values"] == total
    if second == "quantize-frozen":  # the int8 weights are weights: the totals agree
        assert selected.group(2) == final.group(2)
    else:  # folded batch norms' scale and bias become constants, and the freeze-bn line says how many
        folded = int(re.search(r"their ([\d,]+) scale/bias values become constants", out).group(1).replace(",", ""))
        assert int(selected.group(2).replace(",", "")) - total == folded
