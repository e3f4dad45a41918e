"""The module structure the architecture page promises: a light device side and no import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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
