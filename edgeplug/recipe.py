"""Recipes: which passes run with which options, and how to train (JSON or YAML)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from edgeplug.errors import EdgeplugError, RecipeError
from edgeplug.files import read_limited
from edgeplug.memory_settings import DEFAULT_MEMORY, DEFAULT_PREFIX_CACHE_DTYPE
from edgeplug.optimizers import DEFAULT_LR
from edgeplug.passes import fill_defaults
from edgeplug.plugins import PluginHost, default_host
from edgeplug.validation import field_path, first_error, load_schema


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
    memory: str = DEFAULT_MEMORY  # training sessions: "compact", "arena" or "lean" (edgeplug.memory_settings, the recipe schema)
    prefix_cache_dtype: str = DEFAULT_PREFIX_CACHE_DTYPE
    """`training.prefix_cache_dtype`: how the Python trainer's frozen-prefix cache stores float32 tensors ("float32" or "float16")."""
    epochs: int | None = None
    """`training.epochs`: the run's default number of epochs (None: 1); `--epochs` overrides it."""
    batch_size: int | None = None
    """`training.batch_size` (None: 32); `--batch-size` overrides it."""
    seed: int | None = None
    """`training.seed` (None: 0); `--seed` overrides it."""

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
        training: dict[str, Any] = {key: value for key, value in (("epochs", self.epochs), ("batch_size", self.batch_size), ("seed", self.seed))
                    if value is not None}
        if self.memory != DEFAULT_MEMORY:
            training["memory"] = self.memory
        if self.prefix_cache_dtype != DEFAULT_PREFIX_CACHE_DTYPE:
            training["prefix_cache_dtype"] = self.prefix_cache_dtype
        if training:
            document["training"] = training
        return document


MAX_RECIPE_BYTES = 2**20
"""Largest recipe file read: real recipes are a few hundred bytes."""
MAX_DEPTH = 32
MAX_NODES = 100_000
"""A recipe nests at most MAX_DEPTH levels and holds at most MAX_NODES values (YAML aliases counted
each time they are used: a 'billion laughs' document is refused, not expanded)."""


def shipped_recipes() -> dict[str, str]:
    """The recipes shipped with edgeplug (`recipes/`, package data edgeplug.recipes): name -> YAML text."""
    from importlib import resources

    root = resources.files("edgeplug.recipes")
    return {entry.name.removesuffix(".yaml"): entry.read_text(encoding="utf-8")
            for entry in root.iterdir() if entry.name.endswith(".yaml")}


def load_recipe(path: str | Path, host: PluginHost | None = None) -> Recipe:
    """Read and validate a recipe file (.json, .yaml or .yml: a regular file of at most 1 MiB), or a recipe
    shipped with edgeplug by name ('fine-tune'; a file of that name wins)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink() and not path.suffix and len(path.parts) == 1:
        shipped = shipped_recipes()
        if str(path) not in shipped:
            raise RecipeError(f"recipe file not found: {path} (shipped recipes: {', '.join(sorted(shipped))})")
        return _recipe_from_text(shipped[str(path)], "YAML", host, f"recipe '{path}'")
    text = read_limited(path, "recipe file", MAX_RECIPE_BYTES, RecipeError).decode("utf-8", errors="replace")
    return _recipe_from_text(text, "JSON" if path.suffix == ".json" else "YAML", host, str(path))


def _recipe_from_text(text: str, kind: str, host: PluginHost | None, source: str) -> Recipe:
    try:
        document = json.loads(text, parse_constant=_refuse_constant) if kind == "JSON" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, ValueError) as error:
        raise RecipeError(f"{source} is not valid {kind}: {_one_line(error)}") from None
    except RecursionError:
        raise RecipeError(f"{source} nests too deep to be a recipe (more than {MAX_DEPTH} levels)") from None
    return recipe_from_dict(document, host=host, source=source)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (JSON has no NaN or Infinity)")


def check_plain_document(document: Any, source: str) -> None:
    """JSON values only, finite numbers, at most MAX_DEPTH levels and MAX_NODES values; else RecipeError.

    Runs before the schema: jsonschema accepts NaN for `exclusiveMinimum: 0` (every comparison
    with NaN is false) and recurses once per level.
    """
    pending: list[tuple[Any, tuple[Any, ...]]] = [(document, ())]
    seen = 0
    while pending:
        value, path = pending.pop()
        seen += 1
        if seen > MAX_NODES:
            raise RecipeError(f"{source}: holds more than {MAX_NODES:,} values (YAML aliases count each use); "
                              "that is not a recipe")
        if len(path) > MAX_DEPTH:
            raise RecipeError(f"{source}: {field_path(path[:MAX_DEPTH])}: nests too deep (more than {MAX_DEPTH} levels)")
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(f"{source}: {field_path(path)}: {value} is not a finite number")
        if isinstance(value, dict):
            pending.extend((item, (*path, str(key))) for key, item in value.items())
        elif isinstance(value, list):
            pending.extend((item, (*path, index)) for index, item in enumerate(value))


def recipe_from_dict(document: Any, host: PluginHost | None = None, source: str = "recipe") -> Recipe:
    """Validate a recipe document against the recipe schema and each pass's own schema."""
    if document is None:
        document = {}
    check_plain_document(document, source)
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
    training = document.get("training", {})
    return Recipe(
        passes=tuple(specs),
        loss=document.get("loss", "cross-entropy"),
        output=document.get("output"),
        optimizer=optimizer.get("name", "adamw"),
        lr=float(optimizer.get("lr", DEFAULT_LR)),
        schedule=optimizer.get("schedule"),
        data_inputs=data.get("inputs", {}),
        labels_key=data.get("labels"),
        memory=training.get("memory", DEFAULT_MEMORY),
        prefix_cache_dtype=training.get("prefix_cache_dtype", DEFAULT_PREFIX_CACHE_DTYPE),
        epochs=training.get("epochs"),
        batch_size=training.get("batch_size"),
        seed=training.get("seed"),
    )


def recipe_schema(host: PluginHost | None = None) -> dict[str, Any]:
    """The recipe schema with the installed passes filled in, for editors (`edgeplug schema recipe`).

    `passes[].name` is one of the installed passes (an enum, each described by its summary), and an
    if/then per pass validates `options` against that pass's own schema, so a YAML language server
    flags `name: trainabel` and `options: {layerz: frozen}` as you type. A pass schema's `$defs`
    move under the root's `$defs` as `<pass>.<name>` (its `#/$defs/...` references follow them).
    Options without an `examples` entry get their default as the example.
    """
    host = host or default_host()
    schema = copy.deepcopy(dict(load_schema("recipe")))
    passes = dict(sorted(host.passes().items()))
    item = schema["properties"]["passes"]["items"]
    name = item["properties"]["name"]
    name["enum"] = list(passes)
    name["description"] = "A registered pass: " + "; ".join(f"{key}: {info.summary}" for key, info in passes.items())
    definitions = schema.setdefault("$defs", {})
    shipped = [yaml.safe_load(text) or {} for _, text in sorted(shipped_recipes().items())]
    rules = []
    for key, info in passes.items():
        options = _embedded(copy.deepcopy(dict(info.factory.options_schema)), key, definitions)
        options.setdefault("description", f"Options of the '{key}' pass (plugin '{info.plugin}'): {info.summary}")
        if "examples" not in options:
            options["examples"] = _option_examples(key, info.factory.options_schema, shipped)
        rules.append({"if": {"properties": {"name": {"const": key}}, "required": ["name"]},
                      "then": {"properties": {"options": options}}})
    item["allOf"] = rules
    return schema


def _option_examples(pass_name: str, options_schema: Mapping[str, Any], recipes: list[Any]) -> list[Any]:
    """Examples of a pass's options: how the shipped recipes set them, else no options at all when the defaults are valid."""
    found = [entry.get("options", {}) for recipe in recipes for entry in recipe.get("passes", []) if entry.get("name") == pass_name]
    if not found and first_error(fill_defaults({}, options_schema), options_schema) is None:
        found = [{}]
    return found


def _embedded(options: dict[str, Any], pass_name: str, definitions: dict[str, Any]) -> dict[str, Any]:
    """`options` (a pass's schema) made fit to sit inside the recipe schema: no `$schema`/`$id`, its `$defs` moved
    to the root's under `<pass>.<name>`, and every property given an example (its default) when it has none."""
    for key in ("$schema", "$id"):
        options.pop(key, None)
    moved = options.pop("$defs", {})

    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            reference = node.get("$ref")
            if isinstance(reference, str) and reference.startswith("#/$defs/"):
                node["$ref"] = f"#/$defs/{pass_name}.{reference.removeprefix('#/$defs/')}"
            for field, value in node.get("properties", {}).items() if isinstance(node.get("properties"), dict) else ():
                if isinstance(value, dict) and "examples" not in value and "default" in value:
                    value["examples"] = [value["default"]]
            for value in node.values():
                fix(value)
        elif isinstance(node, list):
            for value in node:
                fix(value)
        return node

    for key, value in moved.items():
        definitions[f"{pass_name}.{key}"] = fix(value)
    return dict(fix(options))


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def check_recipe(recipe: Recipe) -> None:
    """A Recipe built in Python passes the checks a recipe file does (finite numbers, the schema)."""
    document = recipe.to_dict()
    check_plain_document(document, "recipe")
    problem = first_error(document, load_schema("recipe"))
    if problem:
        raise RecipeError(f"recipe: {problem}")
