"""Meta-tests: every hook is documented and every hook is exercised by some test."""

from __future__ import annotations

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
        "edgeplug_after_step", "edgeplug_before_step", "edgeplug_load_state",
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


@pytest.mark.parametrize("name", HOOKS)
def test_hookspec_is_used_in_another_test_file(name: str) -> None:
    users = [path.name for path in TESTS.glob("test_*.py") if path.name != Path(__file__).name and name in path.read_text(encoding="utf-8")]
    assert users, f"no test exercises the hook {name}; add one"
