"""Shared pytest fixtures. Keep each group's fixtures together under its heading."""

from __future__ import annotations

import inspect
import itertools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))  # `from builders import mlp` in every test module
from builders import write_plugin_distribution  # noqa: E402

# CI explores the same examples on every run (a red CI must be reproducible); local runs explore anew.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


# -- plugins: environment, installed example plugin, fake distributions -----------------------

from edgeplug.plugins import ONLY_PLUGINS_VARIABLE, TRACE_VARIABLE, reset_default_host  # noqa: E402 - after the sys.path line above

EXAMPLE_PLUGIN = REPO / "docs" / "example-plugin"
FakePlugin = Callable[..., str]


@pytest.fixture
def plugin_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No EDGEPLUG_* variables from the caller's shell, and a fresh default host before and after."""
    monkeypatch.delenv(ONLY_PLUGINS_VARIABLE, raising=False)
    monkeypatch.delenv(TRACE_VARIABLE, raising=False)
    reset_default_host()
    yield monkeypatch
    reset_default_host()


@pytest.fixture(scope="session")
def bitfit_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """docs/example-plugin installed for real (dist-info + entry point) into a folder for PYTHONPATH.

    Offline: the venv's setuptools builds the wheel (no build isolation, no index). The
    source is copied first so the build leaves nothing in docs/.
    """
    source = tmp_path_factory.mktemp("bitfit-src") / "example-plugin"
    shutil.copytree(EXAMPLE_PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp_path_factory.mktemp("bitfit-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(site), str(source)],
        check=True, capture_output=True, text=True,
    )
    return site


_fake_counter = itertools.count()


@pytest.fixture
def fake_plugin(tmp_path: Path, plugin_env: pytest.MonkeyPatch) -> Iterator[FakePlugin]:
    """Create a fake installed distribution with one ``edgeplug`` entry point; returns the module name.

    ``fake_plugin("name", code)`` writes ``code`` as a fresh module, a ``*.dist-info``
    folder whose entry_points.txt points the entry point ``name`` at it, and puts the
    folder on sys.path. Much faster than a real install, and enough for importlib.metadata.
    """
    site = tmp_path / "site-packages"
    site.mkdir()
    plugin_env.syspath_prepend(str(site))
    modules: list[str] = []

    def make(entry_name: str, code: str, *, version: str = "1.2.3", module: str | None = None) -> str:
        module = module or f"edgeplug_fake_{next(_fake_counter)}"
        write_plugin_distribution(site, entry_name, module, code, version=version)
        modules.append(module)
        return module

    yield make
    for module in modules:
        sys.modules.pop(module, None)


@pytest.fixture(scope="module")
def qcore_registered() -> Iterator[None]:
    """The default host with qcore, even where stale metadata (an old egg-info) hides its entry point."""
    import edgeplug_plugins.qcore as qcore_plugin
    from edgeplug.plugins import default_host

    reset_default_host()
    host = default_host()
    if "qcore" not in host.passes():
        host.register(qcore_plugin, name="qcore", version="test")
    yield
    reset_default_host()


# -- the fast subset: `python -m pytest -m "not slow"` ------------------------------------------

_END_TO_END = re.compile(r"\brewrite\(|\bsubprocess\.|\bTrainer\(|\bcli\.main\(|\bmain\(\[|\.fit\(|\bexport\(|\bprofile\(|\bsimulate\(")


def _source(function: object) -> str:
    try:
        return inspect.getsource(function)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark as `slow` every test that runs a whole rewrite, training run, export, profile or subprocess,
    itself or through a fixture it uses (besides tests marked by hand): what is left runs in seconds."""
    for item in items:
        if item.get_closest_marker("slow") or not isinstance(item, pytest.Function):
            continue
        sources = [_source(item.function)]
        for definitions in item._fixtureinfo.name2fixturedefs.values():
            sources += [_source(definition.func) for definition in definitions if "site-packages" not in str(getattr(definition, "baseid", ""))]
        helpers = {name: value for name, value in vars(item.module).items()  # the module's own helpers it calls
                   if inspect.isfunction(value) and value.__module__ == item.module.__name__ and not name.startswith("test_")}
        sources += [_source(value) for name, value in helpers.items() if any(f"{name}(" in source for source in sources)]
        if any(_END_TO_END.search(source) for source in sources):
            item.add_marker(pytest.mark.slow)


# -- hooks a test promises to exercise: @pytest.mark.covers_hook("edgeplug_after_step") ------------------


@pytest.fixture(autouse=True)
def _covered_hooks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A test marked covers_hook(name) fails unless a plugin's implementation of that hook ran during it."""
    promised = {marker.args[0] for marker in request.node.iter_markers("covers_hook")}
    if not promised:
        yield
        return
    from edgeplug.plugins import PluginHost

    called: set[str] = set()
    original_init = PluginHost.__init__

    def monitored_init(self: PluginHost, *args: object, **kwargs: object) -> None:
        original_init(self, *args, **kwargs)  # type: ignore[arg-type]
        self._manager.add_hookcall_monitoring(
            lambda name, implementations, kwargs: called.add(name) if implementations else None, lambda *args: None)

    monkeypatch.setattr(PluginHost, "__init__", monitored_init)
    def watching(method: str, hook: str) -> Callable[..., object]:
        original = getattr(PluginHost, method)

        def direct(self: PluginHost, *args: object) -> object:
            if getattr(self._manager.hook, hook).get_hookimpls():  # these two call the implementations directly
                called.add(hook)
            return original(self, *args)

        return direct

    for method, hook in (("_collect_passes", "edgeplug_register_passes"), ("add_commands", "edgeplug_register_commands")):
        monkeypatch.setattr(PluginHost, method, watching(method, hook))
    reset_default_host()
    yield
    reset_default_host()
    assert promised <= called, f"the test promises to exercise {sorted(promised - called)}, which no plugin implementation ran"
