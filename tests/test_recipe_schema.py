"""The recipe schema an editor uses (`edgeplug schema recipe`), and the recipe's `training` section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import onnx
import pytest
import yaml
from builders import classification_data, mlp

from edgeplug import cli
from edgeplug.errors import RecipeError
from edgeplug.plugins import PluginHost, reset_default_host
from edgeplug.recipe import recipe_from_dict, recipe_schema, shipped_recipes
from edgeplug.trainer import Trainer

BUILT_IN = ("activation-shortcut", "freeze-bn", "lls", "lora", "new-head", "normalize", "personalize", "qcore", "quantize-frozen",
            "sparse-update", "trainable")


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    document = recipe_schema(PluginHost())
    jsonschema.Draft202012Validator.check_schema(document)
    return document


def _errors(schema: dict[str, Any], recipe: Any) -> list[str]:
    return [error.message for error in jsonschema.Draft202012Validator(schema).iter_errors(recipe)]


def test_a_misspelt_pass_or_option_is_flagged_by_the_schema_alone(schema: dict[str, Any]) -> None:
    assert any("'trainabel' is not one of" in e for e in _errors(schema, {"passes": [{"name": "trainabel"}]}))
    assert any("'layerz' was unexpected" in e for e in _errors(schema, {"passes": [{"name": "trainable", "options": {"layerz": "frozen"}}]}))
    assert _errors(schema, {"passes": [{"name": "freeze-bn", "options": {"layers": "sometimes"}}]})
    assert _errors(schema, {"training": {"epochs": 0}}) and _errors(schema, {"training": {"batch_size": "8"}})


def test_the_schema_accepts_every_shipped_recipe_and_every_pass(schema: dict[str, Any]) -> None:
    for name, text in shipped_recipes().items():
        assert _errors(schema, yaml.safe_load(text)) == [], name
    assert set(BUILT_IN) <= set(schema["properties"]["passes"]["items"]["properties"]["name"]["enum"])
    assert _errors(schema, {"passes": [{"name": name} for name in BUILT_IN], "training": {"epochs": 3, "batch_size": 8, "seed": 1}}) == []


def _properties(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                for name, sub in value.items():
                    if isinstance(sub, dict) and not (set(sub) <= {"const"}):  # the if-clauses' name: {const}
                        found.append((f"{path}.{name}", sub))
                    found += _properties(sub, f"{path}.{name}")
            elif key != "if":
                found += _properties(value, path)
    elif isinstance(node, list):
        for value in node:
            found += _properties(value, path)
    return found


def test_every_property_has_a_description_and_an_example(schema: dict[str, Any]) -> None:
    properties = _properties(schema)
    assert len(properties) > 100
    assert [path for path, sub in properties if "description" not in sub] == []
    assert [path for path, sub in properties if "examples" not in sub] == []
    assert "examples" in schema


def test_a_pass_schema_with_defs_is_embedded_with_its_references(tmp_path: Path) -> None:
    from edgeplug import Pass, hookimpl

    class Referring(Pass):
        name = "referring"
        summary = "test pass whose options schema uses $defs"
        options_schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "additionalProperties": False,
                          "properties": {"mode": {"$ref": "#/$defs/mode", "description": "a mode"}},
                          "$defs": {"mode": {"enum": ["a", "b"]}}}

    class Plugin:
        @hookimpl
        def edgeplug_register_passes(self, register: Any) -> None:
            register(Referring)

    host = PluginHost()
    host.register(Plugin(), name="referring")
    document = recipe_schema(host)
    jsonschema.Draft202012Validator.check_schema(document)
    assert _errors(document, {"passes": [{"name": "referring", "options": {"mode": "a"}}]}) == []
    assert _errors(document, {"passes": [{"name": "referring", "options": {"mode": "c"}}]})


def test_edgeplug_schema_recipe_prints_the_filled_in_schema(capsys: pytest.CaptureFixture[str]) -> None:
    reset_default_host()
    assert cli.main(["schema", "recipe"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert "trainable" in document["properties"]["passes"]["items"]["properties"]["name"]["enum"]
    assert cli.main(["schema", "recipe", "--bare"]) == 0
    assert "enum" not in json.loads(capsys.readouterr().out)["properties"]["passes"]["items"]["properties"]["name"]
    assert cli.main(["schema", "--json"]) == 0
    listed = {entry["name"] for entry in json.loads(capsys.readouterr().out)}
    assert {"recipe", "report", "profile", "fleet-simulation", "trainable"} <= listed
    for name in sorted(listed):
        assert cli.main(["schema", name]) == 0, name  # every listed schema prints
        json.loads(capsys.readouterr().out)


def test_training_section_round_trips_and_is_validated() -> None:
    recipe = recipe_from_dict({"training": {"epochs": 4, "batch_size": 8, "seed": 3}})
    assert (recipe.epochs, recipe.batch_size, recipe.seed) == (4, 8, 3)
    assert recipe.to_dict()["training"] == {"epochs": 4, "batch_size": 8, "seed": 3}
    assert "training" not in recipe_from_dict({}).to_dict()
    with pytest.raises(RecipeError, match="training"):
        recipe_from_dict({"training": {"epochs": 2, "batch": 8}})


def test_the_recipe_sets_the_run_and_the_command_line_overrides_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, data, recipe = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "r.yaml"
    onnx.save(mlp(8, (16,), 3), str(model))
    np.savez(data, **classification_data([8], 3, n=32))
    recipe.write_text("training: {epochs: 2, batch_size: 8, seed: 5}\n")
    reset_default_host()
    assert cli.main(["rewrite", str(model), "--recipe", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0
    capsys.readouterr()
    assert cli.main(["train", str(tmp_path / "out"), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["epochs"]) == 2 and result["steps_run"] == 8  # 32 examples in batches of 8, two epochs
    assert cli.main(["train", str(tmp_path / "out"), "--data", str(data), "--epochs", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps_run"] == 4
    trainer = Trainer(tmp_path / "out", progress=False)
    assert trainer.seed == 5 and trainer.run_defaults(None, None) == (2, 8) and trainer.run_defaults(7, 4) == (7, 4)
    assert Trainer(tmp_path / "out", progress=False, seed=1).seed == 1
