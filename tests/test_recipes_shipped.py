"""Every recipe shipped in recipes/: it validates, and rewrite -> train (loss falls) -> export works on a small CNN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from builders import classification_data, cnn

import edgeplug
from edgeplug import _ort
from edgeplug.cli import main
from edgeplug.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
IMAGE = 8
CLASSES = 10


def test_recipes_are_shipped() -> None:
    assert len(RECIPES) >= 2, RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_has_a_header_saying_what_it_is_for_and_needs(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = [line for line in lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]]
    text = "\n".join(header)
    assert len(header) >= 3 and "For:" in text and "Needs:" in text
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    if any(p.get("name") in ("sparse-update", "activation-shortcut") for p in document["passes"]):
        assert "--calibration-data" in text  # the passes read the support set


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_rewrite_train_export(tmp_path: Path, path: Path) -> None:
    recipe = load_recipe(path)  # validated against the recipe schema and every pass's options schema
    model = cnn(channels=(8, 16, 16), classes=CLASSES, image=IMAGE, batch_norm=False)
    data = classification_data((1, IMAGE, IMAGE), CLASSES, n=60, seed=1)
    out = tmp_path / "out"
    report = edgeplug.rewrite(model, recipe, out, calibration=data).report
    names = [p["name"] for p in report["passes"]]
    assert names == ["normalize", *(p.name for p in recipe.passes if p.name != "normalize")]
    result = edgeplug.Trainer(out, progress=False).fit(data, epochs=8, batch_size=10)
    assert result.epochs[-1].train.loss < result.epochs[0].train.loss
    edgeplug.export(out, tmp_path / "trained.onnx")
    exported = onnx.load(str(tmp_path / "trained.onnx"))
    session = _ort.inference_runtime().InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"x": data["x"]})[0]
    eval_accuracy = edgeplug.Trainer(out, progress=False).evaluate(data).accuracy
    assert float(np.mean(logits.argmax(axis=1) == data["y"])) == pytest.approx(eval_accuracy, abs=1 / 60)
    if "quantize-frozen" in names:
        details = next(p for p in report["passes"] if p["name"] == "quantize-frozen")["details"]
        sparse = next((p["details"] for p in report["passes"] if p["name"] == "sparse-update"), None)
        # on this small CNN the budget may cover every layer whole (criterion budget then trains them all)
        if sparse is None or len(sparse["layers"]) < sparse["candidates"] or any(layer["channels"] for layer in sparse["layers"]):
            assert details["quantized"]
        int8 = {t.name for t in exported.graph.initializer if t.data_type == onnx.TensorProto.INT8}
        assert {f"{q['weight']}_quantized" for q in details["quantized"]} <= int8


@pytest.mark.parametrize("path", [p for p in RECIPES if "shortcut" in p.stem], ids=lambda p: p.stem)
def test_composed_recipe_works_when_sparse_update_trains_only_the_classifier(tmp_path: Path, path: Path) -> None:
    """At 64x64 every conv's activations exceed sparse-update's 1.5 MB budget, so only the classifier trains
    (the 224x224 case of a pretrained CNN); activation-shortcut then has nothing to compress and says so."""
    image = 64
    model = cnn(channels=(8, 16, 16), classes=CLASSES, image=image, batch_norm=False)
    data = classification_data((1, image, image), CLASSES, n=40, seed=1)
    report = edgeplug.rewrite(model, load_recipe(path), tmp_path / "out", calibration=data).report
    trainable = set(report["parameters"]["trainable"])
    assert trainable and not any(name.startswith("conv") for name in trainable)
    shortcut = next(p for p in report["passes"] if p["name"] == "activation-shortcut")
    assert not shortcut["changed"] and "nothing to compress" in shortcut["summary"]
    result = edgeplug.Trainer(tmp_path / "out", progress=False).fit(data, epochs=3, batch_size=10)
    assert result.epochs[-1].train.loss < result.epochs[0].train.loss
    edgeplug.export(tmp_path / "out", tmp_path / "trained.onnx")


def test_a_recipe_runs_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    path = next(p for p in RECIPES if "int8" in p.stem)
    onnx.save(cnn(channels=(8, 16), classes=CLASSES, image=IMAGE, batch_norm=False), tmp_path / "model.onnx")
    np.savez(tmp_path / "support.npz", **classification_data((1, IMAGE, IMAGE), CLASSES, n=30, seed=2))
    monkeypatch.chdir(tmp_path)
    assert main(["rewrite", "model.onnx", "--recipe", str(path), "--calibration-data", "support.npz", "-o", "out"]) == 0
    assert "quantize-frozen" in capsys.readouterr().out
    assert main(["train", "out", "--data", "support.npz", "--epochs", "2", "--batch-size", "10", "--no-progress"]) == 0
    assert main(["export", "out", "-o", "trained.onnx"]) == 0
    assert (tmp_path / "trained.onnx").is_file()
    assert main(["rewrite", "model.onnx", "--recipe", str(path), "-o", "again"]) == 2  # sparse-update needs the support set
    assert "calibration-data" in capsys.readouterr().err


def test_shipped_recipes_load_by_name_from_the_installed_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeplug.recipe import shipped_recipes

    assert sorted(shipped_recipes()) == sorted(p.stem for p in RECIPES)
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here: the name comes from the package
    recipe = load_recipe("fine-tune")
    assert [p.name for p in recipe.passes] == ["new-head", "freeze-bn"]
    with pytest.raises(edgeplug.RecipeError, match=r"recipe file not found: fine-tuning \(shipped recipes: fine-tune, "):
        load_recipe("fine-tuning")
    (tmp_path / "fine-tune").write_text("optimizer: {lr: 0.5}\n")  # a file of that name wins
    assert load_recipe("fine-tune").lr == 0.5


def test_fine_tune_recipe_gives_a_pretrained_model_a_head_for_the_support_set_classes(tmp_path: Path,
                                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The common path through the CLI: a 10-class model, 4 new classes, the shipped recipe by name."""
    onnx.save(cnn(channels=(8, 16), classes=CLASSES, image=IMAGE), str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "support.npz", **classification_data((1, IMAGE, IMAGE), 4, n=24, seed=2))
    assert main(["rewrite", str(tmp_path / "model.onnx"), "--recipe", "fine-tune", "--calibration-data",
                 str(tmp_path / "support.npz"), "-o", str(tmp_path / "out")]) == 0
    assert "10 -> 4 classes" in capsys.readouterr().out
    assert main(["train", str(tmp_path / "out"), "--data", str(tmp_path / "support.npz"), "--epochs", "2", "--no-progress"]) == 0
    assert main(["export", str(tmp_path / "out"), "-o", str(tmp_path / "trained.onnx")]) == 0
    session = _ort.inference_runtime().InferenceSession(str(tmp_path / "trained.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros((2, 1, IMAGE, IMAGE), np.float32)})[0].shape == (2, 4)
