"""Load onnxruntime-training's on-device and artifact-building modules without torch.

`import onnxruntime.training` runs a package __init__ that imports torch (upstream
issue #22070), although `training.api`, `training.artifacts` and
`training.onnxblock` do not need it. We register a bare package object for
`onnxruntime.training` whose __path__ is the real folder, so its submodules import
normally and the torch-importing __init__ never runs. Torch is also hidden while
`onnxruntime.tools` is imported, because that module imports torch when it can
find it, which costs seconds and is never needed here.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeplug.errors import SetupError

_PACKAGE = "onnxruntime.training"


_RUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-training", "onnxruntime-training-cpu", "onnxruntime-gpu")


def _check_single_runtime() -> None:
    """Two onnxruntime wheels overwrite each other's files in one `onnxruntime` folder."""
    installed = []
    for name in _RUNTIME_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        installed.append(name)
    if len(installed) > 1:
        raise SetupError(
            f"several onnxruntime builds are installed ({', '.join(installed)}) and overwrite each other; "
            "keep one: pip uninstall -y " + " ".join(installed) + " && pip install onnxruntime-training-cpu==1.19.2"
        )


def _install_bare_training_package() -> None:
    if _PACKAGE in sys.modules:
        return
    _check_single_runtime()
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        raise SetupError(
            "onnxruntime-training is not installed: pip install onnxruntime-training-cpu==1.19.2"
        )
    folder = Path(spec.origin).parent / "training"
    if not (folder / "api").is_dir():
        raise SetupError(
            "the installed onnxruntime has no training support; uninstall onnxruntime and "
            "install onnxruntime-training-cpu==1.19.2 (they provide the same module)"
        )
    package = types.ModuleType(_PACKAGE)
    package.__path__ = [str(folder)]
    package.__package__ = _PACKAGE
    sys.modules[_PACKAGE] = package
    # onnxruntime's __init__ probes `onnxruntime.training.ortmodule`, which imports torch
    # when it can (seconds, and never needed here): keep torch hidden while it runs.
    with _torch_hidden():
        import onnxruntime

    onnxruntime.training = package  # type: ignore[attr-defined]


@contextlib.contextmanager
def _torch_hidden() -> Iterator[None]:
    """Make `find_spec('torch')` return None while third-party modules import."""
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


def inference_runtime() -> Any:
    """Return `onnxruntime` itself, imported without dragging torch in."""
    _install_bare_training_package()
    quiet_logs()
    return importlib.import_module("onnxruntime")


def training_api() -> Any:
    """Return `onnxruntime.training.api` (Module, Optimizer, CheckpointState)."""
    _install_bare_training_package()
    quiet_logs()
    return importlib.import_module(f"{_PACKAGE}.api")


def training_artifacts() -> Any:
    """Return `onnxruntime.training.artifacts` (generate_artifacts, LossType, OptimType)."""
    _install_bare_training_package()
    quiet_logs()
    with _torch_hidden():
        return importlib.import_module(f"{_PACKAGE}.artifacts")


def onnxblock() -> Any:
    """Return `onnxruntime.training.onnxblock`."""
    _install_bare_training_package()
    with _torch_hidden():
        return importlib.import_module(f"{_PACKAGE}.onnxblock")


def ort_converter() -> Any:
    """Return `onnxruntime.tools.convert_onnx_models_to_ort` (what generate_artifacts' ort_format uses)."""
    _install_bare_training_package()
    with _torch_hidden():
        return importlib.import_module("onnxruntime.tools.convert_onnx_models_to_ort")


def inference_session(model: Any, *, threads: int | None = None, options: Any = None, arena: bool = True) -> Any:
    """An onnxruntime InferenceSession on the CPU for a ModelProto, serialized bytes or a path,
    opened without importing torch; onnxruntime's own warnings are kept quiet. `arena=False`: no CPU memory
    arena, so what the session allocates goes back when it is gone instead of staying reserved for the passes
    or the training that run next in the same process (the arena changes no kernel's values)."""
    runtime = inference_runtime()
    if options is None:
        options = runtime.SessionOptions()
        options.log_severity_level = 3
    if not arena:
        options.enable_cpu_mem_arena = False
    if threads is not None:
        options.intra_op_num_threads = threads
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model) if isinstance(model, Path) else model
    return runtime.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def open_artifacts(folder: Path, state: Path | None = None, *, optimizer: bool = True,
                   ort_format: bool = False, session_options: Any = None) -> tuple[Any, Any, Any]:
    """Load an artifact folder: checkpoint state (from `state`, default the folder's own),
    the training module with its eval model, and the optimizer (None unless `optimizer`).
    `ort_format` loads the .ort copies of the models instead of the .onnx files;
    `session_options` (an onnxruntime SessionOptions) configures the module's sessions."""
    from edgeplug.layout import (
        CHECKPOINT,
        EVAL_MODEL,
        OPTIMIZER_MODEL,
        ORT_MODELS,
        TRAINING_MODEL,
    )

    def model(name: str) -> str:
        return str(folder / (ORT_MODELS[name] if ort_format else name))

    api = training_api()
    checkpoint = api.CheckpointState.load_checkpoint(str(state or folder / CHECKPOINT))
    module = api.Module(model(TRAINING_MODEL), checkpoint, model(EVAL_MODEL), session_options=session_options)
    return checkpoint, module, api.Optimizer(model(OPTIMIZER_MODEL), module) if optimizer else None


def seed_random_ops(seed: int) -> None:
    """Seed onnxruntime's process-wide random generator: Dropout draws from it at every run, and ops such
    as RandomUniformLike seed their own generator from it when their session opens."""
    training_api()
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_seed(int(seed))


def quiet_logs() -> None:
    """Keep onnxruntime's own logging to errors; warnings go through our messages."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)


@contextlib.contextmanager
def captured_native_stderr() -> Iterator[list[str]]:
    """Capture what native code writes to fd 2 (onnxruntime's C++ logger).

    The captured lines are appended to the yielded list when the block ends, so a
    caller can show them only when something failed.
    """
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode("utf-8", "replace").splitlines())
