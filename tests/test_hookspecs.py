"""Meta-tests: every hook is documented and every hook is exercised by some test."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import edgeplug
from edgeplug import hookspecs

TESTS = Path(__file__).parent


def _hookspecs() -> list[str]:
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return sorted(name for name, value in vars(hookspecs).items() if callable(value) and hasattr(value, marker))


HOOKS = _hookspecs()


def test_the_hook_surface_is_what_the_guide_documents() -> None:
    assert HOOKS == [
        "edgeplug_after_step", "edgeplug_before_step", "edgeplug_epoch_end", "edgeplug_load_state",
        "edgeplug_register_commands", "edgeplug_register_passes", "edgeplug_save_state",
    ]


def test_the_markers_and_the_entry_point_group_share_one_name() -> None:
    assert hookspecs.PROJECT_NAME == "edgeplug"
    assert hookspecs.hookspec.project_name == edgeplug.hookimpl.project_name == hookspecs.PROJECT_NAME


@pytest.mark.parametrize("name", HOOKS)
def test_hookspec_is_documented(name: str) -> None:
    function = getattr(hookspecs, name)
    doc = inspect.getdoc(function) or ""
    assert doc.splitlines() and doc.splitlines()[0].strip(), f"{name} has no one-line summary"
    for parameter in inspect.signature(function).parameters:
        assert f":param {parameter}:" in doc, f"{name} does not document its argument '{parameter}'"
    assert re.search(r"\.\. versionadded:: \d+\.\d+", doc), f"{name} does not say in which version it was added"


@pytest.mark.parametrize("name", HOOKS)
def test_hookspec_is_fully_typed(name: str) -> None:
    function = getattr(hookspecs, name)
    signature = inspect.signature(function)
    assert signature.return_annotation is not inspect.Signature.empty, f"{name} has no return annotation"
    for parameter in signature.parameters.values():
        assert parameter.annotation is not inspect.Parameter.empty, f"{name}({parameter.name}) is not annotated"


def _covered() -> set[str]:
    """Hooks named by a @pytest.mark.covers_hook(...) decorator in some test module."""
    found = set()
    for path in TESTS.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef):
                for decorator in node.decorator_list:
                    if (isinstance(decorator, ast.Call) and ast.unparse(decorator.func) == "pytest.mark.covers_hook"
                            and decorator.args and isinstance(decorator.args[0], ast.Constant)):
                        found.add(decorator.args[0].value)
    return found


@pytest.mark.parametrize("name", HOOKS)
def test_hookspec_is_exercised_by_a_test(name: str) -> None:
    """A covers_hook test fails unless the hook really ran (conftest's _covered_hooks), so a name in a comment
    no longer counts as a test."""
    assert name in _covered(), f"no test is marked @pytest.mark.covers_hook({name!r}); mark one that runs it"
