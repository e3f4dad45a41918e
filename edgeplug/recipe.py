"""Recipes: which passes run with which options, and how to train (JSON or YAML)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from edgeplug.errors import EdgeplugError, RecipeError
from edgeplug.optimizers import DEFAULT_LR
from edgeplug.passes import fill_defaults
from edgeplug.plugins import PluginHost, default_host
from edgeplug.validation import first_error, load_schema


@dataclasses.dataclass(frozen=True)
class PassSpec:
    """One pass in a recipe, with its options after defaults were filled in."""

    name: str
    options: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe."""

    passes: tuple[PassSpec, ...]
    loss: str = "cross-entropy"
    output: str | None = None
    optimizer: str = "adamw"
    lr: float = DEFAULT_LR
    schedule: Mapping[str, Any] | None = None
    data_inputs: Mapping[str, str] = dataclasses.field(default_factory=dict)
    labels_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a document that `from_dict` reads back (written to out/recipe.json)."""
        document: dict[str, Any] = {
            "version": 1,
            "loss": self.loss,
            "optimizer": {"name": self.optimizer, "lr": self.lr},
            "passes": [{"name": p.name, "options": dict(p.options)} for p in self.passes],
        }
        if self.schedule:
            document["optimizer"]["schedule"] = dict(self.schedule)
        if self.output:
            document["output"] = self.output
        data: dict[str, Any] = {}
        if self.data_inputs:
            data["inputs"] = dict(self.data_inputs)
        if self.labels_key:
            data["labels"] = self.labels_key
        if data:
            document["data"] = data
        return document


def load_recipe(path: str | Path, host: PluginHost | None = None) -> Recipe:
    """Read and validate a recipe file (.json, .yaml or .yml)."""
    path = Path(path)
    if not path.exists() or path.is_dir():
        raise RecipeError(f"recipe file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        document = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise RecipeError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {_one_line(error)}") from None
    return recipe_from_dict(document, host=host, source=str(path))


def recipe_from_dict(document: Any, host: PluginHost | None = None, source: str = "recipe") -> Recipe:
    """Validate a recipe document against the recipe schema and each pass's own schema."""
    if document is None:
        document = {}
    problem = first_error(document, load_schema("recipe"))
    if problem:
        raise RecipeError(f"{source}: {problem}")
    host = host or default_host()
    specs = []
    for index, entry in enumerate(document.get("passes", [])):
        try:
            info = host.get_pass(entry["name"])
        except EdgeplugError as error:
            raise RecipeError(f"{source}: passes[{index}].name: {error}") from None
        options = fill_defaults(entry.get("options", {}), info.factory.options_schema)
        problem = first_error(options, info.factory.options_schema)
        if problem:
            where = f"passes[{index}].options" + ("" if problem.startswith("<root>") else ".")
            raise RecipeError(f"{source}: {where}{problem.removeprefix('<root>')}")
        specs.append(PassSpec(entry["name"], options))
    optimizer = document.get("optimizer", {})
    data = document.get("data", {})
    return Recipe(
        passes=tuple(specs),
        loss=document.get("loss", "cross-entropy"),
        output=document.get("output"),
        optimizer=optimizer.get("name", "adamw"),
        lr=float(optimizer.get("lr", DEFAULT_LR)),
        schedule=optimizer.get("schedule"),
        data_inputs=data.get("inputs", {}),
        labels_key=data.get("labels"),
    )


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
