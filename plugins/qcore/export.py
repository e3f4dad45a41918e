"""The quantized model with the current (recalibrated) codes and statistics, as a plain onnxruntime model."""

from __future__ import annotations

from pathlib import Path

import onnx

from edgeplug.plugin_api import EdgeplugError, save_model

from .commands import QCORE_DIR
from .qmodel import QuantState, export_model


def export_quantized(artifact_dir: str | Path, output: str | Path, *, initial: bool = False) -> Path:
    """Write the quantized model of a qcore folder to `output` (atomically).

    It holds the integer codes and batch-norm statistics of `qcore/state.npz`, i.e. after
    every `edgeplug calibrate` run so far; `initial=True` takes those `edgeplug quantize`
    wrote (`state.initial.npz`).
    """
    folder = Path(artifact_dir) / QCORE_DIR
    state_path = folder / ("state.initial.npz" if initial else "state.npz")
    if not (folder / "float.onnx").is_file() or not state_path.is_file():
        raise EdgeplugError(f"{artifact_dir} holds no quantized model ({state_path} or float.onnx missing); "
                            "run 'edgeplug quantize' on a folder rewritten with the 'qcore' pass first")
    state = QuantState.load(state_path)
    model = export_model(onnx.load(str(folder / "float.onnx")), state)
    save_model(model, output)
    return Path(output)
