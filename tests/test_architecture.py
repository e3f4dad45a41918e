"""The module structure the architecture page promises: a light device side and no import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import edgeplug

PACKAGE = Path(edgeplug.__file__).parent
REWRITE_SIDE = ("edgeplug.pipeline", "edgeplug.recipe", "edgeplug.validation", "jsonschema", "yaml", "onnx_ir")


def test_the_device_side_loads_without_the_rewrite_stack() -> None:
    code = ("import sys, edgeplug.trainer, edgeplug.exporter, edgeplug.artifacts\n"
            f"print(sorted(m for m in sys.modules if m in {REWRITE_SIDE!r} or m.split('.')[0] in {REWRITE_SIDE!r}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules `name` imports, at import time or inside functions (lazy imports count: they cycle
    too), except under TYPE_CHECKING and in the package's lazy `__getattr__`. Importing a.b.c
    also imports the packages a.b and a, unless `name` lives inside them."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(inner) for inner in ast.walk(node)}
        if name == "edgeplug" and isinstance(node, ast.FunctionDef) and node.name in ("__getattr__", "__dir__"):
            skipped |= {id(inner) for inner in ast.walk(node)}
    targets: list[str] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets += [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                        for alias in node.names]
        elif isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
    edges = set()
    for target in targets:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        while target:
            if target != name and not name.startswith(target + "."):
                edges.add(target)
            target = target.rpartition(".")[0]
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def test_edgeplug_has_no_import_cycle() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert _cycles(graph) == []


PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
PUBLIC_MODULES = ("edgeplug", "edgeplug.plugin_api")


def test_built_in_plugins_import_only_the_public_api() -> None:
    """Built-in plugins are plugins like any other: `edgeplug` and `edgeplug.plugin_api` only."""
    private = []
    for path in sorted(PLUGINS.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        others = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                  for alias in node.names if alias.name.split(".")[0] != "edgeplug"}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                modules = [node.module] if node.module.split(".")[0] == "edgeplug" else []
                names = [alias.name for alias in node.names]
                if node.module in PUBLIC_MODULES and any(name.startswith("_") for name in names):
                    private.append(f"{path.relative_to(PLUGINS)}: from {node.module} import {', '.join(names)}")
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names if alias.name.split(".")[0] == "edgeplug"]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if isinstance(node.value, ast.Attribute | ast.Name) and ast.unparse(node.value) not in ("self", "cls", *others):
                    private.append(f"{path.relative_to(PLUGINS)}:{node.lineno}: {ast.unparse(node)}")
                continue
            else:
                continue
            private += [f"{path.relative_to(PLUGINS)}: imports {module}" for module in modules if module not in PUBLIC_MODULES]
    assert private == []


def test_every_public_name_is_exported_and_documented() -> None:
    import edgeplug.plugin_api as api

    assert "GraphIndex" in edgeplug.__all__ and "GraphIndex" in api.__all__
    for module in (edgeplug, api):
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert missing == [], f"{module.__name__} lists names it does not have: {missing}"
        undocumented = [name for name in module.__all__ if callable(getattr(module, name)) and not getattr(module, name).__doc__]
        assert undocumented == []


def test_help_shows_the_api() -> None:
    import pydoc

    text = pydoc.render_doc(edgeplug, renderer=pydoc.plaintext)
    functions = text.split("\nFUNCTIONS\n")[1].split("\nDATA\n")[0]
    classes = text.split("\nCLASSES\n")[1].split("\nFUNCTIONS\n")[0]
    for name in ("rewrite(", "export(", "inspect_model(", "load_recipe(", "load_dataset("):
        assert f"\n    {name}" in functions, name
    for name in ("class Trainer", "class Pass(", "class GraphIndex", "class PluginHost"):
        assert name in classes, name
    assert "edgeplug.plugin_api" in text.split("\nPACKAGE CONTENTS\n")[0]


@pytest.mark.slow
def test_the_readme_python_example_type_checks(tmp_path: Path) -> None:
    """The lazily imported API (rewrite, Trainer, export) keeps its real types for mypy."""
    api = pytest.importorskip("mypy.api")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert "edgeplug.Trainer(" in example
    (tmp_path / "example.py").write_text(example, encoding="utf-8")
    out, err, status = api.run(["--strict", "--follow-imports=silent", "--cache-dir", str(tmp_path / "cache"),
                                str(tmp_path / "example.py")])
    assert status == 0, out + err


def test_every_built_in_pass_lives_in_a_file_named_after_it() -> None:
    """One naming convention for plugins: pass `foo-bar` is class code in `<plugin>/foo_bar_pass.py`,
    so a reader finds any pass from its name alone."""
    from edgeplug.plugins import CORE_STAGES, PluginHost, built_in_pass_names

    passes = PluginHost().passes()
    names = sorted(built_in_pass_names() - CORE_STAGES)
    assert names and all(name in passes for name in names)
    for name in names:
        module = passes[name].factory.__module__
        assert module.startswith("edgeplug_plugins."), (name, module)
        assert module.rsplit(".", 1)[-1] == name.replace("-", "_") + "_pass", (name, module)
